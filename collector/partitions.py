"""Parquet partitions on disk: <data_dir>/kind=<table>/date=YYYY-MM-DD/hour=HH/part-<lo>-<hi>.parquet.

`lo` and `hi` are the checkpoints whose rows a file holds. A checkpoint writes files named for
itself (lo = hi = its number) before it commits; a file whose `hi` is above the last committed
checkpoint was written by a checkpoint that never committed, and is deleted on start (the WAL
still holds its rows). Compaction merges a closed hour's files into one file covering their
range; a file whose range lies inside another's is redundant (a compaction interrupted before it
deleted its inputs) and is deleted too. Retention drops whole hours by age and by total size.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

log = logging.getLogger("fleetscope.collector.partitions")

_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")


@dataclass(frozen=True)
class Part:
    path: Path
    lo: int
    hi: int


def hour_key(ts_column: str = "ts") -> pl.Expr:
    return pl.from_epoch(pl.col(ts_column), time_unit="s").dt.replace_time_zone("UTC").dt.strftime("date=%Y-%m-%d/hour=%H")


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.write_parquet(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.rename(path)  # readers never see a half-written file


def write_checkpoint_parts(root: Path, kind: str, frame: pl.DataFrame, checkpoint: int) -> int:
    """Write `frame` as one file per hour, named for `checkpoint`; returns rows written."""
    if frame.height == 0:
        return 0
    written = 0
    for (hour,), rows in frame.with_columns(hour_key().alias("_hour")).group_by("_hour"):
        folder = root / f"kind={kind}" / str(hour)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(rows.drop("_hour"), folder / f"part-{checkpoint:020d}-{checkpoint:020d}.parquet")
        written += rows.height
    return written


def parts(root: Path, kind: str) -> list[Part]:
    out = []
    for path in (root / f"kind={kind}").glob("date=*/hour=*/part-*.parquet"):
        m = _PART.match(path.name)
        if m:
            out.append(Part(path, int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda p: (str(p.path.parent), p.lo, p.hi))


def clean(root: Path, kind: str, committed: int) -> None:
    """Delete uncommitted, redundant and temporary files left by a crash."""
    for tmp in (root / f"kind={kind}").glob("date=*/hour=*/*.tmp"):
        tmp.unlink()
    by_hour: dict[Path, list[Part]] = {}
    for p in parts(root, kind):
        if p.hi > committed:
            log.info("deleting %s: written by a checkpoint that never committed (the WAL replays its rows)", p.path)
            p.path.unlink()
            continue
        by_hour.setdefault(p.path.parent, []).append(p)
    for hour_parts in by_hour.values():
        for p in hour_parts:
            if any(q is not p and q.lo <= p.lo and p.hi <= q.hi and (q.lo, q.hi) != (p.lo, p.hi) for q in hour_parts):
                log.info("deleting %s: a compacted file already holds its rows", p.path)
                p.path.unlink()


def load(root: Path, kind: str, since_ts: float, schema: dict) -> pl.DataFrame | None:
    files = [p.path for p in parts(root, kind)]
    if not files:
        return None
    # Files written before a column existed lack it: combine them diagonally and fill it with nulls.
    frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").filter(pl.col("ts") >= since_ts)
    if frame.height == 0:
        return None
    missing = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in schema.items() if name not in frame.columns]
    return frame.with_columns(missing).cast(schema).select(list(schema))  # type: ignore[arg-type]


def compact(root: Path, kind: str, before_hour: str) -> int:
    """Merge the files of each hour older than `before_hour` (date=.../hour=..) into one; returns files merged."""
    merged = 0
    by_hour: dict[Path, list[Part]] = {}
    for p in parts(root, kind):
        by_hour.setdefault(p.path.parent, []).append(p)
    for folder, hour_parts in by_hour.items():
        hour = f"{folder.parent.name}/{folder.name}"
        if hour >= before_hour or len(hour_parts) < 2:
            continue
        lo, hi = min(p.lo for p in hour_parts), max(p.hi for p in hour_parts)
        frame = pl.concat([pl.read_parquet(p.path) for p in hour_parts], how="diagonal_relaxed")
        _write_atomic(frame, folder / f"part-{lo:020d}-{hi:020d}.parquet")
        for p in hour_parts:
            p.path.unlink()
        merged += len(hour_parts)
    return merged


def enforce_retention(root: Path, kinds: tuple[str, ...], max_age_s: float | None, max_bytes: int | None,
                      now: float | None = None) -> list[str]:
    """Delete whole hours older than max_age_s, then the oldest hours while the total exceeds max_bytes."""
    now = time.time() if now is None else now
    hours: dict[str, list[Path]] = {}
    for kind in kinds:
        for folder in (root / f"kind={kind}").glob("date=*/hour=*"):
            hours.setdefault(f"{folder.parent.name}/{folder.name}", []).append(folder)
    cutoff = time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(now - max_age_s)) if max_age_s else None
    dropped = []
    sizes = {h: sum(f.stat().st_size for folder in fs for f in folder.glob("*.parquet")) for h, fs in hours.items()}
    total = sum(sizes.values())
    for hour in sorted(hours):
        too_old = cutoff is not None and hour < cutoff
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        for folder in hours[hour]:
            shutil.rmtree(folder, ignore_errors=True)
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
        total -= sizes[hour]
        dropped.append(hour)
    return dropped
