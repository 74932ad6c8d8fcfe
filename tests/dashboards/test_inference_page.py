"""The console's Inference page (Streamlit AppTest) against a live collector holding a service read only from its
vLLM server (the golden exposition, through the agent's own parse) and one instrumented with the client."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
from streamlit.testing.v1 import AppTest

from agent.frames import ServerFrames
from agent.inference_servers import ServerReading, parse
from tests.agent.test_inference_servers import _scaled, fixture
from tests.dashboards.conftest import serve_collector
from tests.dashboards.test_pages import DASHBOARDS

INGEST, READ = "inf-ingest", "inf-read"


def seed() -> dict:
    now = time.time()
    text = fixture("vllm_v1")
    servers = []
    for k, node in enumerate(("gpu-1", "gpu-2")):
        (first,) = parse("vllm", "\n".join(_scaled(line, 1 + k) for line in text.splitlines()), "x").values()
        (second,) = parse("vllm", "\n".join(_scaled(line, 2 + k) for line in text.splitlines()), "x").values()
        url, builder = f"http://{node}:8000/metrics", ServerFrames()
        builder.frames((ServerReading(url, "vllm", "scraped", "llama", now - 70, first),), node)
        (frame,) = builder.frames((ServerReading(url, "vllm", "scraped", "llama", now - 60, second),), node)
        servers.append(json.loads(msgspec.json.encode(frame)))
    events = [{"v": 1, "kind": "request", "service": "chat", "model": "m1", "ts": now - 30 + i, "e2e_s": 0.5,
               "ttft_s": 0.1, "tpot_s": 0.01, "output_tokens": 40, "status": "ok", "node": "node-a"} for i in range(20)]
    return {"v": 1, "agent_id": "seed", "seq": 0, "node": "node-a", "sent_ts": now, "events": events, "servers": servers}


@pytest.fixture(scope="module")
def collector_url(tmp_path_factory):
    yield from serve_collector(tmp_path_factory.mktemp("inf"), INGEST, READ, seed())


@pytest.fixture
def page(collector_url, monkeypatch):
    monkeypatch.setenv("FLEETSCOPE_COLLECTOR_URL", collector_url)
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_REFRESH_S", "0")
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN", READ)
    at = AppTest.from_file(str(DASHBOARDS / "pages/3_Inference.py"), default_timeout=30)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def test_a_scraped_service_is_listed_with_its_source_and_times_as_times(page):
    table = page.dataframe[0].value
    rows = {r["service"]: r for r in table.to_dict("records")}
    assert rows["scraped"]["source"] == "server" and rows["chat"]["source"] == "client"
    assert rows["scraped"]["error_ratio"] == pytest.approx(0.02)  # aborted and errored requests are failures
    assert str(table["last request"].dtype).startswith("datetime64")  # not 1795969703.0691


def test_a_scraped_service_shows_its_latencies_over_time_and_its_servers(page):
    page.selectbox(key="service").set_value("scraped").run()
    assert not page.exception and not page.error
    labels = {m.label: m.value for m in page.metric}
    assert labels["TTFT p50"].endswith(" ms") and labels["time per output token p50"].endswith(" ms")
    # vLLM's queue buckets start at 0.3 s: the page says the quantile is interpolated and gives the exact mean
    assert any("interpolated below 300.0 ms" in c.value for c in page.caption)
    subheaders = [h.value for h in page.subheader]
    assert {"Time to first token", "Time per output token", "End to end"} <= set(subheaders)
    assert {"Servers", "Over time"} <= {h.value for h in page.header}
    assert len(charts(page)) >= 3 + 3 + 4  # latencies, rates, the servers' state
    assert any(m.value == "**KV-cache use**" for m in page.markdown)


def test_per_replica_charts_have_one_line_per_node(page):
    page.selectbox(key="service").set_value("scraped").run()
    page.radio(key="by").set_value("node").run()
    assert not page.exception and not page.error
    shown = [str(c.proto) for c in charts(page)]
    assert shown and any("gpu-1" in s for s in shown) and any("gpu-2" in s for s in shown)
    page.radio(key="by").set_value("model").run()
    assert not any("gpu-1" in str(c.proto) for c in charts(page))  # per model, the replicas are summed
