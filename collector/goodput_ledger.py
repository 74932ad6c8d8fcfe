"""The goodput ledger: what collector.goodput needs of each training job, kept as rows arrive.

A store observer (it sees every row applied, at ingest and at WAL replay) and a `Persisted` (snapshotted
with each checkpoint), so it covers a job's whole life and survives a collector restart; the module
docstring of collector.goodput says what it keeps and why.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import polars as pl

from collector.goodput import (
    INCARNATIONS,
    PAUSES,
    SEGMENTS,
    _Cover,
    account,
    hang_after,
    incarnation_table,
    ratio,
    totals,
    union,
)
from collector.training import STOPPED_AFTER_S

log = logging.getLogger("fleetscope.collector")

SETTLE_S = 600.0  # a block of steps no row has come for in this long is folded into spans
# Over its memory budget, the ledger settles the blocks that rows came to longest ago early, but none that a row came
# to in the last EARLY_SETTLE_S: a step's rows from all its ranks have usually come by then. One that comes later (an
# agent that spooled through an outage) starts the step anew: its time is counted, but not as its peers' wait for it.
EARLY_SETTLE_S = 30.0
BLOCK_BITS = 10  # 1,024 steps a block
PREPARE_BLOCKS = 8  # encoded under the lock at a time by prepare()
TYPICAL_STEPS = 1024  # a job's typical step is the median of its latest unsettled steps
SPAN_STEPS = 64
MAX_PIDS = 65_536  # per incarnation, for its pid count
# What one unsettled step holds in memory: its tuple of nine numbers (~150 bytes with its slot in its block's dict)
# and the float and int objects it refers to (~150 more), measured with tracemalloc; tests/collector/test_goodput.py
# holds the estimate to the measure.
STEP_BYTES = 300


@dataclass(frozen=True)
class Report:
    job: str
    seconds: dict  # reason -> GPU seconds
    goodput_ratio: float | None
    incarnations: pl.DataFrame  # incarnation_table
    pieces: pl.DataFrame  # account's, for over_time


# --- the ledger (incremental) -------------------------------------------------------------------------
@dataclass
class _Rank:
    inc: int
    pid: int
    process_start: float | None
    max_step: int = -1
    stepped: bool = False


@dataclass
class _Incarnation:
    start: float | None = None
    restored: int | None = None
    pids: set = field(default_factory=set)


@dataclass
class _Job:
    max_inc: int = 0
    ranks: dict = field(default_factory=dict)  # rank -> _Rank
    incs: dict = field(default_factory=dict)  # incarnation -> _Incarnation
    # The steps not settled yet, in blocks of BLOCK steps: (incarnation, step // BLOCK) -> step -> (ts, end, ranks,
    # compute sum, compute max, data sum, data ranks, world, last row at). A block is the unit of upkeep: it settles
    # whole (no row for SETTLE_S), and a checkpoint's snapshot encodes again only the blocks rows came to since the
    # last one. A job stepping thousands of times a second holds hundreds of thousands of unsettled steps, and both
    # run under locks that ingest waits for. Tuples of numbers, which the cycle collector stops tracking (as it then
    # does the blocks' dicts): as lists, a million of them cost 100 ms a full collection, every few seconds.
    blocks: dict = field(default_factory=dict)
    touched: dict = field(default_factory=dict)  # block -> when a row last came to it
    dirty: set = field(default_factory=set)  # blocks changed since the last snapshot
    # block -> (incarnation, block, its msgpack {step: acc}) as last encoded: a snapshot lists them as they are
    encoded: dict = field(default_factory=dict)
    spans: list = field(default_factory=list)  # [inc, lo, hi, ts, end, world, straggler gpu-s, data gpu-s]
    pauses: dict = field(default_factory=lambda: {"checkpoint": [], "pause": []})
    open: dict = field(default_factory=dict)  # rank -> {reason: begin ts}, declared pauses not ended yet
    step_s: float | None = None  # the job's typical step, for the hang threshold
    data_s: float | None = None  # its typical data phase
    seen: float = 0.0  # when a row of it last came
    changes: int = 0  # bumped by every change, so that a snapshot encodes again only the jobs that changed

    def encode_dirty(self, most: int | None = None) -> None:
        """Encode (at most `most` of) the blocks changed since they were last encoded."""
        for _ in range(len(self.dirty) if most is None else min(most, len(self.dirty))):
            key = self.dirty.pop()
            self.encoded[key] = (*key, _encode(self.blocks[key]))


_SUMMARY_COLUMNS = ("job", "rank", "pid", "step", "ts", "duration_s", "world_size", "sync_arrival_s", "phase_comm_s",
                    "phase_data_s", "process_start_ts", "restored_step")


@dataclass(frozen=True, slots=True)
class StepSummary:
    """What the ledger takes of a batch's step rows when its ranks go on as they were (GoodputLedger._summarized):
    made by `summarize` where the rows are built (an ingest worker), so the collector's process skips the rows."""

    ranks: dict  # (job, rank) -> (lowest step, highest step, steps never go back in row order, pids, declared a start)
    steps: dict  # job -> [(step, first ts, last end, rows, compute sum, compute max, data sum, data rows, world)]


def summarize(frame: pl.DataFrame) -> StepSummary:
    """A step frame's StepSummary: the per-step sums _steps makes of its rows, from the same columns."""
    ranks: dict[tuple[str, int], list] = {}
    steps: dict[str, dict[int, list]] = {}
    columns = [frame.get_column(c).to_list() for c in _SUMMARY_COLUMNS]
    # The last rank's and job's entries kept at hand, and no min/max calls: this runs for each of a batch's rows in the
    # ingest worker, whose time is on every batch's way (about a sixth less than looking each up every row).
    last_key, r, last_job, by_step = None, None, None, None
    for job_name, rank, pid, step, ts, duration, world, sync, comm, data, pstart, restored in zip(*columns):
        end = ts + duration
        comp = sync if sync is not None else duration - comm if comm is not None else duration
        pid = pid or 0
        key = (job_name, rank)
        if key != last_key:
            r = ranks.get(key)
            last_key = key
        if r is None:
            r = ranks[key] = [step, step, True, {pid}, False, step]
        else:
            if step < r[5]:
                r[2] = False
            if step < r[0]:
                r[0] = step
            elif step > r[1]:
                r[1] = step
            r[5] = step
            r[3].add(pid)
        if pstart is not None or restored is not None:
            r[4] = True
        if job_name != last_job:
            by_step = steps.get(job_name)
            if by_step is None:
                by_step = steps[job_name] = {}
            last_job = job_name
        acc = by_step.get(step)
        if acc is None:
            by_step[step] = _first(ts, end, comp, data, world)
        else:
            _fold(acc, ts, end, comp, data, world)
    return StepSummary({k: (v[0], v[1], v[2], frozenset(v[3]), v[4]) for k, v in ranks.items()},
                       {job: [(step, *acc) for step, acc in by_step.items()] for job, by_step in steps.items()})


def _first(ts: float, end: float, comp: float, data: float | None, world: int) -> list:
    """A step's sums from its first row: first ts, last end, rows, compute sum and max, data sum and rows, world."""
    return [ts, end, 1, comp, comp, data or 0.0, 0 if data is None else 1, world]


def _fold(acc: list, ts: float, end: float, comp: float, data: float | None, world: int) -> None:
    """Add one more row of the step to its sums (`_first`'s layout)."""
    if ts < acc[0]:
        acc[0] = ts
    if end > acc[1]:
        acc[1] = end
    acc[2] += 1
    acc[3] += comp
    if comp > acc[4]:
        acc[4] = comp
    if data is not None:
        acc[5] += data
        acc[6] += 1
    if world > acc[7]:
        acc[7] = world


def _pause_class(reason: str) -> str:
    return "checkpoint" if reason == "checkpoint" else "pause"


class GoodputLedger:
    """Per training job, what goodput needs, kept as rows arrive (see the module docstring)."""

    def __init__(self, retention_s: float | None = None, budget_bytes: int | None = None) -> None:
        self.retention_s = retention_s
        self.budget_bytes = budget_bytes  # for its unsettled steps (memory()); None: no bound
        self.settled_early = 0  # steps settled before SETTLE_S to keep within the budget
        self._warned = 0.0
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._encoded: dict[str, tuple[int, dict]] = {}  # job -> (its changes, its parts) at the last snapshot

    # --- rows in ----------------------------------------------------------------------------------
    def observe(self, kind: str, frame: pl.DataFrame, now: float | None = None) -> None:
        """A store observer: see each new row once (ingest and WAL replay)."""
        if frame.height == 0:
            return
        now = time.time() if now is None else now
        if kind == "steps":
            self._steps(frame, now)
        elif kind == "pauses":
            self._pauses(frame, now)

    def tag(self, steps: pl.DataFrame, now: float | None = None, summary: StepSummary | None = None) -> pl.DataFrame:
        """Observe new step rows (as `observe` does) and return them with the incarnation each belongs to in
        their `incarnation` column: the hot tier keeps the per-step aggregates of each incarnation apart.
        `summary` is `summarize(steps)`, made by an ingest worker (collector.decoders): when every rank goes on
        as it was, the ledger takes it instead of going through the rows (the same result, in a tenth of the time)."""
        if steps.height == 0:
            return steps
        now = time.time() if now is None else now
        by_job = self._summarized(summary, now) if summary is not None else None
        if by_job is None:
            incs = pl.Series("incarnation", self._steps(steps, now), dtype=pl.Int32)
        elif len(by_job) == 1:
            # Series methods, not expressions: an expression runs on polars' thread pool, where it would wait behind
            # the hot tier's upkeep (tens of ms); this is a few microseconds.
            incs = pl.Series("incarnation", [next(iter(by_job.values()))], dtype=pl.Int32).new_from_index(0, steps.height)
        else:
            incs = pl.Series("incarnation", [by_job[j] for j in steps.get_column("job").to_list()], dtype=pl.Int32)
        if "incarnation" not in steps.columns:
            return steps.with_columns(incs)
        out = steps.clone()  # shallow; replacing a column in place skips the query engine (~0.1 ms a batch)
        out.replace_column(steps.get_column_index("incarnation"), incs)
        return out

    def _summarized(self, summary: StepSummary, now: float) -> dict[str, int] | None:
        """Apply a batch's summary when every rank in it goes on as it was (what the rows' usual path in _steps
        does, rank by rank and step by step): job -> its incarnation. None, changing nothing, when a rank is new,
        restarted, declared itself, went back, or its job's ranks are in different incarnations."""
        with self._lock:
            incs: dict[str, int] = {}
            for (job_name, rank), (low, _, ordered, pids, declared) in summary.ranks.items():
                job = self._jobs.get(job_name)
                r = job.ranks.get(rank) if job is not None else None
                if r is None or not r.stepped or declared or not ordered or low < r.max_step or r.inc not in job.incs:
                    return None
                if job.open.get(rank) or any(pid and pid != r.pid for pid in pids):
                    return None
                if incs.setdefault(job_name, r.inc) != r.inc:
                    return None
            for (job_name, rank), (_, high, _, pids, _) in summary.ranks.items():
                job = self._jobs[job_name]
                r = job.ranks[rank]
                r.max_step = max(r.max_step, high)
                meta = job.incs[r.inc]
                for pid in pids:
                    if pid not in meta.pids and len(meta.pids) < MAX_PIDS:
                        meta.pids.add(pid)
            for job_name, steps in summary.steps.items():
                job, inc = self._jobs[job_name], incs[job_name]
                job.seen = now
                job.changes += 1
                last_key, by_step = None, None
                for step, ts, end, n, comp, comp_max, data, data_n, world in steps:
                    key = (inc, step >> BLOCK_BITS)
                    if key != last_key:
                        by_step = job.blocks.get(key)
                        if by_step is None:
                            by_step = job.blocks[key] = {}
                        job.touched[key] = now
                        job.dirty.add(key)
                        last_key = key
                    kept = by_step.get(step)
                    if kept is None:
                        by_step[step] = (ts, end, n, comp, comp_max, data, data_n, world, now)
                    else:
                        by_step[step] = (min(kept[0], ts), max(kept[1], end), kept[2] + n, kept[3] + comp,
                                         max(kept[4], comp_max), kept[5] + data, kept[6] + data_n, max(kept[7], world), now)
        return incs

    def _steps(self, frame: pl.DataFrame, now: float) -> list[int]:
        # Plain lists, not polars expressions: a batch holds a few rows, and expressions cost ~40 us a row there.
        columns = [frame.get_column(c).to_list() for c in _SUMMARY_COLUMNS]
        incs: list[int] = []
        append = incs.append
        job_name_now, job = None, _Job()
        last_step, last_inc, last_job, last_key, acc = None, None, None, None, None
        home, home_step = None, None  # where the step being summed (`acc`, a list while it is) is kept as a tuple
        with self._lock:
            for job_name, rank, pid, step, ts, duration, world, sync, comm, data, pstart, restored in zip(*columns):
                end = ts + duration
                # A rank's compute before it waits for its peers, as collector.training.compute_times has it.
                comp = sync if sync is not None else duration - comm if comm is not None else duration
                if job_name != job_name_now:  # a batch holds one job's rows, or a few jobs' in runs
                    job = self._jobs.get(job_name)
                    if job is None:
                        job = self._jobs[job_name] = _Job()
                    job.seen, job_name_now = now, job_name
                    job.changes += 1
                pid = pid or 0
                r = job.ranks.get(rank)
                # The usual row: the same process's next step, nothing declared (what _incarnation_of would do).
                meta = job.incs.get(r.inc) if r is not None else None
                if (meta is not None and r.stepped and restored is None and pstart is None and step >= r.max_step
                        and (pid == r.pid or not pid) and not job.open.get(rank)):
                    r.max_step = step
                    inc = r.inc
                    if pid not in meta.pids and len(meta.pids) < MAX_PIDS:
                        meta.pids.add(pid)
                else:
                    inc = self._incarnation_of(job, rank, pid, step, pstart, restored, ts)
                append(inc)
                if step != last_step or inc != last_inc or job is not last_job:  # a step's ranks come together
                    key = (inc, step >> BLOCK_BITS)
                    by_step = job.blocks.get(key)
                    if by_step is None:
                        by_step = job.blocks[key] = {}
                    if key != last_key or job is not last_job:  # another job's block may have the same key
                        job.touched[key] = now
                        job.dirty.add(key)
                        last_key = key
                    if acc is not None:
                        home[home_step] = tuple(acc)
                    kept = by_step.get(step)
                    last_step, last_inc, last_job, home, home_step = step, inc, job, by_step, step
                    if kept is None:
                        acc = _first(ts, end, comp, data, world)
                        acc.append(now)  # the step's last row came at
                        continue
                    acc = list(kept)
                _fold(acc, ts, end, comp, data, world)
                acc[8] = now
            if acc is not None:
                home[home_step] = tuple(acc)
        return incs

    @staticmethod
    def _incarnation_of(job: _Job, rank: int, pid: int, step: int, pstart: float | None, restored: int | None,
                        ts: float) -> int:
        """The incarnation a rank's step belongs to, opening one when the rank restarted."""
        r = job.ranks.get(rank)
        if r is None:
            r = job.ranks[rank] = _Rank(job.max_inc, pid, pstart)
        elif r.stepped and ((pid and r.pid and pid != r.pid) or restored is not None or step < r.max_step
                            or (pstart is not None and r.process_start is not None and pstart != r.process_start)):
            inc = r.inc + 1 if r.inc >= job.max_inc else job.max_inc
            job.ranks[rank] = r = _Rank(inc, pid, pstart)
            job.open.pop(rank, None)  # a pause the old process never ended: gone with it
        r.pid, r.process_start = r.pid or pid, r.process_start if pstart is None else pstart
        r.stepped, r.max_step = True, max(r.max_step, step)
        job.max_inc = max(job.max_inc, r.inc)
        meta = job.incs.get(r.inc)
        if meta is None:
            meta = job.incs[r.inc] = _Incarnation()
        if pstart is not None and (meta.start is None or pstart < meta.start):
            meta.start = pstart
        if restored is not None and (meta.restored is None or restored < meta.restored):
            meta.restored = restored
        if len(meta.pids) < MAX_PIDS:
            meta.pids.add(pid)
        begun = job.open.get(rank)
        if begun:  # a step of the same process after a pause began: the pause ended then
            for reason in [k for k, begin in begun.items() if begin <= ts]:
                job.pauses[_pause_class(reason)].append((begun.pop(reason), ts))
        return r.inc

    def _pauses(self, frame: pl.DataFrame, now: float) -> None:
        rows = frame.select(pl.col("job").cast(pl.String), "rank", pl.col("reason").cast(pl.String),
                            pl.col("phase").cast(pl.String), "ts", pl.col("duration_s").cast(pl.Float64))
        with self._lock:
            for job_name, rank, reason, phase, ts, duration in rows.iter_rows():
                if reason == "finished":  # the job's end, not time of it
                    continue
                job = self._jobs.get(job_name)
                if job is None:
                    job = self._jobs[job_name] = _Job()
                job.seen = now
                job.changes += 1
                if phase == "begin":
                    job.open.setdefault(rank, {})[reason] = ts
                    continue
                begin = job.open.get(rank, {}).pop(reason, None)
                start = ts - duration if duration is not None else begin
                if start is not None and ts >= start:
                    intervals = job.pauses[_pause_class(reason)]
                    intervals.append((start, ts))
                    if len(intervals) > 256:  # thousands of ranks declare the same checkpoint: one interval
                        job.pauses[_pause_class(reason)] = union(intervals)

    # --- upkeep -----------------------------------------------------------------------------------
    def memory(self) -> int:
        """Bytes its unsettled steps hold (an estimate: STEP_BYTES a step, and their encoded blocks' own size). They
        grow with the steps a second of every job together, for SETTLE_S: a job stepping once a second holds 600."""
        with self._lock:
            return self._unsettled_bytes()

    def _unsettled_bytes(self) -> int:
        return sum(self._block_bytes(job, key) for job in self._jobs.values() for key in job.blocks)

    @staticmethod
    def _block_bytes(job: _Job, key: tuple) -> int:
        encoded = job.encoded.get(key)
        return len(job.blocks[key]) * STEP_BYTES + (len(encoded[2]) if encoded is not None else 0)

    def maintain(self, now: float | None = None) -> None:
        """Fold settled steps into spans (early, oldest first, while the unsettled ones are over the budget), forget
        jobs older than the retention."""
        now = time.time() if now is None else now
        with self._lock:
            if self.retention_s is not None:
                for name in [n for n, j in self._jobs.items() if j.seen < now - self.retention_s]:
                    del self._jobs[name]
            for job in self._jobs.values():
                if job.blocks:
                    job.changes += 1
                self._typical(job)
                self._settle(job, [k for k, last in job.touched.items() if last < now - SETTLE_S])
                for kind, intervals in job.pauses.items():
                    job.pauses[kind] = union(intervals)
            if self.budget_bytes is not None:
                self._fit_budget(now)

    def _settle(self, job: _Job, keys: list) -> int:
        """Fold these blocks of the job into its spans, in time order; the steps settled."""
        settled = []
        for key in keys:
            settled += (((key[0], step), acc) for step, acc in job.blocks.pop(key).items())
            del job.touched[key]
            job.dirty.discard(key)
            job.encoded.pop(key, None)
        settled.sort(key=lambda kv: kv[1][0])
        if settled:
            self._fold(job, settled)
        return len(settled)

    def _fit_budget(self, now: float) -> None:
        """Over the budget: settle the blocks that rows came to longest ago (not in the last EARLY_SETTLE_S) first."""
        used = self._unsettled_bytes()
        if used <= self.budget_bytes:
            return
        chosen: dict[str, list] = {}
        for last, name, key in sorted((last, name, key) for name, job in self._jobs.items()
                                      for key, last in job.touched.items() if last < now - EARLY_SETTLE_S):
            if used <= self.budget_bytes:
                break
            used -= self._block_bytes(self._jobs[name], key)
            chosen.setdefault(name, []).append(key)
        for name, keys in chosen.items():
            self.settled_early += self._settle(self._jobs[name], keys)
        if used > self.budget_bytes and now - self._warned > 600:
            self._warned = now
            log.warning("goodput ledger: %d bytes of steps from the last %.0f s, over its budget of %d bytes; they "
                        "settle as they age", used, EARLY_SETTLE_S, self.budget_bytes)

    @staticmethod
    def _typical(job: _Job) -> None:
        """The job's typical step and data phase, from its latest TYPICAL_STEPS unsettled steps (kept when there
        are none)."""
        if not job.blocks:
            return
        recent = []
        for by_step in reversed(job.blocks.values()):
            recent += by_step.values()
            if len(recent) >= TYPICAL_STEPS:
                break
        walls = sorted(v[1] - v[0] for v in recent)
        job.step_s = walls[len(walls) // 2]
        datas = sorted(v[5] / v[6] for v in recent if v[6])
        if datas:
            job.data_s = datas[len(datas) // 2]

    def _fold(self, job: _Job, settled: list) -> None:
        limit = hang_after(job.step_s)
        declared = _Cover([iv for ivs in job.pauses.values() for iv in ivs])
        last = {}  # incarnation -> index of its last span
        for i, span in enumerate(job.spans):
            last[span[0]] = i
        for (inc, step), acc in settled:
            straggler, data = _waits(acc, job.data_s)
            i = last.get(inc)
            span = job.spans[i] if i is not None else None
            if (span is not None and span[2] < step and span[2] - span[1] + 1 < SPAN_STEPS
                    and 0 <= acc[0] - span[4] <= limit and declared.over(span[4], acc[0]) == 0):
                span[2], span[4] = step, max(span[4], acc[1])
                span[5] = max(span[5], acc[7])
                span[6] += straggler
                span[7] += data
            else:
                job.spans.append([inc, step, step, acc[0], acc[1], acc[7], straggler, data])
                last[inc] = len(job.spans) - 1

    # --- reads ------------------------------------------------------------------------------------
    def jobs(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs)

    def inputs(self, job: str, now: float | None = None) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, float] | None:
        """What `account` needs for `job` (segments, incarnations, pauses, hang threshold), or None."""
        now = time.time() if now is None else now
        with self._lock:
            j = self._jobs.get(job)
            if j is None:
                return None
            self._typical(j)
            segments = [list(s) for s in j.spans]
            for (inc, _), by_step in j.blocks.items():
                for step, acc in by_step.items():
                    straggler, data = _waits(acc, j.data_s)
                    segments.append([inc, step, step, acc[0], acc[1], acc[7], straggler, data])
            incs = [(i, m.start, m.restored, len(m.pids)) for i, m in j.incs.items()]
            pauses = [(kind, a, b) for kind, ivs in j.pauses.items() for a, b in ivs]
            # A pause under way counts until now, but not for longer than a job may be silent before it is
            # stopped: one whose end never comes (the job died in it) must not count forever.
            pauses += [(_pause_class(reason), ts, max(ts, min(now, ts + STOPPED_AFTER_S)))
                       for begun in j.open.values() for reason, ts in begun.items()]
            limit = hang_after(j.step_s)
        return (pl.DataFrame(segments, schema=SEGMENTS, orient="row"), pl.DataFrame(incs, schema=INCARNATIONS, orient="row"),
                pl.DataFrame(pauses, schema=PAUSES, orient="row"), limit)

    def pieces(self, job: str, now: float | None = None) -> tuple[pl.DataFrame, pl.DataFrame] | None:
        """The job's pieces of time and its incarnations, or None for a job the ledger does not know."""
        got = self.inputs(job, now)
        if got is None:
            return None
        segments, incs, pauses, limit = got
        return account(segments, incs, pauses, limit), incarnation_table(segments, incs)

    def report(self, job: str, since: float | None = None, until: float | None = None,
               now: float | None = None) -> Report | None:
        """GPU seconds per reason over [since, until] (default: the job's whole life), or None for a job
        the ledger does not know."""
        got = self.pieces(job, now)
        if got is None:
            return None
        pieces, incs = got
        seconds = totals(pieces, since, until)
        if since is not None:
            incs = incs.filter(pl.col("last_step_end_ts") >= since)
        if until is not None:
            incs = incs.filter(pl.col("start_ts") <= until)
        return Report(job, seconds, ratio(seconds), incs, pieces)

    # --- checkpoint -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Ahead of a checkpoint, off the store's gate: encode the blocks rows came to since the last snapshot, a
        few at a time (ingest waits for this lock), so that the snapshot under the gate encodes only the blocks
        rows come to in between. A job stepping thousands of times a second adds a hundred blocks a checkpoint."""
        for name in list(self._jobs):
            while True:
                with self._lock:
                    job = self._jobs.get(name)
                    if job is None or not job.dirty:
                        break
                    job.encode_dirty(PREPARE_BLOCKS)

    def snapshot(self) -> _Snapshot:
        """Every job, for the store's checkpoint, which calls it under its gate and writes `bytes()` of it after.
        Under the gate only what changed is encoded (a job's head when it changed, the blocks rows came to since
        prepare()); the megabytes of blocks encoded before are copied into one document later, off the gate."""
        with self._lock:
            parts = {}
            for name, job in self._jobs.items():
                cached = self._encoded.get(name)
                if cached is None or cached[0] != job.changes:
                    job.encode_dirty()
                    # [inc, block, {step: acc}] each, ready: under the gate a copy of the list, not a list made anew
                    # (tens of thousands of blocks when a job steps thousands of times a second)
                    blocks = list(job.encoded.values())
                    cached = self._encoded[name] = (job.changes, (_encode(_dump(job)), blocks))
                parts[name] = cached[1]
            for gone in self._encoded.keys() - self._jobs.keys():
                del self._encoded[gone]
            return _Snapshot(parts)

    def restore(self, data: bytes) -> None:
        # msgpack; JSON (a document starting with "{") before: msgpack encodes the blocks' numbers five times faster
        saved = msgspec.json.decode(data) if data[:1] == b"{" else msgspec.msgpack.decode(data)
        with self._lock:
            self._jobs = {name: _load(state) for name, state in saved.items()}
            self._encoded = {}


# msgpack, not JSON: the blocks are millions of floats, which JSON spells out digit by digit (a checkpoint at
# 100,000 step events a second encoded them in 180 ms holding the GIL; now 40).
_encode = msgspec.msgpack.Encoder().encode


class _Snapshot:
    """The ledger's checkpoint document: parts taken under the store's gate (each job's encoded head and the list of
    its encoded blocks, made for this snapshot), written after it by chunks(): one msgpack document,
    {job: {"head": {...}, "blocks": [[inc, block, {step: acc}], ...]}}, framed here around the pieces already
    encoded. Joining them into one buffer first held the GIL 20-40 ms a checkpoint (tens of MB at 100,000 step
    events a second) while ingest waited for it; written piece by piece, the file's writes release it."""

    def __init__(self, parts: dict[str, tuple[bytes, list]]) -> None:
        self._parts = parts

    def chunks(self) -> Iterator[bytes]:
        yield _header(0x80, 0xDE, 0xDF, len(self._parts))
        for name, (head, blocks) in self._parts.items():
            yield _encode(name) + _HEAD_KEY + head + _BLOCKS_KEY + _header(0x90, 0xDC, 0xDD, len(blocks))
            for inc, block, encoded in blocks:
                yield b"\x93" + _encode(inc) + _encode(block)
                yield encoded

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())


def _header(fix: int, size16: int, size32: int, n: int) -> bytes:
    """The msgpack header of a map (0x80, 0xde, 0xdf) or an array (0x90, 0xdc, 0xdd) of n items."""
    if n < 16:
        return bytes((fix | n,))
    return struct.pack(">BH", size16, n) if n < 1 << 16 else struct.pack(">BI", size32, n)


_HEAD_KEY = b"\x82" + _encode("head")  # a job's map: two keys
_BLOCKS_KEY = _encode("blocks")


def _waits(acc: list, data_s: float | None) -> tuple[float, float]:
    """GPU seconds of one step's accumulated rows spent waiting for the slowest rank and stalled on data,
    scaled from the ranks that reported to the world size."""
    ranks, world = acc[2], acc[7]
    scale = world / ranks if ranks else 0.0
    straggler = max(0.0, ranks * acc[4] - acc[3]) * scale
    data = max(0.0, acc[5] - acc[6] * data_s) * scale if data_s is not None and acc[6] else 0.0
    return straggler, data


def _dump(job: _Job) -> dict:
    return {
        "max_inc": job.max_inc, "step_s": job.step_s, "data_s": job.data_s, "seen": job.seen,
        "ranks": [[rank, r.inc, r.pid, r.process_start, r.max_step, r.stepped] for rank, r in job.ranks.items()],
        "incs": [[i, m.start, m.restored, sorted(m.pids)] for i, m in job.incs.items()],
        "spans": job.spans, "pauses": {k: [list(iv) for iv in union(v)] for k, v in job.pauses.items()},
        "open": [[rank, reason, ts] for rank, begun in job.open.items() for reason, ts in begun.items()],
    }


def _load(state: dict) -> _Job:
    blocks = state.get("blocks", ())
    if "head" in state:  # {"head": {...}, "blocks": [...]}; before, one flat dict
        state = state["head"]
    job = _Job(max_inc=state["max_inc"], step_s=state["step_s"], data_s=state["data_s"], seen=state["seen"])
    job.ranks = {rank: _Rank(inc, pid, ps, ms, st) for rank, inc, pid, ps, ms, st in state["ranks"]}
    job.incs = {i: _Incarnation(start, restored, set(pids)) for i, start, restored, pids in state["incs"]}
    # A block restored was last touched by its latest row, as before the restart.
    now = time.time()
    for inc, block, by_step in blocks:
        job.blocks[(inc, block)] = {int(step): tuple(acc) for step, acc in by_step.items()}
    for inc, step, *acc in state.get("steps", ()):  # a snapshot from before blocks: [[inc, step, *acc], ...]
        job.blocks.setdefault((inc, step >> BLOCK_BITS), {})[step] = tuple(acc)
    job.touched = {key: max((acc[8] for acc in by_step.values()), default=now) for key, by_step in job.blocks.items()}
    job.dirty = set(job.blocks)
    job.spans = state["spans"]
    job.pauses = {k: [tuple(iv) for iv in v] for k, v in state["pauses"].items()}
    for rank, reason, ts in state["open"]:
        job.open.setdefault(rank, {})[reason] = ts
    return job
