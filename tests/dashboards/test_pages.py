"""Every console page renders against a live collector (Streamlit AppTest), and says so when it cannot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import free_port, wait_until
from tests.dashboards.conftest import serve_collector

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
PAGES = ["app.py", "pages/1_Fleet.py", "pages/2_Training.py", "pages/3_Inference.py", "pages/4_Findings.py", "pages/5_Node.py"]
INGEST, READ = "dash-ingest", "dash-read"


def seed_batch() -> dict:
    now = time.time()
    events = [
        {"v": 1, "kind": "step", "job": "llama-dash", "rank": r, "world_size": 4, "step": n, "ts": now - 60 + n,
         "duration_s": 0.5 + 0.01 * r, "tokens": 1000, "node": "node-a", "phases": {"forward": 0.2}}
        for r in range(4) for n in range(30)
    ]
    events += [
        {"v": 1, "kind": "request", "service": "chat", "model": "m1", "ts": now - 30 + i, "e2e_s": 0.5 + i / 100,
         "ttft_s": 0.1, "tpot_s": 0.01, "output_tokens": 40, "status": "ok", "node": "node-a"}
        for i in range(20)
    ]
    frames = [
        {"v": 1, "kind": "host", "node": node, "ts": now - 1, "cpu_utilization_ratio": 0.3, "memory_used_bytes": 2**33,
         "memory_total_bytes": 2**35, "gpus": [{"index": i, "uuid": f"GPU-{node}-{i}", "name": "H100",
                                                "utilization_ratio": 0.9, "temperature_celsius": 60.0 + i,
                                                "power_watts": 500.0, "xid_total": 2 if i == 3 else 0,
                                                "xid_counts": {"79": 2} if i == 3 else {}} for i in range(8)]}
        for node in ("node-a", "node-b")
    ]
    return {"v": 1, "agent_id": "seed", "seq": 0, "node": "node-a", "sent_ts": now, "events": events, "frames": frames}


@pytest.fixture(scope="module")
def collector_url(tmp_path_factory):
    yield from serve_collector(tmp_path_factory.mktemp("dash"), INGEST, READ, seed_batch())


def run_page(page: str, url: str, token: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("FLEETSCOPE_COLLECTOR_URL", url)
    monkeypatch.setenv("FLEETSCOPE_CONSOLE_REFRESH_S", "0")  # a test run must end
    monkeypatch.setenv("FLEETSCOPE_READ_TOKEN", token)
    at = AppTest.from_file(str(DASHBOARDS / page), default_timeout=30)
    at.run()
    return at


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page, collector_url, monkeypatch):
    at = run_page(page, collector_url, READ, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_fleet_page_counts_nodes_and_gpus(collector_url, monkeypatch):
    at = run_page("pages/1_Fleet.py", collector_url, READ, monkeypatch)
    assert metric(at, "Nodes") == "2" and metric(at, "GPUs") == "16" and metric(at, "GPUs unhealthy") == "0"
    nodes = at.dataframe[0].value
    assert sorted(nodes["node"].tolist()) == ["node-a", "node-b"]


def test_training_page_shows_the_job_and_its_ranks(collector_url, monkeypatch):
    at = run_page("pages/2_Training.py", collector_url, READ, monkeypatch)
    assert at.selectbox[0].value == "llama-dash"
    assert metric(at, "Ranks") == "4" and metric(at, "Last step") == "29"
    ranks = at.dataframe[0].value
    assert ranks["rank"].tolist() == [0, 1, 2, 3]
    assert ranks["step_time_p50_s"].tolist() == pytest.approx([0.5, 0.51, 0.52, 0.53])
    # goodput: 30 steps of 4 ranks a second apart (29.53 s), the other ranks waiting for rank 3 (0.53 s) each step
    assert metric(at, "Goodput") == f"{1 - 30 * (0.03 + 0.02 + 0.01) / (4 * 29.53):.1%}"
    spent = {r: h for r, h in zip(*at.dataframe[1].value[["reason", "gpu_hours"]].T.values)}
    assert spent["straggler_wait"] * 3600 == pytest.approx(30 * 0.06, rel=1e-3) and spent["hang"] == 0
    (incarnation,) = at.dataframe[2].value.to_dict("records")
    assert (incarnation["first_step"], incarnation["last_step"], incarnation["world_size"]) == (0, 29, 4)


def test_inference_page_shows_latency(collector_url, monkeypatch):
    at = run_page("pages/3_Inference.py", collector_url, READ, monkeypatch)
    assert metric(at, "TTFT p50") == "100.0 ms"


@pytest.mark.parametrize("page", PAGES)
def test_a_wrong_token_is_explained_not_crashed(page, collector_url, monkeypatch):
    at = run_page(page, collector_url, "not-the-token", monkeypatch)
    assert not at.exception
    assert any("FLEETSCOPE_READ_TOKEN" in e.value for e in at.error)


def test_an_unreachable_collector_is_explained(monkeypatch):
    at = run_page("pages/1_Fleet.py", f"http://127.0.0.1:{free_port()}", READ, monkeypatch)
    assert not at.exception
    assert any("cannot reach the collector" in e.value for e in at.error)


def test_findings_page_shows_a_straggler_with_its_cause(collector_url, monkeypatch):
    import httpx as _httpx

    from bench.traces import Trace, generate

    steps, _ = generate(Trace(job="slowjob", ranks=8, steps=40, slow_rank=3, slow_factor=0.2, start_ts=time.time() - 50))
    events = [{"v": 1, "kind": "step", "job": "slowjob", "rank": r["rank"], "world_size": 8, "step": r["step"], "ts": r["ts"],
               "duration_s": r["duration_s"], "node": r["node"], "metrics": {"sync_arrival_s": r["sync_arrival_s"]}}
              for r in steps.iter_rows(named=True)]
    body = {"v": 1, "agent_id": "findings-seed", "seq": 0, "node": "n", "sent_ts": time.time(), "events": events}
    assert _httpx.post(collector_url + "/v1/ingest", content=json.dumps(body), headers={"Authorization": f"Bearer {INGEST}"}).status_code == 200

    def shown():
        at = run_page("pages/4_Findings.py", collector_url, READ, monkeypatch)
        return at if any("straggler" in e.label and "rank 3" in e.label for e in at.expander) else None

    at = wait_until(shown, timeout=20, what="the straggler on the findings page")
    assert not at.exception


def test_node_page_shows_its_gpus_and_series(collector_url, monkeypatch):
    at = run_page("pages/5_Node.py", collector_url, READ, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox[0].value == "node-a"
    assert metric(at, "GPUs") == "8"
    # the reliability record: the XIDs GPU 3 counted, by code
    record = [t for t in at.dataframe if "XIDs by code" in t.value.columns][0].value
    assert list(record["XIDs by code"]) == ["", "", "", "79×2", "", "", "", ""]
