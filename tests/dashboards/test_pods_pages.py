"""The console names the pod of each training rank and inference replica on Kubernetes (a live collector, AppTest)."""

from __future__ import annotations

import time

import pytest

from tests.dashboards.conftest import serve_collector
from tests.dashboards.test_pages import READ, run_page

INGEST = "dash-ingest"


def batch() -> dict:
    now = time.time()
    events = [{"v": 1, "kind": "step", "job": "llm-k8s", "rank": r, "world_size": 2, "step": n, "ts": now - 60 + n,
               "duration_s": 0.5, "node": "node-a", "pid": r + 1,
               "pod": {"namespace": "training", "pod": f"llm-worker-{r}", "container": "trainer", "verified": r == 0}}
              for r in range(2) for n in range(20)]
    events += [{"v": 1, "kind": "request", "service": "chat-k8s", "model": "llama", "ts": now - 30 + i, "e2e_s": 0.4,
                "node": "node-a", "pid": 9, "pod": {"namespace": "serving", "pod": "vllm-0", "verified": True}}
               for i in range(10)]
    return {"v": 1, "agent_id": "seed", "seq": 0, "node": "node-a", "sent_ts": now, "events": events}


@pytest.fixture(scope="module")
def collector_url(tmp_path_factory):
    yield from serve_collector(tmp_path_factory.mktemp("pods"), INGEST, READ, batch())


def test_the_training_page_s_ranks_table_names_each_rank_s_pod(collector_url, monkeypatch):
    at = run_page("pages/2_Training.py", collector_url, READ, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    (ranks,) = [d.value for d in at.dataframe if {"rank", "pod"} <= set(d.value.columns)]
    assert ranks.sort_values("rank")["pod"].tolist() == ["llm-worker-0", "llm-worker-1"]
    assert ranks.sort_values("rank")["verified"].tolist() == [True, False]


def test_the_inference_page_lists_the_replicas_with_their_pods(collector_url, monkeypatch):
    at = run_page("pages/3_Inference.py", collector_url, READ, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert "Replicas" in [s.value for s in at.subheader]
    (replicas,) = [d.value for d in at.dataframe if "pod" in d.value.columns]
    assert replicas["pod"].tolist() == ["vllm-0"] and replicas["namespace"].tolist() == ["serving"]
    assert replicas["requests"].tolist() == [10]
