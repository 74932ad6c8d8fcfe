"""Pure polars analytics on small literal frames."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from collector.fleet import nodes_overview
from collector.inference import services_overview
from collector.rollups import as_gpu_samples, step_aggregates
from collector.tables import frame_from_rows
from collector.training import jobs_overview, step_series


def steps(rows):
    return frame_from_rows("steps", [{"failed": False, **r} for r in rows])


def test_step_series_spreads_across_ranks():
    frame = steps([
        {"job": "j", "rank": 0, "step": 0, "ts": 10.0, "duration_s": 1.0},
        {"job": "j", "rank": 1, "step": 0, "ts": 10.1, "duration_s": 3.0},
        {"job": "j", "rank": 0, "step": 1, "ts": 11.0, "duration_s": 2.0},
        {"job": "other", "rank": 0, "step": 0, "ts": 0.0, "duration_s": 9.0},
    ])
    got = step_series(step_aggregates(frame), "j")
    expected = pl.DataFrame(
        {"step": [0, 1], "ts": [10.0, 11.0], "ranks": [2, 1], "step_time_p50_s": [2.0, 2.0],
         "step_time_p95_s": [2.9, 2.0], "step_time_max_s": [3.0, 2.0], "incarnation": [0, 0]},
        schema_overrides={"ranks": pl.UInt32, "incarnation": pl.Int32},
    )
    assert_frame_equal(got, expected)


def test_tokens_per_second_is_null_when_no_tokens_were_reported():
    frame = steps([
        {"job": "a", "rank": 0, "step": 0, "ts": 0.0, "duration_s": 1.0, "tokens": 100},
        {"job": "a", "rank": 0, "step": 1, "ts": 1.0, "duration_s": 1.0, "tokens": 100},
        {"job": "b", "rank": 0, "step": 0, "ts": 0.0, "duration_s": 1.0},
    ])
    got = jobs_overview(step_aggregates(frame), frame).select("job", "tokens_per_s")
    assert_frame_equal(got, pl.DataFrame({"job": ["a", "b"], "tokens_per_s": [100.0, None]}))


def test_services_overview_counts_errors():
    frame = pl.DataFrame(
        {"ts": [1.0, 2.0, 3.0], "service": ["s"] * 3, "model": ["m"] * 3, "status": ["ok", "error", "ok"],
         "e2e_s": [1.0, 9.0, 3.0], "ttft_s": [0.1, None, 0.3], "node": ["n"] * 3},
    )
    got = services_overview(frame)
    assert got.row(0, named=True) | {"nodes": None} == {
        "service": "s", "model": "m", "requests": 3, "error_ratio": 1 / 3, "e2e_p50_s": 3.0, "ttft_p50_s": 0.2,
        "last_request_ts": 3.0, "nodes": None,
    }


def test_nodes_overview_uses_each_nodes_latest_frame():
    hosts = pl.DataFrame({"ts": [1.0, 2.0, 1.5], "node": ["a", "a", "b"], "gpu_count": [1, 1, 0], "agent_id": ["x"] * 3})
    gpus = pl.DataFrame({"ts": [1.0, 2.0], "node": ["a", "a"], "index": [0, 0], "utilization_ratio": [0.1, 0.9],
                         "temperature_celsius": [30.0, 80.0], "power_watts": [100.0, 600.0], "up": [True, True]})
    got = nodes_overview(hosts, gpus, now=10.0).select("node", "ts", "age_s", "gpu_utilization_mean_ratio", "gpus_down")
    expected = pl.DataFrame({"node": ["a", "b"], "ts": [2.0, 1.5], "age_s": [8.0, 8.5],
                             "gpu_utilization_mean_ratio": [0.9, None], "gpus_down": [0, None]},
                            schema_overrides={"gpus_down": pl.UInt32})
    assert_frame_equal(got, expected)


def test_rank_breakdown_means_each_phase_and_metric_per_rank():
    from collector.training import rank_breakdown

    frame = steps([
        {"job": "j", "rank": 0, "step": 0, "ts": 0.0, "duration_s": 1.0,
         "phases": [{"phase": "forward", "seconds": 0.2}, {"phase": "comm", "seconds": 0.5}],
         "metrics": [{"name": "sync_arrival_s", "value": 0.3}]},
        {"job": "j", "rank": 0, "step": 1, "ts": 1.0, "duration_s": 1.0,
         "phases": [{"phase": "forward", "seconds": 0.4}, {"phase": "comm", "seconds": 0.3}],
         "metrics": [{"name": "sync_arrival_s", "value": 0.5}]},
        {"job": "j", "rank": 1, "step": 0, "ts": 0.0, "duration_s": 1.0, "phases": [{"phase": "forward", "seconds": 0.7}]},
    ])
    got = rank_breakdown(frame, "j")
    rank0, rank1 = got.select("rank", "phase_forward_mean_s", "phase_comm_mean_s", "metric_sync_arrival_s_mean").rows()
    assert rank0 == pytest.approx((0, 0.3, 0.4, 0.4)) and rank1 == (1, 0.7, None, None)


def test_rank_breakdown_columns_come_in_a_fixed_order():
    """The phases in a step's order, then other phases and the metrics by name, whatever order the rows came in
    (the pivot's columns followed its groups' order, which varied from call to call)."""
    from collector.training import rank_breakdown

    rows = [{"job": "j", "rank": r, "step": s, "ts": float(s), "duration_s": 1.0,
             "phases": [{"phase": p, "seconds": 0.1} for p in ("optimizer", "zeta", "comm", "data", "alpha", "forward")],
             "metrics": [{"name": n, "value": 1.0} for n in ("b_metric", "a_metric")]}
            for r in range(40) for s in range(3)]
    want = ["rank", "phase_data_mean_s", "phase_forward_mean_s", "phase_optimizer_mean_s", "phase_comm_mean_s",
            "phase_alpha_mean_s", "phase_zeta_mean_s", "metric_a_metric_mean", "metric_b_metric_mean"]
    for order in (rows, rows[::-1], rows[1::2] + rows[::2]):
        for _ in range(3):
            assert rank_breakdown(steps(order), "j").columns == want


@pytest.mark.parametrize(
    "counts, q, expected",
    [
        ([0, 10, 10, 10], 0.5, 0.3),  # all in (0.1, 0.5]: halfway
        ([5, 10, 10, 10], 0.5, 0.1),
        ([0, 0, 0, 10], 0.99, 1.0),  # in the open bucket: the highest finite bound
        ([0, 0, 0, 0], 0.5, None),
    ],
)
def test_histogram_quantile_follows_prometheus(counts, q, expected):
    from collector.inference import histogram_quantile

    got = histogram_quantile([0.1, 0.5, 1.0, 1e300], counts, q)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_health_events_are_spans_of_trouble_and_new_xids():
    from collector.fleet import health_events

    base = {"node": "n", "uuid": "g", "up": True}
    rows = [
        {**base, "ts": 1.0, "index": 0, "health": "healthy", "health_reasons": [], "xid_total": 0},
        {**base, "ts": 2.0, "index": 0, "health": "degraded", "health_reasons": ["hw_thermal_slowdown"], "xid_total": 0},
        {**base, "ts": 3.0, "index": 0, "health": "degraded", "health_reasons": ["hw_thermal_slowdown"], "xid_total": 2},
        {**base, "ts": 4.0, "index": 0, "health": "healthy", "health_reasons": [], "xid_total": 2},
    ]
    events = health_events(as_gpu_samples(frame_from_rows("gpus", rows))).select("health", "reasons", "from_ts", "to_ts").rows()
    assert events == [("xid", "2 new XID(s)", 3.0, 3.0), ("degraded", "hw_thermal_slowdown", 2.0, 3.0)]


def test_rank_step_matrix_is_relative_to_the_steps_median():
    from collector.training import rank_step_matrix

    frame = steps([
        {"job": "j", "rank": r, "step": s, "ts": float(s), "duration_s": 2.0,
         "metrics": [{"name": "sync_arrival_s", "value": 1.5 if r == 2 else 1.0}]}
        for s in range(3) for r in range(3)
    ])
    got = rank_step_matrix(frame, "j", last=2)
    assert got["step"].unique().sort().to_list() == [1, 2]
    assert got.filter(pl.col("rank") == 2)["relative"].to_list() == [1.5, 1.5]


def test_a_job_timed_the_readme_way_still_shows_its_slow_rank_in_the_matrix_and_the_slowest_ranks():
    from bench.traces import Trace, generate
    from collector.training import rank_step_matrix, rank_step_quantiles, slowest_ranks

    frame, _ = generate(Trace(ranks=8, steps=30, slow_rank=6, instrument="readme"))
    cells = rank_step_matrix(frame, "trace", last=10)
    mean = cells.group_by("rank").agg(pl.col("relative").mean()).sort("relative", descending=True)
    assert mean["rank"][0] == 6 and 1.04 < mean["relative"][0] < 1.1 and mean["relative"][1] < 1.01
    assert slowest_ranks(rank_step_quantiles(frame, "trace"), 1)["rank"].to_list() == [6]


def test_health_events_count_xids_across_agent_restarts_and_inside_rollups():
    """A node's series reads minute rollups past the raw tier. GPU 0 (raw frames): XIDs 0 -> 2, then the agent
    restarts with 1 already counted (a drop: its whole value is new), a frame the agent could not read, then 2.
    GPU 1 (minute rollups): an XID and an agent restart inside its second minute leave its last value 0, as before,
    and only the increase within shows it. Differences of last values gave 2, nothing, 1 and nothing."""
    from collector.fleet import health_events
    from collector.rollups import rollup_gpu_samples

    base = {"node": "n", "up": True, "health": "healthy", "health_reasons": []}
    raw0 = [{**base, "uuid": "g0", "index": 0, "ts": 60.0 * i, "xid_total": x}
            for i, x in enumerate([0, 2, 1, None, 2])]
    raw1 = [{**base, "uuid": "g1", "index": 1, "ts": 120.0 + 10 * i, "xid_total": x}
            for i, x in enumerate([0] * 6 + [0, 1, 1, 0, 0, 0])]
    minutes = rollup_gpu_samples(as_gpu_samples(frame_from_rows("gpus", raw1)), 60.0)
    assert minutes.sort("ts")["xid_total"].to_list() == [0, 0]
    gpu0 = as_gpu_samples(frame_from_rows("gpus", raw0))
    frame = pl.concat([gpu0, minutes.select(gpu0.columns).cast(gpu0.schema)], how="vertical")  # type: ignore[arg-type]
    events = health_events(frame).select("index", "reasons", "from_ts").rows()
    assert events == [(0, "1 new XID(s)", 240.0), (1, "1 new XID(s)", 180.0), (0, "1 new XID(s)", 120.0),
                      (0, "2 new XID(s)", 60.0)]
