"""Keeps ingested rows as polars frames in memory and persists them as hourly Parquet partitions.

Layout: <data_dir>/kind=<table>/date=YYYY-MM-DD/hour=HH/part-<time>-<n>.parquet. On start the
store reads back the partitions inside its in-memory window. Batches are applied once per
(agent_id, seq). Not yet here (see the pipeline issue): a write-ahead log, so a batch is durable
before it is acknowledged; until then, what arrived in the last `persist_interval_s` is lost if
the process is killed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from collector.tables import KINDS, SCHEMAS, batch_rows, empty
from fleetscope.schema import Batch

log = logging.getLogger("fleetscope.collector.store")


@dataclass(frozen=True)
class IngestResult:
    duplicate: bool
    events: int
    frames: int


class Store:
    def __init__(self, data_dir: Path, *, window_s: float = 6 * 3600.0) -> None:
        self.data_dir = Path(data_dir)
        self.window_s = window_s
        self._lock = threading.Lock()
        self._chunks: dict[str, list[pl.DataFrame]] = {k: [] for k in KINDS}
        self._unwritten: dict[str, list[pl.DataFrame]] = {k: [] for k in KINDS}
        self._applied: dict[str, set[int]] = {}
        self.counts: Counter[str] = Counter()
        self.duplicates = 0
        self._part = 0
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        cutoff = time.time() - self.window_s
        for kind in KINDS:
            files = sorted((self.data_dir / f"kind={kind}").glob("date=*/hour=*/*.parquet"))
            if not files:
                continue
            frame = pl.read_parquet(files).cast(SCHEMAS[kind]).filter(pl.col("ts") >= cutoff)
            if frame.height:
                self._chunks[kind].append(frame.select(list(SCHEMAS[kind])))
                log.info("loaded %d %s rows from %d partitions", frame.height, kind, len(files))

    def ingest(self, batch: Batch) -> IngestResult:
        """Apply a batch once; a batch already applied is acknowledged and ignored."""
        with self._lock:
            seen = self._applied.setdefault(batch.agent_id, set())
            if batch.seq in seen:
                self.duplicates += 1
                return IngestResult(True, len(batch.events), len(batch.frames))
            rows = batch_rows(batch)
            for kind, kind_rows in rows.items():
                if kind_rows:
                    frame = pl.DataFrame(kind_rows, schema=SCHEMAS[kind])
                    self._chunks[kind].append(frame)
                    self._unwritten[kind].append(frame)
                    self.counts[kind] += frame.height
            seen.add(batch.seq)
        return IngestResult(False, len(batch.events), len(batch.frames))

    def _frame_locked(self, kind: str) -> pl.DataFrame:
        chunks = self._chunks[kind]
        if not chunks:
            return empty(kind)
        if len(chunks) > 1:
            merged = pl.concat(chunks, how="vertical", rechunk=True)
            chunks[:] = [merged]
        return chunks[0]

    def frame(self, kind: str) -> pl.DataFrame:
        """Everything in the in-memory window for one table (polars frames are immutable: safe to share)."""
        with self._lock:
            return self._frame_locked(kind)

    def persist(self) -> int:
        """Write rows not yet on disk into hourly Parquet partitions; drop rows older than the window."""
        with self._lock:
            pending = {k: v[:] for k, v in self._unwritten.items() if v}
            for k in pending:
                self._unwritten[k].clear()
            cutoff = time.time() - self.window_s
            for kind in KINDS:
                frame = self._frame_locked(kind)
                if frame.height and frame["ts"].min() < cutoff:  # type: ignore[operator]
                    self._chunks[kind][:] = [frame.filter(pl.col("ts") >= cutoff)]
        written = 0
        for kind, chunks in pending.items():
            frame = pl.concat(chunks, how="vertical")
            hours = frame.with_columns(
                pl.from_epoch(pl.col("ts"), time_unit="s").dt.replace_time_zone("UTC").dt.strftime("date=%Y-%m-%d/hour=%H").alias("_part")
            )
            for (part,), rows in hours.group_by("_part"):
                folder = self.data_dir / f"kind={kind}" / str(part)
                folder.mkdir(parents=True, exist_ok=True)
                self._part += 1
                name = f"part-{time.time_ns()}-{self._part}.parquet"
                tmp = folder / (name + ".tmp")
                rows.drop("_part").write_parquet(tmp)
                tmp.rename(folder / name)  # readers never see a half-written file
                written += rows.height
        return written
