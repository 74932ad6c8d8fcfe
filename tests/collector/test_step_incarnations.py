"""A job that restarts from a checkpoint and re-runs steps the hot tier still holds: its per-step
aggregates are kept per incarnation, and the step-time series shows each step's latest run (with its
own ranks and timings), never the two runs merged into one row of twice the ranks."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.rollups import merge_step_aggregates, step_aggregates
from collector.training import step_series
from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready

T0 = float(int(time.time()) - 900)


def run(first: int, last: int, t: float, pid: int, duration: float, **first_fields) -> list[dict]:
    out = []
    for i, n in enumerate(range(first, last + 1)):
        for rank in (0, 1):
            event = {"v": 1, "kind": "step", "job": "llm", "rank": rank, "world_size": 2, "step": n,
                     "ts": t + i * duration, "duration_s": duration, "pid": pid + rank, "tokens": 100}
            out.append({**event, **first_fields} if i == 0 else event)
    return out


# Steps 0..99 at 1 s each, then the job restarts from its step-60 checkpoint in new processes and runs
# 60..119 at 2 s each: steps 60..99 ran twice, and both runs are in each rank's last 120 raw steps.
EVENTS = run(0, 99, T0, 100, 1.0) + run(60, 119, T0 + 150, 300, 2.0, restored_step=60)


def check_series(steps: list[dict]) -> None:
    assert [s["step"] for s in steps] == list(range(120))
    assert {s["ranks"] for s in steps} == {2}  # never both runs' ranks in one row
    assert all(s["step_time_p50_s"] == 1.0 and s["incarnation"] == 0 for s in steps[:60])
    assert all(s["step_time_p50_s"] == 2.0 and s["incarnation"] == 1 for s in steps[60:])  # the latest run only


def test_re_run_steps_are_a_new_incarnation_in_the_series_the_job_and_the_warm_tier(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        assert post(client, batch(0, EVENTS)).status_code == 200
        fresh = client.get("/v1/jobs/llm/steps", headers=R).json()["steps"]  # before any upkeep: the fresh rows
        store = client.app.state.store
        store.maintain_hot()  # each rank's last 120 raw steps stay; the aggregates of steps 0..39 are final
        aggs = store.hot.step_aggs()
        hot = client.get("/v1/jobs/llm/steps", headers=R).json()["steps"]
        detail = client.get("/v1/jobs/llm", headers=R).json()
        job = detail["job"]
        listed = client.get("/v1/jobs", headers=R).json()["jobs"][0]
        cells = client.get("/v1/jobs/llm/matrix", params={"last": 120}, headers=R).json()["cells"]
        store.checkpoint()  # the final aggregates go to the warm tier
        ranged = client.get("/v1/jobs/llm/steps", params={"since": T0 - 60}, headers=R).json()["steps"]
    # Both runs are kept, one row per run of a step.
    assert aggs.height == 160 and set(aggs["ranks"].to_list()) == {2}
    assert aggs.filter(aggs["incarnation"] == 1)["step"].to_list() == list(range(60, 120))
    for steps in (fresh, hot, ranged):
        check_series(steps)
    assert job["last_step"] == listed["last_step"] == 119 and job["ranks"] == 2
    assert job["step_events"] == 2 * 160  # every step event counts, the re-run ones too
    # Per rank, a re-run step counts once, by its latest run: steps 40..119 held, 60..119 at 2 s.
    assert [(r["rank"], r["steps"], r["last_step"]) for r in detail["ranks"]] == [(0, 80, 119), (1, 80, 119)]
    assert {r["step_time_p50_s"] for r in detail["ranks"]} == {2.0}
    assert sorted((c["step"], c["rank"]) for c in cells) == [(n, r) for n in range(40, 120) for r in (0, 1)]  # the raw steps held

    with TestClient(create_app(settings(tmp_path))) as client:  # warm tier and hot tier read back
        wait_ready(client)
        again = client.get("/v1/jobs/llm/steps", headers=R).json()["steps"]
        ranged_again = client.get("/v1/jobs/llm/steps", params={"since": T0 - 60}, headers=R).json()["steps"]
        rows = client.app.state.store.hot.raw("steps")
    check_series(again)
    check_series(ranged_again)
    assert set(rows.filter(rows["step"] >= 100)["incarnation"].to_list()) == {1}  # the rows keep their incarnation


def test_a_recount_from_fewer_ranks_never_replaces_the_same_run_but_a_later_run_always_does():
    import polars as pl

    from collector.tables import batch_frames
    from fleetscope.schema import decode_batch

    def frame(events: list[dict], inc: int) -> pl.DataFrame:
        body = {"v": 1, "agent_id": "a", "seq": 0, "node": "n", "sent_ts": T0, "events": events, "frames": []}
        return batch_frames(decode_batch(__import__("json").dumps(body).encode()))["steps"].with_columns(
            pl.lit(inc, pl.Int32).alias("incarnation"))

    both = step_aggregates(frame(run(0, 9, T0, 100, 1.0), 0))
    one_rank = step_aggregates(frame([e for e in run(0, 9, T0, 100, 1.0) if e["rank"] == 0], 0))
    assert merge_step_aggregates(both, one_rank)["ranks"].to_list() == [2] * 10
    rerun = step_aggregates(frame([e for e in run(5, 9, T0 + 50, 300, 2.0) if e["rank"] == 0], 1))
    series = step_series(merge_step_aggregates(both, rerun), "llm")
    assert series["ranks"].to_list() == [2] * 5 + [1] * 5  # step 5..9's new run, as far as it has been reported
    assert series["step_time_p50_s"].to_list() == pytest.approx([1.0] * 5 + [2.0] * 5)
