"""Ingest bodies decoded in worker processes: a batch's frames are built there, off the collector's GIL.

Decoding a batch of 1,000 step events and building its polars frames is about 2 ms of Python, most of what
ingest costs; in one process that work, the HTTP server and everything else hold one GIL in turn, so ingest
tops out at what one core does, however many the machine has. With `ingest_processes` workers, the collector's
own process keeps only what needs its state: the watermark (duplicates), the input bounds against each rank's
step history, the WAL append, the goodput ledger and the hot tier.

A worker answers with a `Prepared`: the batch's identity (node, agent_id, epoch, seq), its record counts, its
frames, and what the bounds and the identity check need (the earliest and latest ts of its records, each rank's
highest step, the nodes its records name). When that summary says a record may break a bound, or name a node
its sender may not write as, the collector decodes the body itself and does what it does without workers: the
refusals and their messages are the same either way (collector.bounds.quick_screen says why). A body that is not
a batch raises the same error from the worker (MalformedError, SchemaError, TooDeep). A worker that dies is
replaced, and the batch in hand is decoded in the collector's process; so is every batch while the workers start.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

    from collector.goodput_ledger import StepSummary

log = logging.getLogger("fleetscope.collector")
PARENT_CHECK_S = 0.5


@dataclass(frozen=True, slots=True)
class Prepared:
    """A batch decoded and turned into frames by a worker, with what the collector's checks need of it."""

    node: str
    agent_id: str
    epoch: str | None
    seq: int
    events: int  # records of each list, as sent
    frames: int
    servers: int
    tables: dict[str, pl.DataFrame]  # collector.tables.batch_frames of the whole batch
    dated: tuple[float, float] | None  # the earliest and latest ts of its records (None: no records)
    ranks: dict[tuple[str, int], int]  # (job, rank) -> its highest step in the batch
    nodes: frozenset[str]  # the nodes its records name (besides the batch's own)
    steps: StepSummary | None  # its step rows summed per step, for the goodput ledger (None: no step rows)


def prepare(body: bytes) -> Prepared:
    """Decode `body` and build its frames (in a worker); raises what fleetscope.schema.decode_batch raises."""
    from collector.goodput_ledger import summarize
    from collector.tables import batch_frames
    from fleetscope.schema import decode_batch

    batch = decode_batch(body)
    lo, hi = math.inf, -math.inf
    nodes: set[str] = set()
    for ev in batch.events:
        ts = ev.ts
        if ts < lo:
            lo = ts
        if ts > hi:
            hi = ts
        if ev.node is not None:
            nodes.add(ev.node)
    for record in (*batch.frames, *batch.servers):
        lo, hi = min(lo, record.ts), max(hi, record.ts)
        if record.node is not None:
            nodes.add(record.node)
    tables = batch_frames(batch)
    steps = summarize(tables["steps"]) if "steps" in tables else None
    ranks = {key: high for key, (_, high, *_) in steps.ranks.items()} if steps is not None else {}
    counted = batch.events or batch.frames or batch.servers
    return Prepared(batch.node, batch.agent_id, batch.epoch, batch.seq, len(batch.events), len(batch.frames),
                    len(batch.servers), tables, (lo, hi) if counted else None, ranks, frozenset(nodes), steps)


def _start_worker(parent: int) -> None:
    # One thread of polars each: a batch's frames are small, and the collector's process has the other cores' work.
    os.environ["POLARS_MAX_THREADS"] = "1"
    # The parent's pid as it gave it: one that died while this worker started has a successor already.
    threading.Thread(target=_end_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    import collector.goodput_ledger  # noqa: F401  (polars, the schema and the tables, before the first batch)
    import collector.tables  # noqa: F401


def _end_with_parent(parent: int) -> None:
    """A collector killed outright (SIGKILL, OOM) cannot stop its workers: each ends itself once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _started() -> bool:
    return True


def default_ingest_processes() -> int:
    """One fewer than this process's CPUs, at most 4 (0 on one CPU): the collector's own process keeps one core busy."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


class Decoders:
    """A pool of `processes` workers that run `prepare`; started by start(), closed by close()."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self.ready = False  # every worker of the pool has started
        self.replaced = 0  # pools replaced after a worker died

    def start(self) -> None:
        with self._lock:
            if self._pool is not None or self.processes <= 0:
                return
            pool = self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_worker, initargs=(os.getpid(),))
        waiting = [pool.submit(_started) for _ in range(self.processes)]  # starts every worker now, not at the first batch
        left = [len(waiting)]

        def started(future) -> None:
            with self._lock:
                left[0] -= 1
                if left[0] == 0 and self._pool is pool and all(not f.exception() for f in waiting):
                    self.ready = True

        for future in waiting:
            future.add_done_callback(started)

    async def prepare(self, body: bytes) -> Prepared | None:
        """The batch prepared by a worker; None when none can take it now (the caller decodes it itself).
        Raises the decoding errors of fleetscope.schema for a body that is not a batch."""
        pool = self._pool
        if pool is None or not self.ready:
            return None
        try:
            return await asyncio.wrap_future(pool.submit(prepare, body))
        except BrokenProcessPool:
            self._replace(pool)
            return None

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another request replaced it already
            self._pool, self.ready = None, False
            self.replaced += 1
        log.error("an ingest worker process died; starting new ones (batches are decoded here until they are up)")
        broken.shutdown(wait=False, cancel_futures=True)
        self.start()

    def pids(self) -> list[int]:
        """The worker processes running now."""
        pool = self._pool
        return list(getattr(pool, "_processes", None) or ()) if pool is not None else []

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self.ready = self._pool, None, False
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
