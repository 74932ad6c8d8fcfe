"""A service read only from its servers' /metrics through the real collector app: listed, charted, in the
collector's metrics; and one reported both ways is counted once. The frames are what the agent builds from
the golden vLLM exposition (tests/agent/fixtures/servers/vllm_v1.prom) read twice."""

from __future__ import annotations

import json
import time

import msgspec
import polars as pl
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agent.frames import ServerFrames
from agent.inference_servers import ServerReading, parse
from collector.api import create_app
from collector.tables import SCHEMAS
from tests.agent.test_inference_servers import _scaled, fixture
from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready

NOW = time.time() - 60


def server_frame(service: str, node: str, ts: float, url: str = "http://10.0.0.1:8000/metrics") -> dict:
    """One agent interval of the golden vLLM server: 200 requests (4 failed: 3 aborted, 1 error)."""
    text = fixture("vllm_v1")
    (first,) = parse("vllm", text, "x").values()
    (second,) = parse("vllm", "\n".join(_scaled(line, 2) for line in text.splitlines()), "x").values()
    builder = ServerFrames()  # what the agent's shipper makes of two samples' readings
    assert builder.frames((ServerReading(url, "vllm", service, "llama-3.1-8b", ts - 10, first),), node) == []
    (frame,) = builder.frames((ServerReading(url, "vllm", service, "llama-3.1-8b", ts, second),), node)
    return json.loads(msgspec.json.encode(frame))


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as c:
        wait_ready(c)
        yield c


def metrics(client) -> dict:
    text = client.get("/metrics", headers=R).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_service_only_scraped_is_listed_charted_and_exported(client):
    body = batch(0)
    body["servers"] = [server_frame("chat", "gpu-1", NOW), server_frame("chat", "gpu-2", NOW, "http://10.0.0.2:8000/metrics")]
    assert post(client, body).status_code == 200

    (row,) = client.get("/v1/services", headers=R).json()["services"]
    assert row["service"] == "chat" and row["source"] == "server" and row["scraped"]
    assert row["requests"] == 400 and row["error_ratio"] == pytest.approx(8 / 400)  # aborts and errors are failures
    assert row["nodes"] == ["gpu-1", "gpu-2"] and row["kv_cache_usage_ratio"] == pytest.approx(0.55)
    assert 2.0 < row["e2e_p50_s"] < 5.0 and row["ttft_p50_s"] is not None

    detail = client.get("/v1/services/chat", headers=R).json()
    assert detail["sources"] == {"llama-3.1-8b": "server"}
    queue = next(q for q in detail["scraped_latency"] if q["metric"] == "queue")
    assert queue["lowest_bound_s"] == pytest.approx(0.3)  # vLLM's: below it the quantiles are interpolation

    series = client.get("/v1/services/chat/series", headers=R, params={"by": "node", "step_s": 60}).json()
    by_node = {r["node"]: r for r in series["series"]}
    assert set(by_node) == {"gpu-1", "gpu-2"} and all(r["source"] == "server" for r in by_node.values())
    assert by_node["gpu-1"]["requests_per_s"] == pytest.approx(200 / 60)
    assert by_node["gpu-1"]["tpot_p50_s"] < 0.05 and by_node["gpu-1"]["e2e_p99_s"] > by_node["gpu-1"]["e2e_p50_s"]
    state = client.get("/v1/services/chat/series", headers=R, params={"step_s": 60}).json()["server_state"]
    assert state[0]["running"] == 42 and state[0]["prefix_cache_hit_ratio"] == pytest.approx(0.3)
    assert state[0]["kv_cache_usage_ratio"] == pytest.approx(0.55) and state[0]["preemptions_per_s"] > 0

    m = metrics(client)
    labels = (("model", "llama-3.1-8b"), ("service", "chat"), ("source", "server"))
    assert m[("fleetscope_inference_error_ratio", labels)] == pytest.approx(0.02)
    assert m[("fleetscope_inference_requests_per_second", labels)] == pytest.approx(400 / 300)
    assert m[("fleetscope_inference_ttft_p95_seconds", labels)] > m[("fleetscope_inference_ttft_p50_seconds", labels)]
    assert ("fleetscope_inference_tpot_p99_seconds", labels) in m and ("fleetscope_inference_e2e_p95_seconds", labels) in m


def test_a_service_reported_both_ways_is_counted_once_from_the_client(client):
    body = batch(0)
    body["servers"] = [server_frame("chat", "gpu-1", NOW)]
    body["events"] = [{"v": 1, "kind": "request", "service": "chat", "model": "llama-3.1-8b", "ts": NOW - i * 0.1,
                       "e2e_s": 1.0, "ttft_s": 0.1, "status": "error" if i < 5 else "ok", "output_tokens": 10}
                      for i in range(50)]
    assert post(client, body).status_code == 200
    (row,) = client.get("/v1/services", headers=R).json()["services"]
    assert row["source"] == "client" and row["scraped"] and row["requests"] == 50  # not 250
    assert row["error_ratio"] == pytest.approx(0.1) and row["kv_cache_usage_ratio"] == pytest.approx(0.55)
    m = metrics(client)
    error = {k: v for k, v in m.items() if k[0] == "fleetscope_inference_error_ratio"}
    assert list(error) == [("fleetscope_inference_error_ratio", (("model", "llama-3.1-8b"), ("service", "chat"),
                                                                  ("source", "client")))]
    series = client.get("/v1/services/chat/series", headers=R, params={"step_s": 3600}).json()
    assert {r["source"] for r in series["series"]} == {"client"}
    assert series["server_state"][0]["kv_cache_usage_ratio"] == pytest.approx(0.55)  # the servers' state still shows


def test_histogram_rows_written_before_they_carried_a_node_still_load():
    from collector.tables import conform

    old = pl.DataFrame({"ts": [NOW], "service": ["chat"], "model": ["m"], "server": ["s"], "metric": ["ttft"],
                        "le": [[0.1, 1e300]], "counts": [[1.0, 2.0]], "sum": [0.3], "count": [2.0]})
    frame = conform(old.lazy(), "server_histograms").collect()
    assert frame.columns == list(SCHEMAS["server_histograms"]) and frame["node"].to_list() == [None]
    stats = conform(pl.DataFrame({"ts": [NOW], "service": ["chat"], "requests_ok": [3.0]}).lazy(), "server_stats").collect()
    assert stats["preemptions"].to_list() == [None] and stats["requests_aborted"].to_list() == [None]
