"""The warm tier on disk: <data_dir>/kind=<table>/date=YYYY-MM-DD/hour=HH/part-<lo>-<hi>.parquet.

`lo` and `hi` are the WAL segments whose rows a file holds: a checkpoint that covers segments
lo..hi writes its files under that name before it commits. A file is *live* when its `hi` is at or
below the last committed checkpoint and no other file of its hour covers a wider range (a file
inside another's range was merged into it by a compaction, or written by a checkpoint that failed
and was retried with a wider range). Readers see only live files; a restart deletes the others.
Compaction merges a closed folder's live files into one, streaming, once its whole span is over (a
day folder of hour rollups once its day ends). Retention drops whole folders,
oldest first by the end of their span (a day folder of hour rollups by its last hour), by age and by
total size. New folders and renames are made durable (directory fsync) before anything that relies
on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from collector.wal import fsync_dir

log = logging.getLogger("fleetscope.collector.partitions")

_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_HOUR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})$")
ROW_GROUP_ROWS = 65_536
# Rollups, sorted by GPU or node once compacted, in small row groups: a scan for one GPU reads one group.
ROLLUP_ROW_GROUP_ROWS = 8_192


@dataclass(frozen=True)
class Part:
    path: Path
    lo: int
    hi: int

    @property
    def hour(self) -> str:
        return f"{self.path.parent.parent.name}/{self.path.parent.name}"


def hour_key(ts_column: str = "ts") -> pl.Expr:
    return pl.from_epoch(pl.col(ts_column), time_unit="s").dt.replace_time_zone("UTC").dt.strftime("date=%Y-%m-%d/hour=%H")


def hour_of(ts: float) -> str:
    return time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(max(0.0, ts)))


def hour_start(hour: str) -> float:
    m = _HOUR.match(hour)
    if not m:
        raise ValueError(f"not an hour folder: {hour}")
    day = datetime.strptime(m.group(1), "%Y-%m-%d").replace(tzinfo=timezone.utc)
    return day.timestamp() + int(m.group(2)) * 3600


def _mkdirs(folder: Path) -> None:
    """Create `folder` and its missing parents, each made durable in its parent."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


def _write_atomic(frame: pl.DataFrame | pl.LazyFrame, path: Path, row_group: int = ROW_GROUP_ROWS) -> None:
    tmp = path.with_suffix(".tmp")
    if isinstance(frame, pl.LazyFrame):
        frame.sink_parquet(tmp, row_group_size=row_group)
    else:
        frame.write_parquet(tmp, row_group_size=row_group)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.rename(path)  # readers never see a half-written file
    fsync_dir(path.parent)



def for_disk(frame):
    """Names as plain strings on disk: Parquet dictionary-encodes them anyway, and row-group statistics
    on strings let a scan for one GPU or node skip the rest."""
    return frame.with_columns(pl.col(pl.Categorical).cast(pl.String), pl.col(pl.List(pl.Categorical)).cast(pl.List(pl.String)))


# How compaction orders an hour of each kind, so that a scan for one key reads few row groups.
# GPUs by node first: a node's history prunes on node, and a GPU's too once its node is known (uuids are random).
SORT_KEYS = {"gpus_1m": ("node", "index", "ts"), "hosts_1m": ("node", "ts"), "gpus_1h": ("node", "index", "ts"),
             "hosts_1h": ("node", "ts"),
             "step_aggs": ("job", "step")}


# Hour rollups are filed by day (in the day's hour=00 folder): a month of one GPU is then 30 files, not
# 720. Retention dates such a day by its last hour (folder_end), so keeps it whole until that hour is due;
# compaction leaves it open (checkpoints still add files to it) until the day ends.
FOLDER_SPAN = {"gpus_1h": 86400, "hosts_1h": 86400}


def row_group_of(kind: str) -> int:
    return ROLLUP_ROW_GROUP_ROWS if kind in SORT_KEYS else ROW_GROUP_ROWS


def write_checkpoint_parts(root: Path, kind: str, frame: pl.DataFrame, lo: int, hi: int) -> list[Path]:
    """Write `frame` as one file per hour, named for WAL segments lo..hi; returns the files written.
    Each hour's rows stream to disk (no sorted or cast copy of the whole frame in memory)."""
    if frame.height == 0:
        return []
    written = []
    span = FOLDER_SPAN.get(kind, 3600)
    folders = frame.select((pl.col("ts") // span).unique().sort())["ts"].to_list()
    lazy = frame.lazy()
    for number in folders:
        start = number * span
        folder = root / f"kind={kind}" / hour_of(start)
        _mkdirs(folder)
        path = folder / f"part-{lo:020d}-{hi:020d}.parquet"
        rows = lazy.filter((pl.col("ts") >= start) & (pl.col("ts") < start + span)) if len(folders) > 1 else lazy
        _write_atomic(for_disk(rows), path, row_group_of(kind))
        written.append(path)
    return written


def parts(root: Path, kind: str) -> list[Part]:
    out = []
    for path in (root / f"kind={kind}").glob("date=*/hour=*/part-*.parquet"):
        m = _PART.match(path.name)
        if m:
            out.append(Part(path, int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda p: (str(p.path.parent), p.lo, p.hi))


def _split(all_parts: list[Part], committed: int) -> tuple[list[Part], list[Part], list[Part]]:
    """(live, uncommitted, redundant)."""
    uncommitted = [p for p in all_parts if p.hi > committed]
    by_hour: dict[Path, list[Part]] = {}
    for p in all_parts:
        if p.hi <= committed:
            by_hour.setdefault(p.path.parent, []).append(p)
    live, redundant = [], []
    for hour_parts in by_hour.values():
        for p in hour_parts:
            covered = any(q is not p and q.lo <= p.lo and p.hi <= q.hi and (q.lo, q.hi) != (p.lo, p.hi) for q in hour_parts)
            (redundant if covered else live).append(p)
    return live, uncommitted, redundant


def live_parts(root: Path, kind: str, committed: int) -> list[Part]:
    return _split(parts(root, kind), committed)[0]


def clean(root: Path, kind: str, committed: int) -> None:
    """Delete uncommitted, redundant and temporary files left by a crash or a failed checkpoint."""
    for tmp in (root / f"kind={kind}").glob("date=*/hour=*/*.tmp"):
        tmp.unlink()
    _, uncommitted, redundant = _split(parts(root, kind), committed)
    for p in uncommitted:
        log.info("deleting %s: written by a checkpoint that never committed (the WAL replays its rows)", p.path)
        p.path.unlink()
    for p in redundant:
        log.info("deleting %s: a wider file of its hour already holds its rows", p.path)
        p.path.unlink()


def newest_first(files: list[Part]) -> list[Part]:
    """The files with the most recently written one first (the highest WAL segment), the others in their order.

    A scan of several Parquet files takes its columns from the first file: a column missing there is dropped
    from every other file (extra_columns="ignore"), one missing elsewhere is null (missing_columns="insert").
    Every file is written with the schema of the version that wrote it, so the newest file has the current
    columns: first, it keeps a column added by an upgrade in the files written since, where an older first
    file would drop it from them (a restart's hot tier, a compaction's merged file, a read) until the last file
    written before the upgrade had aged out."""
    if len(files) < 2:
        return list(files)
    newest = max(range(len(files)), key=lambda i: (files[i].hi, files[i].lo))
    return [files[newest], *files[:newest], *files[newest + 1:]]


def scan(root: Path, kind: str, committed: int, since: float | None = None, until: float | None = None,
         files: list[Part] | None = None) -> pl.LazyFrame | None:
    """A lazy scan of the live files whose hour overlaps [since, until], filtered on ts; None if none.
    The live files are read newest first (newest_first), so that their columns are the current version's; rows
    come in no particular order. `files`, where given, are read in the caller's order."""
    chosen = []
    span = FOLDER_SPAN.get(kind, 3600)
    for p in files if files is not None else live_parts(root, kind, committed):
        start = hour_start(p.hour)
        if (since is None or start + span > since) and (until is None or start <= until):
            chosen.append(p)
    if not chosen:
        return None
    if files is None:
        chosen = newest_first(chosen)
    lf = pl.scan_parquet([str(p.path) for p in chosen], hive_partitioning=False, missing_columns="insert",
                         extra_columns="ignore")
    if since is not None:
        lf = lf.filter(pl.col("ts") >= since)
    if until is not None:
        lf = lf.filter(pl.col("ts") <= until)
    return lf


SORT_RANGE_ROWS = 125_000  # compaction sorts about this many rows at a time (sorted_in_ranges)


def sorted_in_ranges(frame: pl.LazyFrame, keys: tuple[str, ...], rows: int | None = None) -> pl.LazyFrame:
    """`frame.sort(*keys)`, made as consecutive ranges of the first key (nodes, jobs), each sorted alone, of about
    `rows` rows each: the same rows in the same order, but a sink holds one range's sort at a time, not the whole
    input's. An hour of 32,768 GPUs' minute rollups (2 M rows) peaked at 1,197 MiB sorted whole and at 502 MiB in 16
    ranges (an unsorted copy through the same sink: 329 MiB); the fleet bench's peak was such a compaction beside
    the analysis. Rows whose first key is null come first, as a sort puts them."""
    first = keys[0]
    total = frame.select(pl.len()).collect().item()
    ranges = -(-total // (rows or SORT_RANGE_ROWS))
    if ranges <= 1:
        return frame.sort(*keys)
    values = frame.select(pl.col(first).drop_nulls().unique()).collect().get_column(first).sort()
    if values.len() < 2:
        return frame.sort(*keys)
    bounds = list(dict.fromkeys(values[i * values.len() // ranges] for i in range(1, ranges)))
    parts = [frame.filter(pl.col(first).is_null()).sort(*keys)]
    for lo, hi in zip([None, *bounds], [*bounds, None]):
        inside = pl.lit(True)
        if lo is not None:
            inside &= pl.col(first) >= lo
        if hi is not None:
            inside &= pl.col(first) < hi
        parts.append(frame.filter(inside).sort(*keys))
    return pl.concat(parts, how="vertical")


def compact(root: Path, kind: str, committed: int, before_hour: str,
            sorting: contextlib.AbstractContextManager = contextlib.nullcontext()) -> int:
    """Merge the live files of each folder whose whole span is over by the start of `before_hour` into one,
    streaming; returns files merged. The merged files are left for the next clean() to delete (see below).

    A folder is closed by the END of its span (folder_end), not by its name: a day folder of hour
    rollups (`date=D/hour=00`) keeps taking files until day D ends, so it is left alone until then and
    merged once after, not re-read, re-sorted and rewritten whole by every pass during the day. An hour
    folder is closed once its hour is before `before_hour`, as its name says.

    Rollups are sorted by their key in memory (SORT_KEYS). Every merge runs inside `sorting` (the store's upkeep
    lock: not at the same time as the hot tier's maintenance or the analysis, whose copies would add to its)."""
    merged = 0
    closed_by = hour_start(before_hour)
    by_hour: dict[Path, list[Part]] = {}
    for p in live_parts(root, kind, committed):
        by_hour.setdefault(p.path.parent, []).append(p)
    for folder, hour_parts in by_hour.items():
        hour = f"{folder.parent.name}/{folder.name}"
        if len(hour_parts) < 2 or not _HOUR.match(hour) or folder_end(kind, hour) > closed_by:
            continue
        lo, hi = min(p.lo for p in hour_parts), max(p.hi for p in hour_parts)
        frame = pl.scan_parquet([str(p.path) for p in newest_first(hour_parts)], missing_columns="insert",
                                extra_columns="ignore")  # the merged file keeps the newest file's columns
        path = folder / f"part-{lo:020d}-{hi:020d}.parquet"
        with sorting:
            if kind in SORT_KEYS:  # rollups are sorted in memory, a range of their first key at a time (sorted_in_ranges)
                _write_atomic(sorted_in_ranges(frame, SORT_KEYS[kind]), path, row_group_of(kind))
            else:  # raw hours stream through unsorted (the sink still holds a few hundred MB at 4,096 nodes)
                _write_atomic(frame, path, row_group_of(kind))
        # The parts merged are now redundant: readers listing files from here on skip them, and clean() deletes
        # them at the next maintenance pass, not now: a read that listed them a moment ago (a month's history,
        # a console page) is still reading them, and would fail on a file deleted under it.
        merged += len(hour_parts)
    return merged


def disk_bytes(root: Path, kinds: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for kind in kinds:
        out[kind] = sum(p.stat().st_size for p in (root / f"kind={kind}").glob("date=*/hour=*/*.parquet"))
    return out


def folder_end(kind: str, hour: str) -> float:
    """When the span of a kind's folder `date=D/hour=H` ends: no row it holds is as new as this. An hour
    folder ends an hour after its name; a day folder (FOLDER_SPAN) at its day's end, whatever hour names it."""
    span = FOLDER_SPAN.get(kind, 3600)
    return (hour_start(hour) // span + 1) * span


def enforce_retention(root: Path, kinds: tuple[str, ...], max_age_s: float | None, max_bytes: int | None,
                      now: float | None = None) -> list[str]:
    """Delete folders (of every kind at once) whose rows are all older than max_age_s, then the oldest
    folders while the total exceeds max_bytes; returns the hours dropped, oldest first, each named by
    its last hour (`date=D/hour=23` for a day folder).

    A folder is dated by the END of its span, the newest row it can hold: an hour folder by its hour,
    a day folder of hour rollups (FOLDER_SPAN, named `date=D/hour=00`) by its day's last hour. By age
    a folder goes once its span has ended max_age_s ago; by size folders go in order of that end,
    oldest first, across kinds, all the folders that end together at once. So:

    - every row dropped is older than the end of every kept folder's span: no row is dropped while a
      row of a later hour, or any row of a later day folder, is kept;
    - between hour folders (raw rows, per-minute rollups, step aggregates) no row is dropped while an
      older one is kept, exactly (an hour goes whole, every kind of it together), and no row of any
      kind newer than the oldest row kept in an hour folder is dropped;
    - the one way a kept row can be older than a dropped one: a day folder is kept until its last hour
      is due, so it may keep hour rollups of its day that are older (by up to 23 h) than rows of other
      kinds of that same day already dropped. Retention never drops a day folder's newer hours early.
    """
    now = time.time() if now is None else now
    ends: dict[float, list[Path]] = {}
    for kind in kinds:
        for folder in (root / f"kind={kind}").glob("date=*/hour=*"):
            hour = f"{folder.parent.name}/{folder.name}"
            if _HOUR.match(hour):
                ends.setdefault(folder_end(kind, hour), []).append(folder)
    cutoff = now - max_age_s if max_age_s else None
    dropped = []
    sizes = {e: sum(f.stat().st_size for folder in fs for f in folder.glob("*.parquet")) for e, fs in ends.items()}
    total = sum(sizes.values())
    for end in sorted(ends):
        too_old = cutoff is not None and end <= cutoff  # every row it can hold is older than max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break
        for folder in ends[end]:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.parent.exists() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()
        total -= sizes[end]
        dropped.append(hour_of(end - 3600))
    return dropped
