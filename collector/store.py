"""The collector's storage: write-ahead log, a recent window as polars frames, Parquet partitions.

Ingest: a batch already applied (its sequence number is at or below its agent's watermark) is
acknowledged and ignored; otherwise its body is appended to the WAL and fsynced, then its rows
join the in-memory window. A checkpoint rotates the WAL, writes the rows not yet on disk as
Parquet files named for the checkpoint, then commits by writing checkpoint.json (the WAL segment
it covers and every agent's watermark) and deletes the WAL segments it covers. On start the store
reads the committed Parquet files inside its window and replays the WAL after the checkpoint, so
an acknowledged batch survives a crash and none is applied twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from collector import partitions
from collector.tables import KINDS, SCHEMAS, batch_rows, empty
from collector.wal import Wal, _fsync_dir
from fleetscope.schema import Batch, SchemaError, decode_batch

log = logging.getLogger("fleetscope.collector.store")


@dataclass(frozen=True)
class IngestResult:
    duplicate: bool
    events: int
    frames: int


class Store:
    def __init__(self, data_dir: Path, *, window_s: float = 6 * 3600.0, retention_s: float | None = 30 * 86400.0,
                 retention_bytes: int | None = None, fsync: bool = True,
                 observers: tuple[Callable[[str, pl.DataFrame], None], ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.window_s = window_s
        self.observers = observers  # see each new row once, as it is applied (ingest and WAL replay)
        self.retention_s = retention_s
        self.retention_bytes = retention_bytes
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._chunks: dict[str, list[pl.DataFrame]] = {k: [] for k in KINDS}
        self._unwritten: dict[str, list[pl.DataFrame]] = {k: [] for k in KINDS}
        self.watermarks: dict[str, tuple[int, float]] = {}  # agent id -> (highest applied seq, when)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.committed = self._read_checkpoint()
        for kind in KINDS:
            partitions.clean(self.data_dir, kind, self.committed)
            frame = partitions.load(self.data_dir, kind, time.time() - window_s, SCHEMAS[kind])
            if frame is not None:
                self._chunks[kind].append(frame)
                log.info("loaded %d %s rows from Parquet", frame.height, kind)
        self.wal = Wal(self.data_dir / "wal", fsync=fsync)
        self._replay()

    # --- start-up -----------------------------------------------------------------------------
    def _read_checkpoint(self) -> int:
        path = self.data_dir / "checkpoint.json"
        if not path.exists():
            return 0
        state = json.loads(path.read_text())
        self.watermarks = {agent: (int(seq), float(ts)) for agent, (seq, ts) in state["watermarks"].items()}
        return int(state["segment"])

    def _replay(self) -> None:
        replayed = skipped = 0
        for _, payload in self.wal.replay(after=self.committed):
            try:
                batch = decode_batch(payload)
            except SchemaError as exc:  # it was valid when written: the file is damaged
                log.error("WAL record does not decode (%s); skipped", exc)
                continue
            if self._is_duplicate(batch):
                skipped += 1
                continue
            self._notify(self._apply(batch))
            replayed += 1
        if replayed or skipped:
            log.info("replayed %d batches from the WAL (%d already applied)", replayed, skipped)

    # --- ingest -------------------------------------------------------------------------------
    def _is_duplicate(self, batch: Batch) -> bool:
        mark = self.watermarks.get(batch.agent_id)
        # Agents send their batches in sequence order and resend a failed one with the same number.
        return mark is not None and batch.seq <= mark[0]

    def _apply(self, batch: Batch) -> list[tuple[str, pl.DataFrame]]:
        """Add a batch's rows to the window; returns them for the observers (called outside the lock)."""
        added = []
        for kind, kind_rows in batch_rows(batch).items():
            if kind_rows:
                frame = pl.DataFrame(kind_rows, schema=SCHEMAS[kind])
                self._chunks[kind].append(frame)
                self._unwritten[kind].append(frame)
                added.append((kind, frame))
        self.watermarks[batch.agent_id] = (batch.seq, time.time())
        return added

    def _notify(self, added: list[tuple[str, pl.DataFrame]]) -> None:
        for kind, frame in added:
            for observe in self.observers:
                observe(kind, frame)

    def ingest(self, batch: Batch, body: bytes | None = None) -> IngestResult:
        """Apply a batch once, durably: when this returns, the batch survives a crash."""
        with self._lock:
            if self._is_duplicate(batch):
                return IngestResult(True, len(batch.events), len(batch.frames))
            self.wal.append(body if body is not None else _encode(batch))
            added = self._apply(batch)
        self._notify(added)  # SLO bookkeeping stays off the ingest lock
        return IngestResult(False, len(batch.events), len(batch.frames))

    # --- reads --------------------------------------------------------------------------------
    def _frame_locked(self, kind: str) -> pl.DataFrame:
        chunks = self._chunks[kind]
        if not chunks:
            return empty(kind)
        if len(chunks) > 1:
            chunks[:] = [pl.concat(chunks, how="vertical", rechunk=True)]
        return chunks[0]

    def frame(self, kind: str) -> pl.DataFrame:
        """Everything in the in-memory window for one table (polars frames are immutable: safe to share)."""
        with self._lock:
            return self._frame_locked(kind)

    # --- checkpoint ---------------------------------------------------------------------------
    def checkpoint(self) -> int:
        """Move what the WAL holds into Parquet and commit; returns rows written."""
        with self._checkpoint_lock:
            with self._lock:
                segment = self.wal.rotate()
                pending = {k: v[:] for k, v in self._unwritten.items() if v}
                for k in pending:
                    self._unwritten[k].clear()
                cutoff = time.time() - self.window_s
                for kind in KINDS:
                    frame = self._frame_locked(kind)
                    if frame.height and frame["ts"].min() < cutoff:  # type: ignore[operator]
                        self._chunks[kind][:] = [frame.filter(pl.col("ts") >= cutoff)]
                if self.retention_s:  # forget agents not heard from for longer than anything is kept
                    old = time.time() - self.retention_s
                    self.watermarks = {a: m for a, m in self.watermarks.items() if m[1] >= old}
                watermarks = dict(self.watermarks)
            try:
                written = sum(partitions.write_checkpoint_parts(self.data_dir, kind, pl.concat(chunks, how="vertical"), segment)
                              for kind, chunks in pending.items())
                self._commit(segment, watermarks)
            except Exception:
                with self._lock:  # not committed: the rows stay unwritten, the WAL keeps them
                    for kind, chunks in pending.items():
                        self._unwritten[kind][:0] = chunks
                raise
            self.wal.drop_through(segment)
            return written

    def _commit(self, segment: int, watermarks: dict[str, tuple[int, float]]) -> None:
        path, tmp = self.data_dir / "checkpoint.json", self.data_dir / "checkpoint.json.tmp"
        with open(tmp, "w") as fh:
            json.dump({"segment": segment, "watermarks": watermarks}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(path)
        _fsync_dir(self.data_dir)
        self.committed = segment

    def maintain(self, now: float | None = None) -> None:
        """Compact closed hours and apply retention (run after a checkpoint, off the ingest path)."""
        now = time.time() if now is None else now
        current = time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(now))
        with self._checkpoint_lock:
            for kind in KINDS:
                partitions.compact(self.data_dir, kind, before_hour=current)
            dropped = partitions.enforce_retention(self.data_dir, KINDS, self.retention_s, self.retention_bytes, now)
        if dropped:
            log.info("retention dropped %d hour(s): %s .. %s", len(dropped), dropped[0], dropped[-1])

    def close(self) -> None:
        self.checkpoint()
        self.wal.close()


def _encode(batch: Batch) -> bytes:
    from fleetscope.schema import encode

    return encode(batch)
