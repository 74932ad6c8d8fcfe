"""Files of an older collector beside a newer one's, in the same warm-tier folder (the hours after an upgrade that
added a column). A multi-file Parquet scan takes its columns from its first file: listed in name order, the older
file came first and the newer files' new column was dropped, from a restart's hot tier, from every read, and for
good from an hour merged by compaction. partitions.newest_first reads the most recently written file first."""

from __future__ import annotations

import time

import polars as pl

from collector import partitions
from collector.partitions import Part
from collector.rollups import ALL_SCHEMAS, GPU_SPAN
from collector.store import Store

KIND = "gpus_1m"


def rollup_rows(ts: list[float], within: int) -> pl.DataFrame:
    rows = [{"ts": t, "node": "n0", "index": 0, "uuid": "GPU-a", "samples": 12, "xid_total": 3, "xid_total_first": 2,
             "xid_total_within": within} for t in ts]
    frame = pl.DataFrame(rows)
    schema = ALL_SCHEMAS[KIND]
    return frame.select(pl.col(c) if c in frame.columns else pl.lit(None).alias(c) for c in schema).cast(schema)  # type: ignore[arg-type]


def write_upgrade_hour(root, hour_ts: float) -> tuple:
    """An hour folder with an old file (segment 1, no span columns: written before the upgrade) and a new one
    (segment 2, every column). Their names sort the old file first."""
    folder = root / f"kind={KIND}" / partitions.hour_of(hour_ts)
    folder.mkdir(parents=True)
    old = rollup_rows([hour_ts + 60 * m for m in range(0, 10)], 0)
    new = rollup_rows([hour_ts + 60 * m for m in range(10, 20)], 1)
    partitions.for_disk(old.drop(*GPU_SPAN)).write_parquet(folder / f"part-{1:020d}-{1:020d}.parquet")
    partitions.for_disk(new).write_parquet(folder / f"part-{2:020d}-{2:020d}.parquet")
    assert sorted(p.name for p in folder.iterdir())[0].startswith(f"part-{1:020d}")
    return old, new


def test_the_newest_file_comes_first_and_the_others_keep_their_order(tmp_path):
    files = [Part(tmp_path / f"part-{lo:020d}-{hi:020d}.parquet", lo, hi) for lo, hi in ((1, 3), (4, 9), (10, 12), (5, 5))]
    assert [p.hi for p in partitions.newest_first(files)] == [12, 3, 9, 5]
    assert partitions.newest_first(files[:1]) == files[:1] and partitions.newest_first([]) == []


def test_a_scan_keeps_the_column_the_newer_file_has(tmp_path):
    hour_ts = 1_700_002_800.0
    write_upgrade_hour(tmp_path, hour_ts)
    rows = partitions.scan(tmp_path, KIND, committed=2).collect().sort("ts")
    assert rows.height == 20 and "xid_total_within" in rows.columns
    assert rows["xid_total_within"].to_list() == [None] * 10 + [1] * 10  # the old rows have none; the new keep theirs


def test_compaction_keeps_the_column_in_the_merged_file(tmp_path):
    hour_ts = 1_700_002_800.0
    write_upgrade_hour(tmp_path, hour_ts)
    assert partitions.compact(tmp_path, KIND, committed=2, before_hour=partitions.hour_of(hour_ts + 7200)) == 2
    partitions.clean(tmp_path, KIND, committed=2)
    (merged,) = partitions.live_parts(tmp_path, KIND, 2)
    assert (merged.lo, merged.hi) == (1, 2)
    rows = pl.read_parquet(merged.path).sort("ts")
    assert rows["xid_total_within"].to_list() == [None] * 10 + [1] * 10


def test_a_restart_loads_the_column_into_the_hot_tier(tmp_path):
    """A collector restarted within the hour reads its minute rollups back (Store._load_hot): the new rows keep
    their counters' increase within the minute, which the hot tier's reads and the next hour rollup use."""
    s = Store(tmp_path, window_s=6 * 3600.0)
    s.checkpoint()
    s.checkpoint()  # committed through segment 2: both files below are live
    s.close()
    assert s.committed >= 2
    hour_ts = time.time() // 3600 * 3600 - 3600  # the hour before this one: within the hot tier's window
    write_upgrade_hour(tmp_path, hour_ts)
    again = Store(tmp_path, window_s=6 * 3600.0)
    try:
        held = again.hot.raw(KIND).sort("ts")
        assert held.height == 20
        assert held["xid_total_within"].to_list() == [None] * 10 + [1] * 10
    finally:
        again.close()


def test_an_hour_of_rollups_is_merged_sorted_by_gpu_and_only_while_the_hot_tier_is_not_maintained(tmp_path):
    """The merged hour is sorted by node, index and time (a scan for one GPU reads few row groups), and its sort runs
    under the store's upkeep lock, which the hot tier's maintenance holds too: their copies never add up."""
    import threading

    hour_ts = time.time() // 3600 * 3600 - 3 * 3600
    s = Store(tmp_path, window_s=6 * 3600.0)
    s.checkpoint()
    s.checkpoint()
    folder = tmp_path / f"kind={KIND}" / partitions.hour_of(hour_ts)
    folder.mkdir(parents=True)
    for seg, minutes in ((1, range(0, 30)), (2, range(30, 60))):
        rows = pl.concat([rollup_rows([hour_ts + 60 * m for m in minutes], 1).with_columns(
            pl.lit(node).cast(pl.Categorical).alias("node"), pl.lit(idx).cast(pl.Int16).alias("index"))
            for node in ("n2", "n0", "n1") for idx in (1, 0)])
        partitions.for_disk(rows).write_parquet(folder / f"part-{seg:020d}-{seg:020d}.parquet")
    done = threading.Event()
    with s.upkeep:  # as the hot tier's maintenance holds it
        worker = threading.Thread(target=lambda: (s.maintain(), done.set()))
        worker.start()
        assert not done.wait(2.0)  # the compaction waits at the lock (unheld, it merges these in a few ms)
        assert len(list(folder.glob("part-*.parquet"))) == 2  # nothing merged while held
    worker.join(timeout=30)
    assert done.is_set()
    s.close()
    (merged,) = partitions.live_parts(tmp_path, KIND, s.committed)
    rows = pl.read_parquet(merged.path)
    assert rows.height == 360
    assert rows.select("node", "index", "ts").rows() == sorted(rows.select("node", "index", "ts").rows())


def test_the_hot_tier_is_maintained_under_the_upkeep_lock(tmp_path):
    s = Store(tmp_path, window_s=6 * 3600.0)
    seen = []
    maintain = s.hot.maintain
    s.hot.maintain = lambda now=None: (seen.append(s.upkeep.locked()), maintain(now))  # type: ignore[method-assign]
    s.maintain_hot()
    assert seen == [True] and not s.upkeep.locked()
    s.close()


def test_the_analysis_pass_runs_under_the_upkeep_lock(tmp_path, monkeypatch):
    """The analysis and the views' refresh copy the step table's columns for a moment: under the store's upkeep
    lock, so never beside a compaction's merge (the fleet bench's highest RSS was one of each at once)."""
    import threading

    from fastapi.testclient import TestClient

    from collector.api import app as app_module
    from collector.api import create_app
    from tests.collector.test_api import settings
    from tests.conftest import wait_ready, wait_until

    seen: list[bool] = []
    analyse = app_module.analyse

    def watched(*args, **kwargs):
        seen.append(client.app.state.store.upkeep.locked())
        return analyse(*args, **kwargs)

    monkeypatch.setattr(app_module, "analyse", watched)
    with TestClient(create_app(settings(tmp_path, analysis_interval_s=0.05))) as client:
        wait_ready(client)
        wait_until(lambda: len(seen) >= 2, timeout=10, interval=0.02, what="two analysis passes")
        store = client.app.state.store
        assert all(seen) and isinstance(store.upkeep, type(threading.Lock()))
