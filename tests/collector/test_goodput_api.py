"""GET /v1/jobs/{job}/goodput through the real app: a job that restarted, from ingest to the answer, and
the same answer after the collector restarts; its metrics on /metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready

T0 = float(int(__import__("time").time()) - 900)


def steps(first: int, last: int, t: float, pid: int, **first_fields) -> list[dict]:
    out = []
    for i, n in enumerate(range(first, last + 1)):
        for rank in (0, 1):
            event = {"v": 1, "kind": "step", "job": "llm", "rank": rank, "world_size": 2, "step": n,
                     "ts": t + i, "duration_s": 1.0, "pid": pid + rank}
            out.append({**event, **first_fields} if i == 0 else event)
    return out


EVENTS = (steps(0, 99, T0, 100, process_start_ts=T0 - 20)
          + [{"v": 1, "kind": "pause", "job": "llm", "rank": 0, "world_size": 2, "reason": "checkpoint", "phase": "end",
              "ts": T0 + 100 + 5, "duration_s": 5.0}]
          + steps(60, 119, T0 + 200, 300, process_start_ts=T0 + 160, restored_step=60))


def test_a_restarted_job_answers_its_goodput_and_keeps_it_across_a_collector_restart(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        assert post(client, batch(0, EVENTS)).status_code == 200
        body = client.get("/v1/jobs/llm/goodput", headers=R).json()
        metrics = client.get("/metrics", headers=R).text
        assert client.get("/v1/jobs/nope/goodput", headers=R).status_code == 404
        assert client.get("/v1/jobs/llm/goodput").status_code == 401
    # 2 ranks: start-up 20 s, steps 0..59 kept, 60..99 recomputed, a 5 s checkpoint, then 95 s until the new
    # process (started at +160) reached its first step at +200, and 60 steps kept.
    assert body["gpu_seconds"] == pytest.approx({
        "productive": 2 * 120, "recomputed": 2 * 40, "checkpoint": 2 * 5, "startup": 2 * (20 + 55 + 40),
        "hang": 0, "pause": 0, "data_stall": 0, "straggler_wait": 0})
    assert body["total_gpu_seconds"] == pytest.approx(2 * 280)
    assert body["goodput_ratio"] == pytest.approx(120 / 280)
    incs = body["incarnations"]
    assert [(i["number"], i["first_step"], i["last_step"], i["restored_from_step"], i["pids"]) for i in incs] == [
        (0, 0, 99, None, 2), (1, 60, 119, 60, 2)]
    assert incs[1]["start_ts"] == pytest.approx(T0 + 160) and incs[1]["first_step_ts"] == pytest.approx(T0 + 200)
    assert sum(b["recomputed"] for b in body["over_time"]) == pytest.approx(80)
    assert 'fleetscope_training_goodput_ratio{training_job="llm"} 0.428571' in metrics
    assert 'fleetscope_training_badput_seconds_total{reason="recomputed",training_job="llm"} 80.0' in metrics

    with TestClient(create_app(settings(tmp_path))) as client:  # the ledger comes back from the checkpoint
        wait_ready(client)
        again = client.get("/v1/jobs/llm/goodput", headers=R).json()
        within = client.get("/v1/jobs/llm/goodput", params={"since": T0 + 200, "until": T0 + 260}, headers=R).json()
    assert again["gpu_seconds"] == pytest.approx(body["gpu_seconds"])
    assert within["gpu_seconds"]["productive"] == pytest.approx(2 * 60) and within["total_gpu_seconds"] == pytest.approx(120)
    assert [i["number"] for i in within["incarnations"]] == [1]
