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

Each worker has a channel of its own (a socket pair), read and written by the event loop itself: a request is
the body, an answer the pickled Prepared, in order. A ProcessPoolExecutor put three threads of the collector's
process between a request and its answer (its manager, its queue's feeder, the result reader), each waiting for
the GIL in turn; while a checkpoint kept the GIL busy that round trip took 30-60 ms instead of 3.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

    from collector.goodput_ledger import StepSummary

log = logging.getLogger("fleetscope.collector")
_HEADER = struct.Struct("!Q")  # each message on a channel: its length, then its bytes
MAX_RESTART_DELAY_S = 60.0


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


def _serve(channel: socket.socket) -> None:
    """A worker's life: read a body, answer with its Prepared (or the error decoding it), until the collector's end
    of the channel closes; that includes a collector killed outright (SIGKILL, OOM), whose end the kernel closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole group: the collector decides
    # One thread of polars each: a batch's frames are small, and the collector's process has the other cores' work.
    os.environ["POLARS_MAX_THREADS"] = "1"
    import collector.goodput_ledger  # noqa: F401  (polars, the schema and the tables, before the first batch)
    import collector.tables  # noqa: F401

    incoming = channel.makefile("rb")
    try:
        channel.sendall(_HEADER.pack(0))  # started: an empty answer
        while len(header := incoming.read(_HEADER.size)) == _HEADER.size:
            body = incoming.read(_HEADER.unpack(header)[0])
            try:
                answer = pickle.dumps((True, prepare(body)), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # the decoding errors (MalformedError, SchemaError, TooDeep) go back as they are
                try:
                    answer = pickle.dumps((False, exc), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:
                    answer = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            channel.sendall(_HEADER.pack(len(answer)) + answer)
    except OSError:
        pass  # the collector is gone
    os._exit(0)


def default_ingest_processes() -> int:
    """One fewer than this process's CPUs, at most 4 (0 on one CPU): the collector's own process keeps one core busy."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


class _Worker(asyncio.Protocol):
    """One worker process and the collector's end of its channel: requests go out in order and come back in order."""

    def __init__(self, decoders: Decoders) -> None:
        self.decoders = decoders
        self.process: multiprocessing.process.BaseProcess | None = None
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.started = False  # answered its first message and has not ended since
        self.ever_started = False
        self._buffer = bytearray()

    def send(self, body: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.writelines((_HEADER.pack(len(body)), body))  # type: ignore[union-attr]
        return future

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            size = _HEADER.unpack_from(buffer)[0]
            end = _HEADER.size + size
            if len(buffer) < end:
                return
            answer = bytes(buffer[_HEADER.size:end]) if size else b""
            del buffer[:end]
            if not self.started:
                self.started = self.ever_started = True
                self.decoders._started(self)
                continue
            future = self.waiting.popleft()
            if future.done():
                continue
            ok, value = pickle.loads(answer)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.started = False
        while self.waiting:  # the batches in hand are decoded in the collector's process
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(None)
        self.decoders._lost(self)


class Decoders:
    """`processes` workers that run `prepare`, each on a channel read by the event loop: no thread of the
    collector's process stands between a request and its worker. Started by start(), closed by close(), both
    on the event loop."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.ready = False  # every worker has started
        self.replaced = 0  # workers replaced after one died
        self._workers: list[_Worker] = []
        self._closing = False
        self._failed_starts = 0  # workers in a row that died before they started: the next waits longer

    def start(self) -> None:
        if self.processes <= 0 or self._workers:
            return
        self._closing = False
        for _ in range(self.processes):
            self._spawn()

    def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        worker = _Worker(self)
        # spawn, not fork: the collector's threads, locks and polars pool are not copied into the worker.
        worker.process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(theirs,), name="fleetscope-ingest-worker", daemon=True)
        worker.process.start()
        theirs.close()
        self._workers.append(worker)
        loop.create_task(self._connect(worker, ours))

    async def _connect(self, worker: _Worker, sock: socket.socket) -> None:
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: worker, sock)
        worker.transport = transport  # type: ignore[assignment]

    def _started(self, worker: _Worker) -> None:
        self.ready = len(self._workers) == self.processes and all(w.started for w in self._workers)

    def _lost(self, worker: _Worker) -> None:
        self.ready = False
        if worker in self._workers:
            self._workers.remove(worker)
        if worker.process is not None:
            worker.process.join(0)
        if self._closing:
            return
        self.replaced += 1
        if worker.ever_started:
            self._failed_starts = 0
            log.error("an ingest worker process died; starting a new one (its batches are decoded here meanwhile)")
            self._spawn()
            return
        # One that cannot start (a broken install, no memory) is not started again in a tight loop.
        self._failed_starts += 1
        delay = min(MAX_RESTART_DELAY_S, 2.0 ** self._failed_starts)
        log.error("an ingest worker process died before it started (exit code %s); trying again in %.0f s, batches "
                  "are decoded here meanwhile", worker.process.exitcode if worker.process else None, delay)
        asyncio.get_running_loop().call_later(delay, self._respawn)

    def _respawn(self) -> None:
        if not self._closing and len(self._workers) < self.processes:
            self._spawn()

    async def prepare(self, body: bytes) -> Prepared | None:
        """The batch prepared by a worker; None when none can take it now (the caller decodes it itself).
        Raises the decoding errors of fleetscope.schema for a body that is not a batch."""
        ready = [w for w in self._workers if w.started and w.transport is not None]
        if not ready:
            return None
        return await min(ready, key=lambda w: len(w.waiting)).send(body)

    def pids(self) -> list[int]:
        """The worker processes running now."""
        return [w.process.pid for w in self._workers if w.process is not None and w.process.pid is not None]

    async def close(self) -> None:
        self._closing, self.ready = True, False
        workers, self._workers = self._workers, []
        for worker in workers:
            if worker.transport is not None:
                worker.transport.close()  # the worker reads the end of its channel and exits
        await asyncio.to_thread(_reap, [w.process for w in workers if w.process is not None])


def _reap(processes: list, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)
