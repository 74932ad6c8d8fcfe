"""The hot tier: trims, rollups and aggregates that replace old rows, the memory budget, and reads that
go to the warm tier for what the hot tier no longer holds."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest

from collector import history
from collector.hot import MIN_STEPS, STEPS_SHARE, HotTier
from collector.rollups import step_aggregates
from collector.store import Store
from collector.tables import batch_frames
from collector.training import STRAGGLER_WINDOW, WARMUP_STEPS, straggler_scores, stragglers
from fleetscope.schema import decode_batch

NOW = time.time()


@pytest.fixture(autouse=True)
def now():
    """NOW as each test starts: a store trims what is older than its windows by the clock, and the whole suite
    runs this module minutes after importing it."""
    global NOW
    NOW = time.time()
    return NOW


def frames_batch(seq: int, t0: float, seconds: float, *, nodes: int = 2, gpus: int = 4, every: float = 5.0,
                 hot_gpu: str | None = None, xid_at: float | None = None):
    frames = []
    ts = t0
    while ts < t0 + seconds:
        for n in range(nodes):
            frames.append({"v": 1, "kind": "host", "node": f"n{n}", "ts": ts, "cpu_utilization_ratio": 0.5,
                           "network_receive_bytes_total": 1000.0 * ts, "gpus": [
                {"index": i, "uuid": f"GPU-{n}-{i}", "utilization_ratio": 0.9, "temperature_celsius": 60.0,
                 "sm_clock_hertz": 1.5e9, "sm_clock_max_hertz": 2e9,
                 "clock_event_mask": 0x40 if f"GPU-{n}-{i}" == hot_gpu else 0,
                 "health": "degraded" if f"GPU-{n}-{i}" == hot_gpu else "healthy",
                 "xid_total": int(xid_at is not None and ts >= xid_at and f"GPU-{n}-{i}" == hot_gpu),
                 "xid_counts": {"79": 1} if xid_at is not None and ts >= xid_at and f"GPU-{n}-{i}" == hot_gpu else {}}
                for i in range(gpus)]})
        ts += every
    body = json.dumps({"v": 1, "agent_id": "a", "seq": seq, "node": "n0", "sent_ts": t0, "frames": frames}).encode()
    return decode_batch(body), body


def test_raw_frames_age_into_minute_rollups_and_the_latest_view_stays():
    hot = HotTier(window_s=3600, raw_s=120)
    b, _ = frames_batch(0, NOW - 600, 600)
    hot.append(batch_frames(b))
    hot.maintain(NOW)
    raw, rolled = hot.raw("gpus"), hot.raw("gpus_1m")
    assert raw["ts"].min() >= NOW - 180  # raw kept for raw_s (and until rolled up)
    assert rolled.height > 0 and rolled["samples"].max() == 12  # 12 samples of 5 s in a minute
    assert hot.latest("gpus").height == 8 and hot.latest("hosts").height == 2
    samples = hot.samples("gpus", NOW - 600, NOW, ("uuid", ["GPU-0-0"]))
    # every minute covered once: rollups before the raw rows, raw rows after
    assert samples["samples"].sum() == pytest.approx(120, abs=2)


def test_each_rank_keeps_its_recent_steps_and_every_step_keeps_its_aggregate():
    hot = HotTier(window_s=3600, raw_steps=20)
    events = [{"v": 1, "kind": "step", "job": "j", "rank": r, "world_size": 4, "step": s, "ts": NOW - 200 + s,
               "duration_s": 1.0 + r / 10} for s in range(100) for r in range(4)]
    b = decode_batch(json.dumps({"v": 1, "agent_id": "a", "seq": 0, "node": "n", "sent_ts": NOW, "events": events}).encode())
    frames = batch_frames(b)
    hot.append(frames)
    hot.maintain(NOW)
    assert hot.raw("steps").height == 80  # 20 per rank
    aggs = hot.step_aggs()
    assert aggs.height == 100 and aggs["ranks"].min() == 4
    expected = step_aggregates(frames["steps"]).sort("step")
    assert aggs["step_time_p50_s"].to_list() == expected["step_time_p50_s"].to_list()
    final, _ = hot.take_unwritten()
    assert final["step_aggs"][0].height == 80  # the steps that left the raw tier go to disk, once


def test_each_rank_keeps_exactly_its_latest_steps_when_many_share_a_timestamp():
    """The trim selects each rank's latest rows before it ranks them: rows tied at the cut-off ts must not make a rank
    keep more (or fewer) than raw_steps, and a rank with fewer keeps all of its own."""
    hot = HotTier(window_s=3600, raw_steps=20)
    events = [{"v": 1, "kind": "step", "job": "j", "rank": r, "world_size": 3, "step": s, "ts": NOW - 100 + s // 10,
               "duration_s": 1.0} for s in range(95) for r in range(2)]  # ten steps a second: ties at every ts
    events += [{"v": 1, "kind": "step", "job": "j", "rank": 2, "world_size": 3, "step": s, "ts": NOW - 100 + s,
                "duration_s": 1.0} for s in range(5)]
    hot.append(batch_frames(decode_batch(json.dumps({"v": 1, "agent_id": "a", "seq": 0, "node": "n", "sent_ts": NOW,
                                                     "events": events}).encode())))
    hot.maintain(NOW)
    raw = hot.raw("steps")
    assert raw.group_by("rank").len().sort("rank")["len"].to_list() == [20, 20, 5]
    for rank in (0, 1):  # the latest: steps 75-94 (ts of 85-94 beat 75-84's; all of them beat the rest)
        assert sorted(raw.filter(pl.col("rank") == rank)["step"].to_list())[-10:] == list(range(85, 95))
        assert raw.filter(pl.col("rank") == rank)["ts"].min() >= NOW - 100 + 7


def _steps_frames(ranks: int, steps: int, slow_rank: int | None = None) -> dict[str, pl.DataFrame]:
    events = [{"v": 1, "kind": "step", "job": "j", "rank": r, "world_size": ranks, "step": s, "ts": NOW - 300 + s,
               "duration_s": 1.3 if r == slow_rank else 1.0 + (r % 7) / 100,
               "phases": {"forward": 0.4, "backward": 0.5 if r != slow_rank else 0.8, "comm": 0.1}}
              for s in range(steps) for r in range(ranks)]
    return batch_frames(decode_batch(json.dumps({"v": 1, "agent_id": "a", "seq": 0, "node": "n", "sent_ts": NOW,
                                                 "events": events}).encode()))


def test_past_their_share_of_the_budget_each_rank_keeps_fewer_steps_but_never_fewer_than_the_detectors_read():
    """At a large job's rank count raw_steps steps a rank outgrow the hot tier: each rank keeps as many as fit in the
    steps' share, the same for every rank, and never fewer than MIN_STEPS, with which a straggler is still found."""
    frames = _steps_frames(ranks=48, steps=100, slow_rank=5)
    per_row = frames["steps"].estimated_size() / frames["steps"].height
    unbounded = HotTier(window_s=3600, raw_steps=80)
    unbounded.append(frames)
    unbounded.maintain(NOW)
    assert unbounded.raw("steps").height == 48 * 80 and unbounded.steps_per_rank == 80

    # a budget whose steps' share holds 50 a rank
    hot = HotTier(window_s=3600, raw_steps=80, budget_bytes=int(48 * 50 * per_row / STEPS_SHARE))
    hot.append(frames)
    hot.maintain(NOW)
    counts = hot.raw("steps").group_by("rank").len()["len"]
    assert 45 <= hot.steps_per_rank <= 50 and counts.min() == counts.max() == hot.steps_per_rank
    assert hot.memory()["steps"] <= STEPS_SHARE * hot.budget_bytes
    assert sorted(hot.raw("steps").filter(pl.col("rank") == 0)["step"].to_list()) == list(range(100 - hot.steps_per_rank, 100))

    # a budget far too small: the floor, and the detectors still name the slow rank from it
    tiny = HotTier(window_s=3600, raw_steps=80, budget_bytes=2**16)
    tiny.append(frames)
    tiny.maintain(NOW)
    assert tiny.steps_per_rank == MIN_STEPS and tiny.raw("steps").height == 48 * MIN_STEPS
    assert MIN_STEPS >= WARMUP_STEPS + STRAGGLER_WINDOW
    found = stragglers(straggler_scores(tiny.raw("steps")))
    assert found["rank"].to_list() == [5]


def test_merging_step_aggregates_keeps_the_recount_from_the_most_ranks_then_the_latest_end():
    """The upsert looks only at the old rows from the new ones' lowest step on; it must give what sorting the whole
    table gives, whichever old rows the new keys hit (none, some, all; null keys; several jobs and incarnations)."""
    import random

    from collector.rollups import STEP_KEY, merge_step_aggregates

    def reference(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
        if new.height == 0 or old.height == 0:
            return new if old.height == 0 else old
        return pl.concat([old, new]).sort("ranks", "end_ts").unique(list(STEP_KEY), keep="last", maintain_order=False)

    rng = random.Random(3)
    schema = {"job": pl.String, "incarnation": pl.Int32, "step": pl.Int64, "end_ts": pl.Float64, "ranks": pl.Int32}

    def aggs(n: int, lo: int, hi: int) -> pl.DataFrame:
        rows = [{"job": rng.choice("ab"), "incarnation": rng.choice([0, 1, None]), "step": rng.randrange(lo, hi),
                 "end_ts": rng.random(), "ranks": rng.randrange(1, 4)} for _ in range(n)]
        return pl.DataFrame(rows, schema=schema).unique(list(STEP_KEY), keep="first").with_columns(
            pl.lit(rng.random()).alias("which"))

    hits = 0
    for trial in range(300):
        old, new = aggs(rng.randrange(0, 40), 0, 30), aggs(rng.randrange(0, 20), rng.randrange(0, 30), 40)
        want = reference(old, new).sort(list(STEP_KEY), nulls_last=True)
        got = merge_step_aggregates(old, new).sort(list(STEP_KEY), nulls_last=True)
        assert got.equals(want), trial
        hits += old.join(new, on=list(STEP_KEY), how="semi").height > 0
    assert 50 < hits < 290  # both ways through the upsert were taken


def test_a_step_whose_ranks_come_across_upkeep_passes_is_aggregated_over_all_of_them():
    hot = HotTier(window_s=3600, raw_steps=20)

    def batch(seq: int, ranks: range, steps: range):
        events = [{"v": 1, "kind": "step", "job": "j", "rank": r, "world_size": 4, "step": s, "ts": NOW - 200 + s,
                   "duration_s": 1.0 + r / 10} for s in steps for r in ranks]
        return batch_frames(decode_batch(json.dumps({"v": 1, "agent_id": "a", "seq": seq, "node": "n", "sent_ts": NOW,
                                                     "events": events}).encode()))

    hot.append(batch(0, range(0, 2), range(10)))  # ranks 0-1 of steps 0-9, then a pass
    hot.maintain(NOW)
    hot.append(batch(1, range(2, 4), range(10)))  # ranks 2-3 of the same steps, and more steps, next pass
    hot.append(batch(2, range(4), range(10, 15)))
    hot.maintain(NOW)
    aggs = hot.step_aggs().sort("step")
    assert aggs["step"].to_list() == list(range(15)) and aggs["ranks"].to_list() == [4] * 15
    assert aggs["step_time_max_s"].to_list() == pytest.approx([1.3] * 15)


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_the_hot_tier_stays_within_its_budget_by_dropping_its_oldest_minutes():
    budget = 2**20
    hot = HotTier(window_s=6 * 3600, raw_s=300, budget_bytes=budget)
    for hour in range(6):
        b, _ = frames_batch(hour, NOW - 6 * 3600 + hour * 3600, 3600, nodes=8, gpus=8, every=10)
        hot.append(batch_frames(b))
        hot.maintain(NOW - 5 * 3600 + hour * 3600)
    hot.maintain(NOW)
    sizes = hot.memory()
    assert sum(v for k, v in sizes.items() if k != "rollups_unwritten") <= budget
    assert hot.held_since["gpus_1m"] > NOW - 6 * 3600 + 60  # rollups now start later than the window


def _store(tmp_path, **kw) -> Store:
    return Store(tmp_path, window_s=kw.pop("window_s", 900), raw_s=kw.pop("raw_s", 120), **kw)


def test_a_history_query_past_the_hot_tier_reads_the_warm_tier(tmp_path):
    s = _store(tmp_path)
    b, body = frames_batch(0, NOW - 3 * 3600, 3 * 3600, every=15, hot_gpu="GPU-1-2", xid_at=NOW - 2 * 3600)
    s.ingest(b, body)
    s.hot.maintain(NOW)
    s.checkpoint()
    assert s.hot.complete_since("gpus") > NOW - 1200  # the hot tier holds only its 15 minutes
    gpu = history.samples(s, "gpus", NOW - 3 * 3600, NOW, ("uuid", ["GPU-1-2"]))
    assert gpu["ts"].min() < NOW - 3 * 3600 + 120  # from the warm tier's minute rollups
    (record,) = history.gpu_reliability(gpu)
    assert record["xids_by_code"] == {"79": 1}
    assert record["throttle_seconds"]["thermal_slowdown"] == pytest.approx(3 * 3600, rel=0.02)
    assert record["degraded_seconds"] == pytest.approx(3 * 3600, rel=0.02)
    other = history.gpu_reliability(history.samples(s, "gpus", NOW - 3 * 3600, NOW, ("uuid", ["GPU-0-0"])))[0]
    assert other["throttle_seconds"]["thermal_slowdown"] == 0 and other["xids_by_code"] == {}
    # and the same after a restart, which reads back only the hot tier's rows
    del s
    again = _store(tmp_path)
    assert again.hot.raw("gpus")["ts"].min() >= NOW - 1200
    (after,) = history.gpu_reliability(history.samples(again, "gpus", NOW - 3 * 3600, NOW, ("uuid", ["GPU-1-2"])))
    assert after["xids_by_code"] == {"79": 1}
    assert after["throttle_seconds"]["thermal_slowdown"] == pytest.approx(record["throttle_seconds"]["thermal_slowdown"], rel=0.01)


def test_restart_reads_back_the_hot_tier_only(tmp_path):
    s = _store(tmp_path, window_s=1800)
    old, body = frames_batch(0, NOW - 4 * 3600, 3600, every=30)
    s.ingest(old, body)
    recent, body = frames_batch(1, NOW - 300, 300, every=30)
    s.ingest(recent, body)
    s.hot.maintain(NOW)
    s.checkpoint()
    del s
    again = _store(tmp_path, window_s=1800)
    assert again.hot.raw("gpus")["ts"].min() >= NOW - 300
    assert again.hot.raw("gpus_1m")["ts"].min() >= NOW - 1800 - 60
    assert again.scan("gpus", NOW - 5 * 3600).collect().height == 8 * (120 + 10)  # all of it still on disk


def test_closed_hours_are_rolled_up_again_and_long_ranges_read_the_hourly_tier(tmp_path):
    s = _store(tmp_path)
    b, body = frames_batch(0, NOW - 5 * 3600, 5 * 3600, every=30, hot_gpu="GPU-1-2", xid_at=NOW - 4 * 3600)
    s.ingest(b, body)
    s.hot.maintain(NOW)
    s.checkpoint()
    from collector import partitions
    on_disk = partitions.scan(tmp_path, "gpus_1h", s.committed_segment()).collect()
    assert on_disk.filter(pl.col("uuid") == "GPU-1-2")["samples"].sum() >= 4 * 120  # four closed hours at least
    coarse = history.samples(s, "gpus", NOW - 5 * 3600, NOW, ("uuid", ["GPU-1-2"]), max_points=4)
    fine = history.samples(s, "gpus", NOW - 5 * 3600, NOW, ("uuid", ["GPU-1-2"]), max_points=1000)
    assert coarse.height < fine.height / 3
    (a,), (b_,) = history.gpu_reliability(coarse), history.gpu_reliability(fine)
    assert a["xids_by_code"] == b_["xids_by_code"] == {"79": 1}
    assert a["throttle_seconds"]["thermal_slowdown"] == pytest.approx(b_["throttle_seconds"]["thermal_slowdown"], rel=0.02)


def test_the_latest_view_is_each_gpu_s_newest_row_whatever_order_its_frames_came_in():
    """The newest frame of each GPU and node, from the last pass's and the fresh ones: a frame that came late (older
    than one already seen) never replaces the newer, and of two with the same time the one that came last counts."""
    hot = HotTier(window_s=3600, raw_s=300)
    b, _ = frames_batch(0, NOW - 60, 30)
    hot.append(batch_frames(b))
    hot.maintain(NOW)  # the latest view as of this pass: the frames at NOW - 35
    late, _ = frames_batch(1, NOW - 100, 10)  # late frames, older than those seen
    newer, _ = frames_batch(2, NOW - 20, 10, hot_gpu="GPU-1-2")  # NOW - 20 and NOW - 15
    again = batch_frames(frames_batch(3, NOW - 15, 5)[0])  # the same time as the newest, a healthy GPU-1-2 now
    hot.append(batch_frames(late))
    hot.append(batch_frames(newer))
    hot.append(again)
    for view in (lambda: hot.latest("gpus"), lambda: (hot.maintain(NOW), hot.latest("gpus"))[1]):
        gpus = view()  # from the fresh rows, then as the next pass keeps it
        assert gpus.height == 8 and set(gpus["ts"].to_list()) == {NOW - 15}
        assert gpus.filter(pl.col("uuid") == "GPU-1-2")["health"].to_list() == ["healthy"]
        assert hot.latest("hosts").height == 2 and set(hot.latest("hosts")["ts"].to_list()) == {NOW - 15}


def test_a_trim_gathers_the_kept_rows_chunk_by_chunk_and_keeps_whole_chunks_as_they_are():
    """The step trim keeps each rank's latest rows: the oldest chunks lose rows, the newer ones are kept whole, and a
    chunk kept whole is the same frame (not a copy of it, beside the old table, as gathering into one made)."""
    from collector.hot import _gather

    chunks = [pl.DataFrame({"ts": [float(i) for i in range(k * 60_000, (k + 1) * 60_000)], "rank": list(range(60_000))})
              for k in range(3)]
    whole = pl.concat(chunks)
    place = whole.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"), "ts").filter(
        (pl.col("ts") % 7 != 0) | (pl.col("ts") >= 60_000)).get_column("row")
    out = _gather(chunks, place)
    assert pl.concat(out).equals(whole[place])
    assert out[-2] is chunks[1] and out[-1] is chunks[2] and out[0].height == 60_000 - 60_000 // 7 - 1
    assert _gather(chunks, place.clear()) == []
