"""The console names the Slurm jobs of a training job and of an inference service run under Slurm (a live collector,
Streamlit AppTest)."""

from __future__ import annotations

import time

import pytest

from tests.dashboards.conftest import serve_collector
from tests.dashboards.test_pages import READ, run_page

INGEST = "dash-ingest"


def batch() -> dict:
    now = time.time()
    events = []
    for slurm, first, t in (({"job": "100", "step": "0", "user": "alice", "partition": "gpu"}, 0, now - 120),
                            ({"job": "205", "step": "0", "user": "alice", "partition": "gpu-long"}, 10, now - 60)):
        events += [{"v": 1, "kind": "step", "job": "llm-slurm", "rank": r, "world_size": 2, "step": first + n,
                    "ts": t + n, "duration_s": 0.5, "node": "node-a", "pid": 1000 * first + r + 1, "slurm": slurm}
                   for r in range(2) for n in range(20)]
    # a vLLM server started by sbatch: its requests name its Slurm job
    events += [{"v": 1, "kind": "request", "service": "chat-slurm", "model": "llama", "ts": now - 30 + i, "e2e_s": 0.4,
                "node": "node-b", "pid": 9, "slurm": {"job": "300", "step": "0", "user": "bob", "partition": "serve"}}
               for i in range(10)]
    return {"v": 1, "agent_id": "seed", "seq": 0, "node": "node-a", "sent_ts": now, "events": events}


@pytest.fixture(scope="module")
def collector_url(tmp_path_factory):
    yield from serve_collector(tmp_path_factory.mktemp("slurm"), INGEST, READ, batch())


def test_the_training_page_shows_the_slurm_jobs_of_the_job(collector_url, monkeypatch):
    at = run_page("pages/2_Training.py", collector_url, READ, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert any("Slurm job **205**" in c.value and "user alice" in c.value for c in at.caption)
    table = at.dataframe[-1].value
    assert table["slurm_job"].tolist() == ["100", "205"]
    assert table["partition"].tolist() == ["gpu", "gpu-long"] and table["user"].tolist() == ["alice", "alice"]


def test_the_inference_page_shows_the_slurm_jobs_of_the_service(collector_url, monkeypatch):
    at = run_page("pages/3_Inference.py", collector_url, READ, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    assert "Slurm" in [s.value for s in at.subheader]
    (table,) = [d.value for d in at.dataframe if "slurm_job" in d.value.columns]
    assert table["slurm_job"].tolist() == ["300"] and table["user"].tolist() == ["bob"]
    assert table["nodes"].tolist() == ["node-b"] and table["steps"].tolist() == ["0"]
