"""Compaction leaves a folder alone until its whole span is over.

Hour rollups (gpus_1h, hosts_1h) are filed a day a folder, named `date=D/hour=00`. Checkpoints keep
adding files to that folder until day D ends, so compaction must not take it for closed once 01:00 of
day D starts (its name's hour), or every maintenance pass re-reads, re-sorts and rewrites the whole open
day. Hour folders (raw rows, per-minute rollups) still compact as soon as their hour is over.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from collector import partitions
from collector.rollups import ALL_SCHEMAS

DAY0 = datetime(2024, 3, 1, tzinfo=timezone.utc).timestamp()
COMMITTED = 10**6
NODES = ("n2", "n1", "n3")  # not in sort order: compaction of a rollup sorts by node, index, ts


def frame(kind: str, ts: list[float]) -> pl.DataFrame:
    """One row per node (and GPU index 0..1 for GPU kinds) at each ts."""
    schema = ALL_SCHEMAS[kind]
    gpu = "index" in schema
    keys = [(t, n, i) for t in ts for n in NODES for i in (range(2) if gpu else [None])]
    out = pl.DataFrame({"ts": [k[0] for k in keys], "node": [k[1] for k in keys]},
                       schema={"ts": pl.Float64, "node": pl.String})
    if gpu:
        out = out.with_columns(pl.Series("index", [k[2] for k in keys]))
    return out.with_columns(
        pl.col("node").cast(schema["node"]),
        *([pl.col("index").cast(schema["index"])] if gpu else []),
        *(pl.lit(None, dtype=dtype).alias(name) for name, dtype in schema.items() if name not in ("ts", "node", "index")),
    ).select(list(schema))


def write(root: Path, kind: str, start: float, end: float, every: float, n: int) -> list[Path]:
    """The rows of [start, end) `every` seconds apart, written by checkpoint n (WAL segments n..n)."""
    ts = [float(t) for t in range(int(start), int(end), int(every))]
    return partitions.write_checkpoint_parts(root, kind, frame(kind, ts), n, n)


def rows(root: Path, kind: str) -> pl.DataFrame:
    lf = partitions.scan(root, kind, COMMITTED)
    key = ["node", "index", "ts"] if "index" in ALL_SCHEMAS[kind] else ["node", "ts"]
    return lf.select(*key).collect().sort(key) if lf is not None else pl.DataFrame()


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file of a folder: (inode, mtime in ns); a rewrite changes both (or the name)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*")}


def hour(ts: float) -> str:
    return partitions.hour_of(ts)


def test_an_open_day_folder_is_left_alone_and_compacted_once_the_day_is_over(tmp_path):
    root = tmp_path
    for kind in ("gpus_1h", "hosts_1h"):
        # day 0 of hour rollups, written by four checkpoints up to 20:00 (the day is still open)
        for n, h in enumerate((0, 6, 12, 18), start=1):
            write(root, kind, DAY0 + h * 3600, DAY0 + min(h + 6, 20) * 3600, 3600, n)
        folder = root / f"kind={kind}" / "date=2024-03-01" / "hour=00"
        assert [p.parent for p in (root / f"kind={kind}").glob("date=*/hour=*/*.parquet")] == [folder] * 4
        before, before_rows = files(folder), rows(root, kind)
        assert len(before) == 4 and before_rows.height == 20 * len(NODES) * (2 if kind == "gpus_1h" else 1)

        # maintenance passes during the day: from 01:00 on the folder's name is an hour past, its day is not
        for now in (DAY0 + 3600, DAY0 + 12.5 * 3600, DAY0 + 20 * 3600, DAY0 + 86400 - 1):
            assert partitions.compact(root, kind, COMMITTED, before_hour=hour(now)) == 0
            assert files(folder) == before  # same names, same inodes, same mtimes: not rewritten
            assert rows(root, kind).equals(before_rows)

        # the day's last hours come; the day ends: one compaction into one file, the same rows
        write(root, kind, DAY0 + 20 * 3600, DAY0 + 86400, 3600, 5)
        day_rows = rows(root, kind)
        assert day_rows.height == 24 * before_rows.height // 20
        assert partitions.compact(root, kind, COMMITTED, before_hour=hour(DAY0 + 86400)) == 5
        assert rows(root, kind).equals(day_rows)  # the merged parts are still there, and skipped: no row twice
        partitions.clean(root, kind, COMMITTED)  # the next pass deletes them
        (only,) = folder.glob("*")
        assert only.name == f"part-{1:020d}-{5:020d}.parquet"
        assert rows(root, kind).equals(day_rows)
        on_disk = pl.read_parquet(only)
        key = ["node", "index", "ts"] if kind == "gpus_1h" else ["node", "ts"]
        assert on_disk.select(key).equals(on_disk.select(key).sort(key))  # sorted for scans by node
        # and not again
        after = files(folder)
        assert partitions.compact(root, kind, COMMITTED, before_hour=hour(DAY0 + 2 * 86400)) == 0
        assert files(folder) == after


def test_hour_folders_still_compact_once_their_hour_is_over(tmp_path):
    root = tmp_path
    for kind, every in (("gpus", 60), ("gpus_1m", 60), ("hosts_1m", 60)):
        # hours 10 and 11 of day 0, each written by three checkpoints of 20 minutes
        for n, m in enumerate(range(0, 120, 20), start=1):
            write(root, kind, DAY0 + 10 * 3600 + m * 60, DAY0 + 10 * 3600 + (m + 20) * 60, every, n)
        base = root / f"kind={kind}" / "date=2024-03-01"
        h10, h11 = base / "hour=10", base / "hour=11"
        assert len(files(h10)) == 3 and len(files(h11)) == 3
        all_rows, open_files = rows(root, kind), files(h11)

        # during hour 11: hour 10 is over and compacted, hour 11 is not touched
        assert partitions.compact(root, kind, COMMITTED, before_hour=hour(DAY0 + 11.5 * 3600)) == 3
        partitions.clean(root, kind, COMMITTED)
        (only,) = h10.glob("*")
        assert only.name == f"part-{1:020d}-{3:020d}.parquet"
        assert files(h11) == open_files
        assert rows(root, kind).equals(all_rows)

        # once hour 11 is over, it goes too
        assert partitions.compact(root, kind, COMMITTED, before_hour=hour(DAY0 + 12 * 3600)) == 3
        partitions.clean(root, kind, COMMITTED)
        (only,) = h11.glob("*")
        assert only.name == f"part-{4:020d}-{6:020d}.parquet"
        assert rows(root, kind).equals(all_rows)


def test_maintenance_through_a_day_rewrites_each_folder_once(tmp_path):
    """As the store runs it: a checkpoint, then compaction with the current hour, every half hour for two
    days. Every file a pass finds, of an hour folder or a day folder, is either left as it is or merged,
    and each folder is merged at most once after its span ends."""
    root = tmp_path
    kinds = {"gpus": 300, "gpus_1m": 600, "gpus_1h": 3600, "hosts_1h": 3600}
    merges: dict[str, int] = {}
    step = 1800
    for n, t in enumerate(range(int(DAY0), int(DAY0) + 2 * 86400, step), start=1):
        for kind, every in kinds.items():
            if every < 3600:
                write(root, kind, t, t + step, every, n)
            elif (t + step) % 3600 == 0:  # an hour's rollup, at the checkpoint after the hour ends
                write(root, kind, t + step - 3600, t + step, every, n)
        now = t + step + 60  # the pass just after the checkpoint
        for kind in kinds:  # as Store.maintain: the last pass's merged parts go first
            partitions.clean(root, kind, COMMITTED)
        seen = {kind: {p.parent: files(p.parent) for p in (root / f"kind={kind}").glob("date=*/hour=*/*.parquet")}
                for kind in kinds}
        for kind in kinds:
            partitions.compact(root, kind, COMMITTED, before_hour=hour(now))
            for folder, was in seen[kind].items():
                name = f"{folder.parent.name}/{folder.name}"
                if files(folder) != was:
                    assert partitions.folder_end(kind, name) <= partitions.hour_start(hour(now)), (kind, name, now)
                    merges[f"{kind}/{name}"] = merges.get(f"{kind}/{name}", 0) + 1
                elif partitions.folder_end(kind, name) <= partitions.hour_start(hour(now)):
                    assert len(was) == 1  # a closed folder is left with one file
    assert all(v == 1 for v in merges.values()), merges
    day_folders = {k for k in merges if k.startswith(("gpus_1h/", "hosts_1h/"))}
    assert day_folders == {f"{k}/date=2024-03-0{d}/hour=00" for k in ("gpus_1h", "hosts_1h") for d in (1, 2)}
    assert len(merges) == len(day_folders) + 2 * 48  # and every hour folder of gpus and gpus_1m, once
    for kind in kinds:
        partitions.clean(root, kind, COMMITTED)
        assert all(len(files(f)) == 1 for f in (root / f"kind={kind}").glob("date=*/hour=*"))
        per_ts = len(NODES) * (2 if "index" in ALL_SCHEMAS[kind] else 1)
        assert rows(root, kind).height == 2 * 86400 // kinds[kind] * per_ts


def test_a_rollup_is_sorted_a_range_of_nodes_at_a_time_into_the_same_order(tmp_path, monkeypatch):
    """Compaction sorts a rollup's hour a range of its first key at a time (a sink then holds one range's sort, not
    the hour's): the merged file holds every row, in the order a whole sort gives, nodes that sort between the
    ranges' bounds and a null node included."""
    monkeypatch.setattr(partitions, "SORT_RANGE_ROWS", 5)
    h0 = DAY0 + 3600
    parts = [pl.concat([frame("gpus_1m", [h0 + 60.0 * m]) for m in range(k, 60, 3)]) for k in range(3)]
    nameless = frame("gpus_1m", [h0 + 30.0]).head(1).with_columns(pl.lit(None, pl.Categorical).alias("node"))
    for n, part in enumerate([*parts, nameless]):
        partitions.write_checkpoint_parts(tmp_path, "gpus_1m", part, n, n)
    before = pl.concat([*parts, nameless]).select("node", "index", "ts").with_columns(pl.col("node").cast(pl.String))
    assert partitions.compact(tmp_path, "gpus_1m", COMMITTED, before_hour=hour(h0 + 7200)) == 4
    (merged,) = partitions.live_parts(tmp_path, "gpus_1m", COMMITTED)
    got = pl.read_parquet(merged.path).select("node", "index", "ts")
    assert got.equals(before.sort("node", "index", "ts"))  # every row, in order: the null node first
    assert got.height == 3 * 20 * len(NODES) * 2 + 1


def test_every_merge_runs_inside_the_lock_it_is_given(tmp_path, monkeypatch):
    """Raw hours as well as rollups: the sink holds hundreds of MB either way, so the store's upkeep lock (given as
    `sorting`) keeps it apart from the hot tier's maintenance and the analysis."""
    import threading

    lock = threading.Lock()
    held = []
    h0 = DAY0 + 3600
    for kind in ("gpus", "gpus_1m"):
        for n in range(2):
            write(tmp_path, kind, h0 + 30 * n, h0 + 3600, 60, n)
    original = partitions._write_atomic
    monkeypatch.setattr(partitions, "_write_atomic", lambda *a, **k: (held.append(lock.locked()), original(*a, **k))[1])
    for kind in ("gpus", "gpus_1m"):
        assert partitions.compact(tmp_path, kind, COMMITTED, before_hour=hour(h0 + 7200), sorting=lock) == 2
    assert held == [True, True]
