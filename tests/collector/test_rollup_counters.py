"""GPU counters in rollups (collector/rollups.py, GPU_SPAN): XIDs and ECC errors count since their source (the agent,
the driver) started, and restart from 0 with it. A rollup keeps each counter's first value and its increase within
its span beside its last value, so that what was counted before a restart within a minute or an hour is not lost:
a minute from raw rows, an hour from minutes (restarts between and within them), and the reliability record over
rows written before these columns were kept (files without them) followed by rows that keep them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest

from collector import history
from collector.rollups import GPU_SPAN, as_gpu_samples, rollup_gpu_samples
from collector.store import Store
from collector.tables import SCHEMAS
from fleetscope.schema import decode_batch

T0 = 1_700_000_040.0  # on a minute
H0 = 1_700_002_800.0  # on an hour


def raw(rows: list[dict]) -> pl.DataFrame:
    """Raw GPU frames (the gpus table) of GPU-a unless a row says otherwise; XID counts as JSON as ingest keeps them
    (null when none)."""
    out = []
    for r in rows:
        counts = r.get("xid_counts")
        out.append({"node": "n0", "index": 0, "uuid": "GPU-a", "up": True, "health": "healthy", **r,
                    "xid_counts": json.dumps(counts, separators=(",", ":")) if counts else None})
    frame = pl.DataFrame(out)
    return frame.select(pl.col(c) if c in frame.columns else pl.lit(None).alias(c) for c in SCHEMAS["gpus"]).cast(
        SCHEMAS["gpus"])  # type: ignore[arg-type]


def counters(row: dict) -> dict:
    return {c: row[c] for c in ("xid_total", "xid_total_first", "xid_total_within", "xid_counts", "xid_counts_first",
                                "xid_counts_within", "ecc_corrected_total", "ecc_corrected_total_first",
                                "ecc_corrected_total_within", "ecc_uncorrected_total", "ecc_uncorrected_total_first",
                                "ecc_uncorrected_total_within")}


def as_dicts(frame: pl.DataFrame) -> list[dict]:
    return frame.with_columns(pl.col(pl.Categorical).cast(pl.String)).to_dicts()


def test_a_minute_keeps_what_was_counted_before_an_agent_restart_within_it():
    """XID 79 counted, then the agent restarts within the minute (its counts from none again): the last value is 0,
    as before the minute, and only the increase within says there was one. The ECC counters restart with the
    driver: a drop to 1 is 1 new error, not -102. A sample without a value (off the bus) is skipped."""
    rows = raw([
        {"ts": T0, "xid_total": 0, "ecc_corrected_total": 100, "ecc_uncorrected_total": 5},
        {"ts": T0 + 10, "xid_total": 1, "xid_counts": {"79": 1}, "ecc_corrected_total": 103,
         "ecc_uncorrected_total": 6},
        {"ts": T0 + 20, "xid_total": 1, "xid_counts": {"79": 1}},  # off the bus: no ECC counts
        {"ts": T0 + 30, "xid_total": 0, "ecc_corrected_total": 1, "ecc_uncorrected_total": 0},  # the agent restarted
        {"ts": T0 + 40, "xid_total": 0, "ecc_corrected_total": 2, "ecc_uncorrected_total": 0},
        {"ts": T0 + 50, "uuid": "GPU-b", "xid_total": 2, "xid_counts": {"48": 2}, "ecc_corrected_total": 7,
         "ecc_uncorrected_total": 0},
    ])
    a, b = as_dicts(rollup_gpu_samples(as_gpu_samples(rows), 60.0).sort("uuid"))
    assert a["ts"] == T0 and a["samples"] == 5
    assert counters(a) == {
        "xid_total": 0, "xid_total_first": 0, "xid_total_within": 1,
        "xid_counts": None, "xid_counts_first": None, "xid_counts_within": '{"79":1}',
        "ecc_corrected_total": 2, "ecc_corrected_total_first": 100, "ecc_corrected_total_within": 3 + 1 + 1,
        "ecc_uncorrected_total": 0, "ecc_uncorrected_total_first": 5, "ecc_uncorrected_total_within": 1,
    }
    # A quiet GPU (counts from before, nothing new): first and last alike, nothing within, no JSON but its counts
    assert counters(b) == {
        "xid_total": 2, "xid_total_first": 2, "xid_total_within": 0,
        "xid_counts": '{"48":2}', "xid_counts_first": '{"48":2}', "xid_counts_within": None,
        "ecc_corrected_total": 7, "ecc_corrected_total_first": 7, "ecc_corrected_total_within": 0,
        "ecc_uncorrected_total": 0, "ecc_uncorrected_total_first": 0, "ecc_uncorrected_total_within": 0,
    }


def hour_of_frames() -> pl.DataFrame:
    """An hour of GPU-a every 10 s: XID 79 at 5 past; the agent restarts at 10 past (counts from none; the ECC
    counters too), between two minutes; XID 48 at 20 past and at 21:10, and the agent restarts again at 21:30,
    within a minute; XID 31 at 40 past. Uncorrected ECC errors: 2 at 5 past, 1 at 20 past (lost to a last value:
    the restarts take the counter back to 0)."""
    rows = []
    for i in range(360):
        t = H0 + i * 10
        m = i / 6
        if m < 10:
            counts, unc = ({"79": 1} if m >= 5 else {}), (2 if m >= 5 else 0)
        elif m < 21.5:
            counts, unc = ({"48": 1 + (m >= 21 + 1 / 6)} if m >= 20 else {}), (1 if m >= 20 else 0)
        else:
            counts, unc = ({"31": 1} if m >= 40 else {}), 0
        rows.append({"ts": t, "xid_total": sum(counts.values()), "xid_counts": counts, "ecc_uncorrected_total": unc,
                     "ecc_corrected_total": 50 if m < 10 else 0})
    return raw(rows)


def test_an_hour_from_minutes_counts_restarts_between_and_within_them():
    frames = hour_of_frames()
    minutes = rollup_gpu_samples(as_gpu_samples(frames), 60.0)
    assert minutes.height == 60
    # the restart at 10 past falls between two minutes; the one at 21:30 within a minute
    at = {row["ts"]: row for row in as_dicts(minutes)}
    assert (at[H0 + 540]["xid_total"], at[H0 + 600]["xid_total_first"], at[H0 + 600]["xid_total_within"]) == (1, 0, 0)
    assert counters(at[H0 + 21 * 60])["xid_total_within"] == 1  # 1 -> 2 at 21:10, then the restart: 0
    assert at[H0 + 21 * 60]["xid_counts_within"] == '{"48":1}' and at[H0 + 21 * 60]["xid_total"] == 0
    (hour,) = as_dicts(rollup_gpu_samples(minutes, 3600.0))
    want = {
        "xid_total": 1, "xid_total_first": 0, "xid_total_within": 1 + 2 + 1,
        "xid_counts": '{"31":1}', "xid_counts_first": None, "xid_counts_within": '{"31":1,"48":2,"79":1}',
        "ecc_corrected_total": 0, "ecc_corrected_total_first": 50, "ecc_corrected_total_within": 0,
        "ecc_uncorrected_total": 0, "ecc_uncorrected_total_first": 0, "ecc_uncorrected_total_within": 2 + 1,
    }
    assert counters(hour) == want and hour["ts"] == H0 and hour["samples"] == 360
    # the same from the raw frames at once: exact at any granularity
    (direct,) = as_dicts(rollup_gpu_samples(as_gpu_samples(frames), 3600.0))
    assert counters(direct) == want


def test_a_minute_rolled_up_in_two_parts_rolls_into_its_hour_in_the_order_they_came():
    """Late frames: a minute's first 30 s rolled up, its rest later (the hot tier appends the parts in that order).
    An XID 79 in the first part, the agent restarted in the second: rows of the same time taken as they come."""
    frames = hour_of_frames().filter(pl.col("ts") < H0 + 600).with_columns(
        pl.when(pl.col("ts") >= H0 + 330).then(0).otherwise(pl.col("xid_total")).alias("xid_total"),
        pl.when(pl.col("ts") >= H0 + 330).then(None).otherwise(pl.col("xid_counts")).alias("xid_counts"))
    split = H0 + 330  # the XID is at 5:00, the restart at 5:30: both in the minute from 5:00
    first = rollup_gpu_samples(as_gpu_samples(frames.filter(pl.col("ts") < split)), 60.0)
    late = rollup_gpu_samples(as_gpu_samples(frames.filter(pl.col("ts") >= split)), 60.0)
    minutes = pl.concat([first, late])
    assert minutes.filter(pl.col("ts") == H0 + 300).height == 2
    (hour,) = as_dicts(rollup_gpu_samples(minutes, 3600.0))
    assert (hour["xid_total_within"], hour["xid_counts_within"], hour["xid_total"]) == (1, '{"79":1}', 0)


def test_minutes_written_before_the_span_columns_roll_into_an_hour_by_their_last_values():
    """Minute rollups read back from files of an older collector (no span columns: polars inserts nulls) are
    points at their last values: the hour counts the increases between them, as before."""
    minutes = rollup_gpu_samples(as_gpu_samples(hour_of_frames()), 60.0)
    old = minutes.with_columns(pl.lit(None, t).alias(c) for c, t in GPU_SPAN.items())
    (hour,) = as_dicts(rollup_gpu_samples(old, 3600.0))
    # Increases between minutes count (79, the first 48, 31); the second 48 (1 -> 2 -> restart within a minute, whose
    # last value is 0) is lost
    assert counters(hour) == {
        "xid_total": 1, "xid_total_first": 0, "xid_total_within": 3,
        "xid_counts": '{"31":1}', "xid_counts_first": None, "xid_counts_within": '{"31":1,"48":1,"79":1}',
        "ecc_corrected_total": 0, "ecc_corrected_total_first": 50, "ecc_corrected_total_within": 0,
        "ecc_uncorrected_total": 0, "ecc_uncorrected_total_first": 0, "ecc_uncorrected_total_within": 2 + 1,
    }
    # and a frame without the columns at all rolls up the same
    (bare,) = as_dicts(rollup_gpu_samples(minutes.drop(*GPU_SPAN), 3600.0))
    assert counters(bare) == counters(hour)


# --- the record over files written before and after the span columns were kept -------------------------------

def frames_body(seq: int, rows: list[tuple[float, dict, int]]) -> tuple:
    frames = [{"v": 1, "kind": "host", "node": "n0", "ts": t, "gpus": [
        {"index": 0, "uuid": "GPU-a", "health": "healthy", "xid_counts": counts, "xid_total": sum(counts.values()),
         "ecc_corrected_total": 9, "ecc_uncorrected_total": unc}]} for t, counts, unc in rows]
    body = json.dumps({"v": 1, "agent_id": "a", "seq": seq, "node": "n0", "sent_ts": rows[0][0],
                       "frames": frames}).encode()
    return decode_batch(body), body


def as_written_before(root: Path, kind: str, before: float) -> None:
    """Rewrite the kind's files as an older collector left them: its rows before `before` without the span columns,
    in a file listed first in its folder (the case where a multi-file scan takes its columns from that one)."""
    for path in sorted(root.glob(f"kind={kind}/date=*/hour=*/part-*.parquet")):
        frame = pl.read_parquet(path)
        old, new = frame.filter(pl.col("ts") < before), frame.filter(pl.col("ts") >= before)
        if old.height == 0:
            continue
        lo = int(path.name.split("-")[1])
        assert lo >= 1  # part-0-0 sorts first and no other file covers it
        old.drop(*GPU_SPAN).write_parquet(path.parent / f"part-{0:020d}-{0:020d}.parquet")
        if new.height:
            new.write_parquet(path)
        else:
            path.unlink()


def test_the_record_over_rows_written_before_and_after_rollups_kept_their_counters_span(tmp_path):
    """Four hours of GPU-a, the first two in files of an older collector (last values only), the rest in files that
    keep the counters' span. H0: XID 79. H1: XID 48, uncorrected ECC 1, the agent restarts within the hour (both
    back to 0): an old hour rollup lost them, old minute rollups did not. H2: XID 48 at its first sample (between
    the old rollup's last value and the new one's first), XID 31, the agent restarts, XID 79, uncorrected ECC 2
    then 1 around the restart. H3: the agent restarts again, XID 79. Read hourly (a node's record) and per minute
    (a GPU's): the new rows counted exactly, the old ones as before, the step between them too."""
    now = time.time()
    h0 = (now - 5 * 3600) // 3600 * 3600
    hour = [h0 + k * 3600 for k in range(5)]

    def at(t: float) -> tuple[dict, int]:
        m = (t - h0) / 60
        if m < 60:
            return ({"79": 1} if m >= 10 else {}), 0
        if m < 90:
            return ({"79": 1, "48": 1} if m >= 70 else {"79": 1}), int(m >= 70)
        if m < 120:
            return {}, 0  # the agent restarted at 1:30
        if m < 140:
            return {"48": 1, **({"31": 1} if m >= 130 else {})}, 2 if m >= 125 else 0
        if m < 150:
            return {}, 0  # restarted at 2:20
        if m < 185:
            return ({"79": 1} if m >= 160 else {}), 1 if m >= 155 else 0
        return ({"79": 1} if m >= 200 else {}), 0  # restarted at 3:05; XID 79 at 3:20

    rows = [(t, *at(t)) for t in (h0 + i * 15.0 for i in range(int((now - 60 - h0) // 15)))]
    s = Store(tmp_path, window_s=900, raw_s=120)
    for seq, i in enumerate(range(0, len(rows), 400)):
        b, body = frames_body(seq, rows[i:i + 400])
        s.ingest(b, body)
    s.hot.maintain(now)
    s.checkpoint()
    assert s.hot.complete_since("gpus") > hour[4]
    for kind in ("gpus_1h", "gpus_1m"):
        as_written_before(tmp_path, kind, hour[2])
    old = list(tmp_path.glob(f"kind=gpus_1h/date=*/hour=*/part-{0:020d}-{0:020d}.parquet"))
    assert old and not any("xid_total_within" in pl.read_parquet_schema(p) for p in old)

    hourly = history.samples(s, "gpus", h0, now, ("uuid", ["GPU-a"]), max_points=4)
    hours = hourly.filter(pl.col("span_s") == 3600).sort("ts")
    assert hours["ts"].to_list()[:4] == hour[:4]
    assert hours["xid_total_within"].to_list()[:4] == [None, None, 2, 1]  # old rows, then the span kept
    # an old first hour has its starting point
    assert hourly.filter((pl.col("span_s") == 60) & (pl.col("ts") == h0)).height == 1
    (record,) = history.gpu_reliability(hourly, h0)
    assert record["xids_by_code"] == {"31": 1, "48": 1, "79": 3}  # H1's 48 lost to its old hour rollup, as before
    assert record["xids_total"] == 5 and record["ecc_uncorrected"] == 2 + 1 and record["ecc_corrected"] == 0
    when = record["when"]
    assert when["xids_by_code"]["48"] == {"first_ts": hour[2], "last_ts": hour[2]}
    assert when["xids_by_code"]["79"] == {"first_ts": hour[0], "last_ts": hour[3]}
    assert when["ecc_uncorrected"] == {"first_ts": hour[2], "last_ts": hour[2]}

    fine = history.samples(s, "gpus", h0, now, ("uuid", ["GPU-a"]))
    assert fine["span_s"].max() == 60 and fine.filter(pl.col("ts") < hour[2])["xid_total_within"].null_count() > 100
    (record,) = history.gpu_reliability(fine, h0)
    assert record["xids_by_code"] == {"31": 1, "48": 2, "79": 3} and record["xids_total"] == 6
    assert record["ecc_uncorrected"] == 1 + 2 + 1
    assert record["when"]["xids_by_code"]["48"] == {"first_ts": h0 + 70 * 60, "last_ts": hour[2]}


def test_parts_of_a_minute_merge_in_the_order_their_counters_do_not_drop():
    """Two rollup rows of the same minute (a minute rolled up in two parts) read back from files come in either
    order; the record takes them in the order in which no counter drops (exact unless one restarted within it)."""
    frames = raw([{"ts": T0 + 10 * i, "xid_total": int(i >= 4), "xid_counts": {"79": 1} if i >= 4 else {},
                   "ecc_uncorrected_total": 3 + (i >= 2)} for i in range(6)])
    before = as_gpu_samples(raw([{"ts": T0 - 10, "xid_total": 0, "ecc_uncorrected_total": 3}]))
    parts = [rollup_gpu_samples(as_gpu_samples(frames.filter(pl.col("ts") < T0 + 30)), 60.0),
             rollup_gpu_samples(as_gpu_samples(frames.filter(pl.col("ts") >= T0 + 30)), 60.0)]
    for order in (parts, parts[::-1]):
        rows = pl.concat([before.with_columns(pl.lit(0.0).alias("span_s")),
                          *(p.with_columns(pl.lit(60.0).alias("span_s")) for p in order)])
        (record,) = history.gpu_reliability(rows)
        assert (record["xids_by_code"], record["xids_total"], record["ecc_uncorrected"]) == ({"79": 1}, 1, 1)


@pytest.mark.parametrize("every", [60.0, 3600.0])
def test_a_rollup_row_costs_a_few_integers_more(every):
    """Memory: the span columns are integers but for the XID counts' JSON, which is null when none (categorical:
    4 bytes a row)."""
    minutes = rollup_gpu_samples(as_gpu_samples(hour_of_frames()), every)
    size = {c: minutes[c].estimated_size() / minutes.height for c in GPU_SPAN}
    assert sum(size.values()) <= 3 * (8 + 4) + 2 * 4 + 1


def test_a_straggler_cause_counts_the_xid_within_a_minute_its_last_value_lost():
    """Attribution's xid_errors cause reads the window's samples, minute rollups where raw frames have aged out:
    XID 79 at 0:10 and the agent restarted at 0:30 of the same minute, so its rollup's last value is 0 as before,
    and only the increase within it shows the XID. Counted from last values, the cause was missed."""
    from collector.attribution import gpu_causes

    rows = raw([{"ts": T0 + 10 * i, "xid_total": x, "xid_counts": ({"79": 1} if x else None)}
                for i, x in enumerate([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])])  # two minutes
    rolled = rollup_gpu_samples(as_gpu_samples(rows), 60.0).with_columns(pl.lit(60.0).alias("span_s"))
    assert rolled["xid_total"].to_list() == [0, 0]
    peers = rollup_gpu_samples(as_gpu_samples(rows.with_columns(
        pl.lit("GPU-b").cast(pl.Categorical).alias("uuid"), pl.lit(0).cast(pl.Int64).alias("xid_total"),
        pl.lit(None).cast(pl.Categorical).alias("xid_counts"))), 60.0)
    causes = {c["cause"]: c for c in gpu_causes(rolled, peers)}
    assert causes["xid_errors"]["evidence"] == {"xids_in_window": 1.0}
    assert "xid_errors" not in {c["cause"] for c in gpu_causes(peers, rolled)}


def test_a_large_rollup_done_a_share_of_the_gpus_at_a_time_is_the_same_rollup(monkeypatch):
    """Past SLICE_ROWS rows a rollup works on a share of the GPUs (hosts: nodes) at a time, to bound its copies; the
    result is row for row the one made whole, counters, restarts, health reasons and hosts included."""
    from collector import rollups
    from collector.rollups import as_host_samples, rollup_host_samples

    frames = []
    for n in range(12):  # twelve GPUs, each an hour of the frames above, some with a reason to be unhealthy
        one = hour_of_frames().with_columns(pl.lit(f"GPU-{n:02d}").cast(pl.Categorical).alias("uuid"),
                                            pl.lit(f"n{n // 4}").cast(pl.Categorical).alias("node"),
                                            pl.lit(n % 4, pl.Int16).alias("index"))
        if n % 3 == 0:
            one = one.with_columns(pl.lit("unhealthy").cast(one.schema["health"]).alias("health"),
                                   pl.lit(["xid_79"]).cast(one.schema["health_reasons"]).alias("health_reasons"))
        frames.append(one)
    gpus = pl.concat(frames)
    hosts = pl.DataFrame({"ts": gpus["ts"], "node": gpus["node"]}).unique(maintain_order=True).with_columns(
        pl.lit(0.5).alias("cpu_utilization_ratio"), pl.col("ts").rank("dense").cast(pl.Float64).alias("network_errors_total"))
    host_samples = as_host_samples(hosts.select(
        pl.col(c) if c in hosts.columns else pl.lit(None).alias(c) for c in SCHEMAS["hosts"]).cast(SCHEMAS["hosts"]))
    whole = {every: as_dicts(rollup_gpu_samples(as_gpu_samples(gpus), every)) for every in (60.0, 3600.0)}
    whole_hosts = as_dicts(rollup_host_samples(host_samples, 60.0))
    minutes_whole = rollup_gpu_samples(as_gpu_samples(gpus), 60.0)
    hour_whole = as_dicts(rollup_gpu_samples(minutes_whole, 3600.0))
    monkeypatch.setattr(rollups, "SLICE_ROWS", 100)  # 4,320 raw rows: shares of about 100
    shares = []
    original = rollups._rollup_gpu
    monkeypatch.setattr(rollups, "_rollup_gpu", lambda s, every: (shares.append(s.height), original(s, every))[1])
    for every in (60.0, 3600.0):
        assert as_dicts(rollup_gpu_samples(as_gpu_samples(gpus), every)) == whole[every]
    assert len(shares) > 2 and max(shares) < gpus.height  # it did work a share at a time
    assert as_dicts(rollup_gpu_samples(minutes_whole, 3600.0)) == hour_whole
    assert as_dicts(rollup_host_samples(host_samples, 60.0)) == whole_hosts
