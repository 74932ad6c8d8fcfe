"""The collector's storage: the write-ahead log, the hot tier in memory, the warm tier on disk.

Ingest: a batch already applied (its sequence number is at or below its watermark) is acknowledged
and ignored. Watermarks are kept per (node, agent_id, boot epoch): the routes have checked that the node
is the identity the agent authenticated as (collector.api.deps), so one agent cannot move another's, and
a restarted agent (a new epoch) numbers from 0 again without its batches looking like duplicates. A
number more than `max_seq_jump` above its watermark (above 0 for a new one) is refused (SequenceJump): one
batch must not be able to silence every later one. Otherwise the records that break the input bounds are taken out of it
(collector.bounds: counted and reported, never stored), its frames are built outside any lock, its body is appended
to the WAL (group commit: concurrent batches share one fdatasync) and, once durable, its frames
join the hot tier and the rows waiting for the next checkpoint.

A checkpoint waits for in-flight batches, rotates the WAL and takes the waiting rows; then, off
the ingest path, writes them as Parquet files named for the WAL segments they cover (with the
rollups and final step aggregates the hot tier made, and the snapshots of `persisted` state such
as the SLO ledger), and commits by writing checkpoint.json: the segment covered, every agent's
watermark, the hot tier's state. Then the covered segments are deleted. A failed checkpoint puts
its rows back and deletes what it wrote; the next one covers both ranges.

Start-up (`open`, which /healthz waits for): delete files no commit owns, read back from the warm
tier only what the hot tier held at the last checkpoint (time filters pushed into the scans),
restore the persisted state, replay the WAL after the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, SupportsBytes

import polars as pl

from collector import faults, partitions
from collector.goodput_ledger import GoodputLedger, StepSummary
from collector.bounds import Bounds, Refusal, Screened, StepHistory, quick_screen, screen, step_highs
from collector.decoders import Prepared
from collector.hot import HotTier, merge_small
from collector.memory import Governor
from collector.rollups import ALL_SCHEMAS
from collector.tables import KINDS, batch_frames, conform
from collector.wal import Wal, fsync_dir
from fleetscope.schema import Batch, SchemaError, decode_batch, encode

log = logging.getLogger("fleetscope.collector.store")

DERIVED = ("step_aggs", "gpus_1m", "hosts_1m", "gpus_1h", "hosts_1h")
ALL_KINDS = (*KINDS, *DERIVED)


class StoreUnavailable(Exception):
    """The store cannot take a batch now (starting, or out of disk or memory); the message says why."""


class Backlogged(StoreUnavailable):
    """The hot tier's backlog is past its limit: a maintenance pass is catching up (try again in a second)."""


class SequenceJump(ValueError):
    """A batch numbered too far above its watermark; the message says by how much and what is allowed."""


# Whose batches a watermark counts: (node, agent_id, boot epoch or None for agents that send none).
MarkKey = tuple[str, str, "str | None"]

# Agents number batches SEQ_STRIDE (1,024) apart and start a new epoch before 2**31 (agent/shipper.py), so a
# real agent never comes near this; a batch numbered 2**53 could otherwise silence its watermark for good.
MAX_SEQ_JUMP = 2**32


def _derived(lf: pl.LazyFrame, kind: str) -> pl.LazyFrame:
    """A rollup kind's rows read from Parquet in the current schema (step_aggs written before incarnations were
    kept apart: incarnation 0)."""
    names = set(lf.collect_schema().names())
    return lf.select(pl.col(c) if c in names else pl.lit(0 if c == "incarnation" else None).alias(c)
                     for c in ALL_SCHEMAS[kind]).cast(ALL_SCHEMAS[kind])  # type: ignore[arg-type]


def mark_key(batch: Batch) -> MarkKey:
    return (batch.node, batch.agent_id, batch.epoch)


class Persisted(Protocol):
    """State kept beside the tables (the SLO ledger), snapshotted at each checkpoint."""

    # Taken under the store's gate; bytes() of it, or its chunks() when it has them, written after.
    def snapshot(self) -> bytes | SupportsBytes: ...

    def restore(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class IngestResult:
    duplicate: bool
    events: int
    frames: int
    counts: dict | None = None  # records applied, by kind (step, request, pause, host_frame)
    refused: int = 0  # records refused one by one (collector.bounds); the rest of the batch was applied
    refused_counts: dict | None = None  # (kind, reason) -> records refused
    refusals: tuple[Refusal, ...] = ()  # the first of them, to tell the sender
    worker: bool = False  # its frames were built by an ingest worker process (collector.decoders)


def _records(batch: Batch | Prepared) -> tuple[int, int]:
    """A batch's events and host frames, as counted in the ingest reply."""
    if isinstance(batch, Prepared):
        return batch.events, batch.frames
    return len(batch.events), len(batch.frames)


_KIND_OF = {"steps": "step", "requests": "request", "pauses": "pause", "hosts": "host_frame"}


class Store:
    def __init__(self, data_dir: Path, *, window_s: float = 6 * 3600.0, raw_s: float = 300.0, raw_steps: int = 120,
                 retention_s: float | None = 30 * 86400.0, retention_bytes: int | None = None,
                 memory_budget: int | None = None, fsync: bool = True,
                 max_future_s: float | None = 600.0, max_step_jump: int | None = 1_000_000,
                 max_seq_jump: int = MAX_SEQ_JUMP,
                 observers: tuple[Callable[[str, pl.DataFrame], None], ...] = (),
                 persisted: dict[str, Persisted] | None = None, start: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.window_s = window_s
        # Where each training job's GPU-hours went, over its whole life (collector.goodput): kept as rows
        # are applied, snapshotted with each checkpoint.
        # Its unsettled steps get a sixteenth of the memory budget (past it they settle early: collector.goodput_ledger).
        self.goodput = GoodputLedger(retention_s, budget_bytes=memory_budget // 16 if memory_budget else None)
        # See each new row once, as it is applied (ingest and WAL replay); the ledger sees step rows first (_tag).
        self.observers = observers
        self.persisted = {"goodput": self.goodput, **(persisted or {})}
        self.retention_s = retention_s
        self.retention_bytes = retention_bytes
        self.bounds = Bounds(max_future_s=max_future_s, max_age_s=retention_s, max_step_jump=max_step_jump)
        self.steps_seen = StepHistory()  # the highest step of each job and rank, for the jump bound
        self.max_seq_jump = max_seq_jump
        self.memory_budget = memory_budget
        # Rows waiting for a checkpoint get a sixteenth of the budget (writing them takes a few times their
        # size for a moment); past it a checkpoint is due now, past twice that (the disk refuses
        # checkpoints) ingest answers 503 until one succeeds.
        self.unwritten_limit = memory_budget // 16 if memory_budget else None
        # The hot tier gets a third of the budget, less while the process's resident memory runs near the budget
        # (collector.memory); the rest is for the process itself, the rows awaiting a checkpoint, and what reads
        # and upkeep allocate for a moment.
        self.hot = HotTier(window_s=window_s, raw_s=raw_s, raw_steps=raw_steps)
        self.governor = Governor(memory_budget, self.hot) if memory_budget else None
        # The hot tier's backlog (rows not yet through a maintenance pass: HotTier.fresh_bytes) that ingest lets in. A
        # pass allocates about four times its backlog for a moment; a flood (agents sending their spools after an
        # outage, the fleet bench's compressed hours) had passes of 180-220 MiB of rows and the process 0.2-0.4 GiB
        # past a 2 GiB budget. At a 32nd of the budget a pass's copies stay within about an eighth of it. Past half
        # the limit a pass is due at once (admit() calls wake_upkeep, which the app's upkeep loop sets); past all of
        # it ingest answers 503 until a pass has caught up, and the agents keep their batches meanwhile.
        self.backlog_limit = max(memory_budget // 32, 16 * 2**20) if memory_budget else None
        self.wake_upkeep: Callable[[], object] = lambda: None
        self._gate = threading.Condition()  # guards everything below; held across I/O only to rotate the WAL
        self._checkpoint_lock = threading.Lock()
        # Held by the upkeep that copies whole tables in memory for a moment: the hot tier's maintenance, the
        # analysis pass (collector.api.app) and each compaction of an hour. Run at once, their copies added up: at
        # 4,096 nodes merging an hour of GPU minute rollups takes 0.3-0.5 GiB while it is made, the others as much.
        self.upkeep = threading.Lock()
        self._rotating = False
        self._inflight = 0
        self._reserved: dict[MarkKey, int] = {}  # watermark -> seq of its batch in flight
        self._unwritten: dict[str, list[pl.DataFrame]] = {k: [] for k in KINDS}
        self._unwritten_bytes = 0
        self._checkpointing: dict[str, list[pl.DataFrame]] = {}
        self.watermarks: dict[MarkKey, tuple[int, float]] = {}  # -> (highest applied seq, when)
        # From a checkpoint written before epochs: agent_id -> (seq, when), for batches that carry no epoch.
        self.legacy_watermarks: dict[str, tuple[int, float]] = {}
        self.committed = 0
        self.ready = False
        self.problem: str | None = None  # why the store cannot write now, for /healthz
        # When the last checkpoint was committed (Unix time): the one found at start, or the start itself where
        # there is none, so that a collector that never manages one is seen too (FleetscopeCollectorCheckpointStale).
        self.last_checkpoint_ts = time.time()
        self.checkpoint_due = threading.Event()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.wal = Wal(self.data_dir / "wal", fsync=fsync)
        self.fsync = fsync
        self.startup = {"phase": "waiting"}
        if start:
            self.open()

    # --- start-up -----------------------------------------------------------------------------
    def open(self) -> None:
        started = time.monotonic()
        self.startup = {"phase": "reading the last checkpoint"}
        state = self._read_checkpoint()
        for kind in ALL_KINDS:
            partitions.clean(self.data_dir, kind, self.committed)
        hot_state = state.get("hot") or {}
        self.hot.restore(hot_state)
        self.startup = {"phase": "loading the hot tier from disk"}
        self._load_hot(hot_state)
        self._seed_steps_seen()
        for name, thing in self.persisted.items():
            for path in (self._state_path(name, self.committed), self._state_path(name, self.committed, ".json")):
                if path.exists():  # .json: written before the states' formats were their own (msgpack for goodput)
                    thing.restore(path.read_bytes())
                    break
        self.startup = {"phase": "replaying the write-ahead log"}
        faults.point("open.replaying")
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
            frames = self._tag(batch_frames(batch))  # what the log holds passed the bounds when it was written
            with self._gate:
                self._apply(batch, frames, step_highs(batch.events))
            self._notify(frames)
            replayed += 1
        if replayed or skipped:
            log.info("replayed %d batches from the WAL (%d already applied)", replayed, skipped)
        self.wal.open(at_least=self.committed + 1)
        self.hot.maintain()
        self.startup = {"phase": "ready", "seconds": round(time.monotonic() - started, 3), "replayed_batches": replayed}
        self.ready = True

    def _read_checkpoint(self) -> dict:
        path = self.data_dir / "checkpoint.json"
        if not path.exists():
            return {}
        state = json.loads(path.read_text())
        self.last_checkpoint_ts = path.stat().st_mtime
        self.watermarks = {(node, agent, epoch): (int(seq), float(ts)) for node, agent, epoch, seq, ts in state.get("marks", [])}
        self.legacy_watermarks = {agent: (int(seq), float(ts)) for agent, (seq, ts) in state.get("watermarks", {}).items()}
        self.committed = int(state["segment"])
        return state

    def _load_hot(self, state: dict) -> None:
        """Read back what the hot tier held at the last checkpoint: each table from when it was complete."""
        now = time.time()
        held = state.get("held_since") or {}
        rolled = state.get("rolled_upto") or {}
        for kind in ALL_KINDS:
            since = state.get("steps_since") if kind == "steps" else held.get(kind)
            if since is None:  # complete from its first row: as far back as the table may reach
                since = now - (self.hot.raw_s if kind in ("gpus", "hosts") else self.window_s)
            if kind in ("gpus", "hosts") and rolled.get(f"{kind}_1m"):
                since = min(since, rolled[f"{kind}_1m"])  # and the rows not rolled up yet
            if kind in ("gpus_1m", "hosts_1m") and rolled.get(kind.replace("_1m", "_1h")):
                since = min(since, rolled[kind.replace("_1m", "_1h")])  # the minutes of the open hour
            if kind in ("gpus_1h", "hosts_1h"):
                continue  # on disk only
            lf = partitions.scan(self.data_dir, kind, self.committed, since=since)
            if lf is None:
                continue
            frame = conform(lf, kind).collect() if kind in KINDS else _derived(lf, kind).collect()
            if frame.height:
                self.hot.load(kind, frame.cast(ALL_SCHEMAS[kind]))  # type: ignore[arg-type]
                log.info("loaded %d %s rows from the warm tier", frame.height, kind)

    # --- ingest -------------------------------------------------------------------------------
    def _mark(self, batch: Batch) -> tuple[int, float] | None:
        mark = self.watermarks.get(mark_key(batch))
        if mark is None and batch.epoch is None:
            mark = self.legacy_watermarks.get(batch.agent_id)
        return mark

    def _is_duplicate(self, batch: Batch) -> bool:
        mark = self._mark(batch)
        # Agents send their batches in sequence order and resend a failed one with the same number.
        return mark is not None and batch.seq <= mark[0]

    def _check_jump(self, batch: Batch) -> None:
        mark = self._mark(batch)
        base = mark[0] if mark is not None else 0
        if batch.seq - base > self.max_seq_jump:
            where = f"its watermark {base}" if mark is not None else "0 (the first batch of this agent and epoch)"
            raise SequenceJump(f"batch {batch.seq} from agent {batch.agent_id} (node {batch.node}, epoch {batch.epoch}) "
                               f"is {batch.seq - base} above {where}, more than the {self.max_seq_jump} allowed; an agent "
                               "numbers its batches 1,024 apart and starts a new epoch long before that")

    def _seed_steps_seen(self) -> None:
        """The jump bound's history from the steps the hot tier read back (the WAL replay adds the rest)."""
        now = time.time()
        ranks = self.hot.raw("steps").group_by(pl.col("job").cast(pl.String), "rank").agg(pl.col("step").max())
        self.steps_seen.raise_to({(j, r): s for j, r, s in ranks.iter_rows()}, now)
        jobs = self.hot.step_aggs().group_by(pl.col("job").cast(pl.String)).agg(pl.col("step").max())
        self.steps_seen.raise_jobs(dict(jobs.iter_rows()), now)  # ranks trimmed from the hot tier included

    def _apply(self, batch: Batch, frames: dict[str, pl.DataFrame], highs: dict[tuple[str, int], int]) -> None:
        """Add a batch's frames to the hot tier and to what the next checkpoint writes (under the gate)."""
        self.steps_seen.raise_to(highs, time.time())
        self.hot.append(frames)
        for kind, frame in frames.items():
            self._unwritten[kind].append(frame)
            self._unwritten_bytes += frame.estimated_size()
        self.watermarks[mark_key(batch)] = (batch.seq, time.time())
        if self.unwritten_limit is not None and self._unwritten_bytes > self.unwritten_limit:
            self.checkpoint_due.set()

    def _tag(self, frames: dict[str, pl.DataFrame], summary: StepSummary | None = None) -> dict[str, pl.DataFrame]:
        """Step rows seen by the goodput ledger, which numbers each job's incarnations: each row gets its own
        (the hot tier's per-step aggregates keep the runs of a step that a restart re-ran apart). `summary`: the
        rows' summary made by an ingest worker (collector.goodput_ledger.summarize)."""
        if "steps" in frames:
            frames["steps"] = self.goodput.tag(frames["steps"], summary=summary)
        return frames

    def _notify(self, frames: dict[str, pl.DataFrame]) -> None:
        for kind, frame in frames.items():
            if kind != "steps":  # the ledger saw the steps in _tag
                self.goodput.observe(kind, frame)
            for observe in self.observers:
                observe(kind, frame)

    def ingest(self, batch: Batch | Prepared, body: bytes | None = None) -> IngestResult:
        """Apply a batch once, durably: when this returns, the batch survives a crash. A Prepared batch (decoded
        by a worker) comes with its body.
        Raises StoreUnavailable (try later), SequenceJump (never) or OSError (the disk refused the log record)."""
        counts = IngestResult(False, *_records(batch))
        if not self.ready:
            raise StoreUnavailable(f"the collector is starting ({self.startup['phase']})")
        agent = mark_key(batch)
        with self._gate:
            while self._rotating or self._reserved.get(agent, -1) >= batch.seq:  # a resend of a batch in flight waits
                self._gate.wait()
            if self._is_duplicate(batch):
                return IngestResult(True, counts.events, counts.frames)
            self._check_jump(batch)
            if self.unwritten_limit is not None and self._unwritten_bytes > 4 * self.unwritten_limit:
                raise StoreUnavailable("the collector's memory for rows not yet on disk is full: checkpoints are "
                                       f"failing ({self.problem or 'unknown reason'})")
            self._inflight += 1
            self._reserved[agent] = batch.seq
        try:
            frames, summary = None, None
            if isinstance(batch, Prepared):  # decoded by a worker (collector.decoders), frames and all
                highs = quick_screen(batch.dated, batch.ranks, time.time(), self.bounds, self.steps_seen)
                if highs is not None:
                    screened, frames = Screened(batch, highs=highs), dict(batch.tables)  # type: ignore[arg-type]
                    summary = batch.steps
                else:  # a record may break a bound: screen the batch itself, as without workers
                    batch = decode_batch(body)
            if frames is None:
                # Records out of bounds are refused one by one (collector.bounds); the log holds what passed.
                screened = screen(batch, time.time(), self.bounds, self.steps_seen)
                if screened.refused:
                    batch, body = screened.batch, None
                frames = batch_frames(batch)
            self.wal.ensure_open()
            self.wal.append(body if body is not None else encode(batch))
            frames = self._tag(frames, summary)  # once durable: a refused append must not be counted
            with self._gate:
                self._apply(batch, frames, screened.highs)
            self._notify(frames)  # SLO bookkeeping stays off the gate, but inside the in-flight count
        finally:
            with self._gate:
                self._inflight -= 1
                if self._reserved.get(agent) == batch.seq:
                    del self._reserved[agent]
                self._gate.notify_all()
        return IngestResult(False, *_records(batch),
                            {_KIND_OF[k]: f.height for k, f in frames.items() if k in _KIND_OF},
                            screened.refused, dict(screened.counts), tuple(screened.listed), isinstance(batch, Prepared))

    def admit(self) -> None:
        """Raises Backlogged while the hot tier's backlog is past its limit (see __init__); past half of it, asks for
        a maintenance pass at once. The app calls it before it reads a batch's body."""
        limit = self.backlog_limit
        if limit is None:
            return
        backlog = self.hot.fresh_bytes
        if backlog > limit // 2:
            self.wake_upkeep()
            if backlog > limit:
                raise Backlogged(f"the collector is catching up: {backlog / 2**20:.0f} MiB of new rows wait for the "
                                 f"hot tier's upkeep (the limit is {limit / 2**20:.0f} MiB)")

    # --- reads --------------------------------------------------------------------------------
    def frame(self, kind: str) -> pl.DataFrame:
        """The hot tier's rows of one raw table (polars frames are immutable: safe to share)."""
        return self.hot.raw(kind)

    def scan(self, kind: str, since: float | None = None, until: float | None = None) -> pl.LazyFrame:
        """Every row of a raw table in [since, until]: the warm tier's live files and the rows not yet
        written, without duplicates; filters on ts are pushed into the Parquet scan."""
        with self._gate:
            committed = self.committed
            memory = [*self._unwritten.get(kind, []), *self._checkpointing.get(kind, [])]
        disk = partitions.scan(self.data_dir, kind, committed, since, until)
        parts = [conform(disk, kind)] if disk is not None else []
        schema = ALL_SCHEMAS[kind]
        if memory:
            mem = pl.concat(memory, how="vertical", rechunk=False).lazy()
            if since is not None:
                mem = mem.filter(pl.col("ts") >= since)
            if until is not None:
                mem = mem.filter(pl.col("ts") <= until)
            parts.append(mem)
        if not parts:
            return pl.LazyFrame(schema=schema)
        return pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]

    def committed_segment(self) -> int:
        with self._gate:
            return self.committed

    def scan_derived(self, kind: str, since: float | None = None, until: float | None = None) -> pl.LazyFrame:
        """Every rollup row (gpus_1m, hosts_1m, step_aggs) in [since, until]: the warm tier for times before
        the hot tier holds them, the hot tier after."""
        hot_since = self.hot.held_since.get(kind)
        hot = (self.hot.step_aggs() if kind == "step_aggs" else self.hot.raw(kind)).lazy()
        ts = "end_ts" if kind == "step_aggs" else "ts"
        if since is not None:
            hot = hot.filter(pl.col(ts) >= since)
        if until is not None:
            hot = hot.filter(pl.col(ts) <= until)
        parts = [hot]
        if hot_since is not None and (since is None or since < hot_since):
            upper = hot_since if until is None else min(until, hot_since)
            disk = partitions.scan(self.data_dir, kind, self.committed_segment(), since, upper)
            if disk is not None:
                parts.insert(0, _derived(disk.filter(pl.col(ts) < hot_since), kind))
        return pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]

    # --- checkpoint ---------------------------------------------------------------------------
    def checkpoint(self) -> int:
        """Move what the WAL holds into Parquet and commit; returns rows written."""
        with self._checkpoint_lock:
            self.checkpoint_due.clear()
            self.goodput.prepare()  # most of its snapshot's work, before ingest has to wait for it
            with self._gate:
                self._rotating = True
                try:
                    while self._inflight:
                        self._gate.wait()
                    segment = self.wal.rotate()
                    pending = {k: v[:] for k, v in self._unwritten.items() if v}
                    for v in self._unwritten.values():
                        v.clear()
                    pending_bytes, self._unwritten_bytes = self._unwritten_bytes, 0
                    # Cleared again with the rows it asked for taken: a batch applied since this checkpoint began set
                    # it once more, and a second checkpoint of a few MiB ran right after this one (#10).
                    self.checkpoint_due.clear()
                    self._checkpointing = pending
                    watermarks = dict(self.watermarks)
                    derived, hot_state = self.hot.take_unwritten()
                    extras = {name: thing.snapshot() for name, thing in self.persisted.items()}
                finally:
                    self._rotating = False
                    self._gate.notify_all()
            lo = self.committed + 1
            written: list[Path] = []
            try:
                faults.point("checkpoint.rotated")
                rows = 0
                for kind, chunks in [*pending.items(), *derived.items()]:
                    frame = pl.concat(chunks, how="vertical", rechunk=False)
                    written += partitions.write_checkpoint_parts(self.data_dir, kind, frame, lo, segment)
                    rows += frame.height if kind in KINDS else 0
                    faults.point("checkpoint.part_written")
                for name, data in extras.items():
                    path = self._state_path(name, segment)
                    written.append(path)
                    # The goodput ledger's comes in pieces, framed and written here, off the gate.
                    self._write_file(path, data.chunks() if hasattr(data, "chunks") else (bytes(data),))
                faults.point("checkpoint.extras_written")
                self._commit(segment, watermarks, hot_state)
            except Exception as exc:
                for path in written:  # the next checkpoint writes these rows again, under a wider name
                    path.unlink(missing_ok=True)
                with self._gate:
                    for kind, chunks in pending.items():
                        self._unwritten[kind][:0] = chunks
                    self._unwritten_bytes += pending_bytes
                    self._checkpointing = {}
                self.hot.give_back(derived)
                self.problem = f"checkpoint failed: {exc}"
                raise
            # Committed: from here on nothing may undo it; what fails below is tidied by a later checkpoint.
            with self._gate:
                self.committed = segment
                self._checkpointing = {}
            self.problem = None
            self.last_checkpoint_ts = time.time()
            try:
                faults.point("checkpoint.committed")
                self.wal.drop_through(segment)
                faults.point("checkpoint.wal_dropped")
                for name in self.persisted:
                    for old in [*self.data_dir.glob(f"{name}-*.state"), *self.data_dir.glob(f"{name}-*.json")]:
                        if old != self._state_path(name, segment):
                            old.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("checkpoint %d committed, but its tidying failed (%s); the next one retries", segment, exc)
            return rows

    def _state_path(self, name: str, segment: int, suffix: str = ".state") -> Path:
        """Where the snapshot of persisted state `name` taken at `segment` lives (bytes in its own format)."""
        return self.data_dir / f"{name}-{segment:020d}{suffix}"

    def _write_file(self, path: Path, data: Iterable[bytes]) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb", buffering=1 << 20) as fh:  # pieces copied in a µs each, written a MiB at a time
            fh.writelines(data)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        tmp.rename(path)

    def _commit(self, segment: int, watermarks: dict[MarkKey, tuple[int, float]], hot_state: dict) -> None:
        # Forget agents not heard from for longer than anything is kept.
        legacy = self.legacy_watermarks
        if self.retention_s:
            old = time.time() - self.retention_s
            watermarks = {a: m for a, m in watermarks.items() if m[1] >= old}
            legacy = {a: m for a, m in legacy.items() if m[1] >= old}
        marks = [[*key, seq, ts] for key, (seq, ts) in watermarks.items()]
        if self.fsync:
            fsync_dir(self.data_dir)  # the extras' renames
        path = self.data_dir / "checkpoint.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps({"segment": segment, "marks": marks, "watermarks": legacy, "hot": hot_state}).encode())
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        faults.point("checkpoint.commit_file_written")
        tmp.rename(path)
        if self.fsync:
            try:
                fsync_dir(self.data_dir)
            except OSError as exc:  # the rename is done: treat it as committed (see checkpoint)
                log.warning("could not make the checkpoint's rename durable (%s)", exc)

    def maintain(self, now: float | None = None) -> None:
        """Compact closed hours and apply retention (run after a checkpoint, off the ingest path)."""
        now = time.time() if now is None else now
        current = partitions.hour_of(now)
        with self._checkpoint_lock:
            for kind in ALL_KINDS:
                partitions.clean(self.data_dir, kind, self.committed)
                partitions.compact(self.data_dir, kind, self.committed, before_hour=current, sorting=self.upkeep)
            dropped = partitions.enforce_retention(self.data_dir, ALL_KINDS, self.retention_s, self.retention_bytes, now)
        if dropped:
            log.info("retention dropped %d hour(s): %s .. %s", len(dropped), dropped[0], dropped[-1])

    def maintain_hot(self, now: float | None = None) -> None:
        """The hot tier's upkeep, then the rows waiting for a checkpoint merged from one small frame per
        batch into a few large ones (each small frame costs about its own size again in overhead)."""
        if self.governor is not None:
            self.governor.observe()
        with self.upkeep:  # not beside a compaction's sort (see __init__)
            self.hot.maintain(now)
        self.goodput.maintain(now)
        self.steps_seen.forget((time.time() if now is None else now) - self.window_s)
        with self._gate:
            snap = {k: list(v) for k, v in self._unwritten.items() if len(v) > 16}
        merged = {k: merge_small(v) for k, v in snap.items()}
        with self._gate:
            for kind, chunks in merged.items():
                current = self._unwritten[kind]
                if len(current) >= len(snap[kind]) and all(a is b for a, b in zip(current, snap[kind])):
                    current[:len(snap[kind])] = chunks

    def unwritten_bytes(self) -> int:
        return self._unwritten_bytes

    def close(self) -> None:
        if self.ready:
            self.checkpoint()
        self.wal.close()
