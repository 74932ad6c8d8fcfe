"""Goodput: where every GPU-hour of a training job went, across its restarts.

A job is the same job across restarts (its name); each restart is an *incarnation*. GPU time is wall
time x the job's world size, and every second of a job's life goes to one reason (REASONS):
productive steps; `recomputed` (the first run of steps whose numbers a later incarnation reached
again after restoring a checkpoint); `checkpoint` (declared pause "checkpoint"); `startup` (process
start to the first step of each incarnation, and the gap from one incarnation's last step to the
next's start: the failure, noticing it, rescheduling); `hang` (an undeclared silence between steps
longer than the hang threshold of collector.training); `pause` (any other declared pause:
evaluation, validation); `data_stall` (time in the `data` phase beyond the job's typical one) and
`straggler_wait` (per step, each rank's wait for the slowest: the slowest rank's compute minus its
own). Short gaps between steps (logging, the loop itself) go with the step before them.
`goodput_ratio` = productive / total.

Design: an incremental ledger, not a query over the raw tables. A week of 1 s steps from 4,096 ranks
is 2.5 billion step rows; no read may scan them. The store shows the ledger every row it applies
(ingest and WAL replay, as the SLO ledger) and snapshots it at each checkpoint, so it covers a
job's whole life and survives a collector restart exactly. Per job it keeps:
- each rank's current incarnation: a rank begins a new one when its pid or process start changes,
  when it reports `restored_step`, or when its step number goes back; a rank that restarts joins
  the newest incarnation its job has, or opens the next one;
- per (incarnation, step) sums over the ranks that reported it (start, end, compute total and
  slowest, data-phase total), until no row has come for SETTLE_S;
- then *spans* of up to SPAN_STEPS settled steps, broken wherever a gap between steps is a hang or
  holds a declared pause: a week of 1 s steps is ~10,000 spans (about a megabyte), whatever the
  number of ranks;
- the union of each kind of declared pause (thousands of ranks declaring the same checkpoint are one
  interval).
A read (`report`) turns this into pieces of time (collector.goodput.account, pure) and sums them
over [since, until]. Lost work is exact to the step while the steps are unsettled (the last ~10
minutes) and split by step count inside a span otherwise.

Approximations, stated: a rank's data stall is the step's data-phase total beyond ranks x the
job's typical data phase (per-step sums, not per-rank excesses); straggler wait uses each rank's
compute as collector.training.compute_times defines it (DDP's sync arrival, else the step less its
`comm` phase, else the whole step) - without phases, in synchronous training every rank's step
lasts as long as the slowest's and the wait cannot be seen; sums from fewer ranks than the world
size are scaled to it. History older than the ledger itself (before it was deployed, or a collector
restored without its snapshot) is not counted.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from dataclasses import dataclass, field

import polars as pl

from collector.training import HANG_FACTOR, HANG_MIN_S, STOPPED_AFTER_S

REASONS = ("productive", "recomputed", "checkpoint", "startup", "hang", "pause", "data_stall", "straggler_wait")
BADPUT = REASONS[1:]
SETTLE_S = 600.0  # a step no row has come for in this long is folded into a span
SPAN_STEPS = 64
MAX_PIDS = 65_536  # per incarnation, for its pid count

PIECES = {"ts": pl.Float64, "end_ts": pl.Float64, "reason": pl.String, "gpu_s": pl.Float64}
SEGMENTS = {"incarnation": pl.Int64, "step_lo": pl.Int64, "step_hi": pl.Int64, "ts": pl.Float64, "end_ts": pl.Float64,
            "world_size": pl.Int64, "straggler_gpu_s": pl.Float64, "data_gpu_s": pl.Float64}
INCARNATIONS = {"incarnation": pl.Int64, "start_ts": pl.Float64, "restored_step": pl.Int64, "pids": pl.Int64}
PAUSES = {"reason": pl.String, "start_ts": pl.Float64, "end_ts": pl.Float64}


# --- the accounting (pure) ----------------------------------------------------------------------------
class _Cover:
    """Disjoint sorted intervals, and how much of [a, b] they cover."""

    def __init__(self, intervals: list[tuple[float, float]]) -> None:
        merged = union(intervals)
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]
        self.cum, total = [], 0.0
        for a, b in merged:
            total += b - a
            self.cum.append(total)

    def _upto(self, t: float) -> float:
        i = bisect.bisect_right(self.starts, t)
        return 0.0 if i == 0 else self.cum[i - 1] - max(0.0, self.ends[i - 1] - t)

    def over(self, a: float, b: float) -> float:
        return max(0.0, self._upto(b) - self._upto(a)) if b > a else 0.0


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def hang_after(step_s: float | None) -> float:
    """The silence between steps that is a hang: collector.training's threshold."""
    return max(HANG_FACTOR * step_s, HANG_MIN_S) if step_s else HANG_MIN_S


def account(segments: pl.DataFrame, incarnations: pl.DataFrame, pauses: pl.DataFrame, hang_after_s: float) -> pl.DataFrame:
    """Every second of one job as pieces (ts, end_ts, reason, gpu_s): GPU seconds of one reason spread over
    [ts, end_ts]. `segments` (SEGMENTS): steps or spans of consecutive steps of an incarnation, with the
    GPU seconds ranks waited for stragglers and stalled on data in them; `incarnations` (INCARNATIONS): the
    earliest process start of each and the step it restored; `pauses` (PAUSES): declared pauses, reason
    "checkpoint" or any other."""
    out: list[tuple[float, float, str, float]] = []
    if segments.height == 0:
        return pl.DataFrame(schema=PIECES)
    checkpoints = _Cover([(a, b) for r, a, b in pauses.iter_rows() if r == "checkpoint"])
    declared = _Cover([(a, b) for _, a, b in pauses.iter_rows()])
    meta = {i: (s, r) for i, s, r, _ in incarnations.iter_rows()}
    by_inc: dict[int, list[tuple]] = {}
    for row in segments.sort("ts").iter_rows():
        by_inc.setdefault(row[0], []).append(row)
    order = sorted(by_inc, key=lambda i: (_start(meta.get(i), by_inc[i][0][3]), i))
    floors, floor = {}, math.inf  # the lowest step any later incarnation began from
    for inc in reversed(order):
        floors[inc] = floor
        restored = (meta.get(inc) or (None, None))[1]
        floor = min(floor, restored if restored is not None else min(s[1] for s in by_inc[inc]))

    def gap(a: float, b: float, world: int, rest_to: str | None, lost: float) -> None:
        """A time without steps: declared pauses first; the rest by `rest_to`, or (None) a hang when long,
        else the loop's overhead, which goes with the step before it."""
        if b <= a:
            return
        ck = checkpoints.over(a, b)
        other = declared.over(a, b) - ck
        rest = max(0.0, (b - a) - ck - other)
        out.extend(p for p in ((a, b, "checkpoint", ck * world), (a, b, "pause", other * world)) if p[3] > 0)
        if rest <= 0:
            return
        if rest_to is not None:
            out.append((a, b, rest_to, rest * world))
        elif rest > hang_after_s:
            out.append((a, b, "hang", rest * world))
        else:
            out.append((a, b, "recomputed", rest * world * lost))
            out.append((a, b, "productive", rest * world * (1 - lost)))

    previous_end = None
    for inc in order:
        rows = by_inc[inc]
        world = max(r[5] for r in rows)
        start = _start(meta.get(inc), rows[0][3])
        if previous_end is not None:  # the restart: from the last step of the one before to this one's start
            gap(previous_end, max(start, previous_end), world, "startup", 0.0)
        gap(max(start, previous_end or start), rows[0][3], world, "startup", 0.0)
        end, lost, floor_ts = None, 0.0, previous_end
        for _, lo, hi, ts, end_ts, w, straggler, data in rows:
            if end is not None:
                gap(end, ts, world, None, lost)
            if floor_ts is not None:  # ranks' skew overlaps steps a little: no second is counted twice
                ts = min(max(ts, floor_ts), end_ts)
            lost = min(1.0, max(0.0, (hi - floors[inc] + 1) / (hi - lo + 1)))
            total = max(0.0, end_ts - ts) * w
            keep = total * (1 - lost)
            waited = min(straggler * (1 - lost), keep)
            stalled = min(data * (1 - lost), keep - waited)
            out.extend(((ts, end_ts, "recomputed", total * lost), (ts, end_ts, "straggler_wait", waited),
                        (ts, end_ts, "data_stall", stalled), (ts, end_ts, "productive", keep - waited - stalled)))
            end = end_ts if end is None else max(end, end_ts)
            floor_ts = end
        previous_end = end if previous_end is None else max(previous_end, end)
    # Declared pauses after the last step (a final checkpoint, one under way) count too.
    last_world = max(r[5] for r in by_inc[order[-1]])
    for reason, a, b in pauses.iter_rows():
        if b > previous_end:
            a = max(a, previous_end)
            out.append((a, b, "checkpoint" if reason == "checkpoint" else "pause", (b - a) * last_world))
    return pl.DataFrame(out, schema=PIECES, orient="row").filter(pl.col("gpu_s") > 0)


def _start(meta: tuple | None, first_ts: float) -> float:
    """An incarnation's start: its earliest process start, never after its first step."""
    start = meta[0] if meta is not None else None
    return first_ts if start is None or start > first_ts else start


def _clipped(pieces: pl.DataFrame, since: float | None, until: float | None) -> pl.DataFrame:
    """Pieces cut to [since, until], their GPU seconds in proportion (an instant piece is in or out)."""
    lo = pl.lit(-math.inf if since is None else since)
    hi = pl.lit(math.inf if until is None else until)
    a, b = pl.max_horizontal("ts", lo), pl.min_horizontal("end_ts", hi)
    length = pl.col("end_ts") - pl.col("ts")
    share = pl.when(length > 0).then(((b - a) / length).clip(0, 1)).otherwise(
        ((pl.col("ts") >= lo) & (pl.col("ts") <= hi)).cast(pl.Float64))
    return pieces.with_columns((pl.col("gpu_s") * share).alias("gpu_s"), a.alias("ts"), b.alias("end_ts")).filter(
        pl.col("gpu_s") > 0)


def totals(pieces: pl.DataFrame, since: float | None = None, until: float | None = None) -> dict[str, float]:
    """GPU seconds per reason over [since, until], every reason present."""
    sums = dict(_clipped(pieces, since, until).group_by("reason").agg(pl.col("gpu_s").sum()).iter_rows())
    return {reason: float(sums.get(reason, 0.0)) for reason in REASONS}


def ratio(seconds: dict[str, float]) -> float | None:
    total = sum(seconds.values())
    return seconds["productive"] / total if total > 0 else None


def over_time(pieces: pl.DataFrame, since: float | None, until: float | None, max_points: int) -> pl.DataFrame:
    """GPU seconds per reason in buckets of whole minutes (at most `max_points` of them): ts, then a
    column per reason."""
    cut = _clipped(pieces, since, until)
    if cut.height == 0:
        return pl.DataFrame(schema={"ts": pl.Float64, **{r: pl.Float64 for r in REASONS}})
    lo, hi = float(cut["ts"].min()), float(cut["end_ts"].max())  # type: ignore[arg-type]
    width = max(60.0, math.ceil((hi - lo) / max(1, max_points - 1) / 60.0) * 60.0)
    length = pl.col("end_ts") - pl.col("ts")
    rows = (cut.with_columns(pl.int_ranges((pl.col("ts") // width).cast(pl.Int64),
                                           (pl.col("end_ts") // width).cast(pl.Int64) + 1).alias("bucket"))
            .explode("bucket")
            .with_columns((pl.col("bucket") * width).cast(pl.Float64).alias("b0"))
            .with_columns(pl.when(length > 0).then(
                pl.col("gpu_s") * ((pl.min_horizontal("end_ts", pl.col("b0") + width) - pl.max_horizontal("ts", "b0"))
                                   / length).clip(0, 1)).otherwise(pl.col("gpu_s")).alias("gpu_s")))
    wide = rows.group_by("b0", "reason").agg(pl.col("gpu_s").sum()).pivot(on="reason", index="b0", values="gpu_s")
    for reason in REASONS:
        if reason not in wide.columns:
            wide = wide.with_columns(pl.lit(0.0).alias(reason))
    return wide.select(pl.col("b0").alias("ts"), *(pl.col(r).fill_null(0.0) for r in REASONS)).sort("ts")


def incarnation_table(segments: pl.DataFrame, incarnations: pl.DataFrame) -> pl.DataFrame:
    """One row per incarnation, in the order they began: start, first step, restored-from step, last step."""
    per = segments.group_by("incarnation").agg(
        pl.col("ts").min().alias("first_step_ts"), pl.col("step_lo").min().alias("first_step"),
        pl.col("step_hi").max().alias("last_step"), pl.col("end_ts").max().alias("last_step_end_ts"),
        pl.col("world_size").max())
    rows = per.join(incarnations, on="incarnation", how="left").with_columns(
        pl.min_horizontal(pl.col("start_ts").fill_null(pl.col("first_step_ts")), "first_step_ts").alias("start_ts"),
        pl.col("pids").fill_null(0))
    return (rows.sort("start_ts", "incarnation").with_row_index("number")
            .select(pl.col("number").cast(pl.Int64), "start_ts", "first_step_ts", pl.col("restored_step").alias("restored_from_step"),
                    "first_step", "last_step", "last_step_end_ts", "pids", "world_size"))


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
    # (incarnation, step) -> [ts, end, ranks, compute sum, compute max, data sum, data ranks, world, last row at]
    steps: dict = field(default_factory=dict)
    spans: list = field(default_factory=list)  # [inc, lo, hi, ts, end, world, straggler gpu-s, data gpu-s]
    pauses: dict = field(default_factory=lambda: {"checkpoint": [], "pause": []})
    open: dict = field(default_factory=dict)  # (rank, reason) -> begin ts, a declared pause not ended yet
    step_s: float | None = None  # the job's typical step, for the hang threshold
    data_s: float | None = None  # its typical data phase
    seen: float = 0.0  # when a row of it last came


def _pause_class(reason: str) -> str:
    return "checkpoint" if reason == "checkpoint" else "pause"


class GoodputLedger:
    """Per training job, what goodput needs, kept as rows arrive (see the module docstring)."""

    def __init__(self, retention_s: float | None = None) -> None:
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

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

    def _steps(self, frame: pl.DataFrame, now: float) -> None:
        # Plain lists, not polars expressions: a batch holds a few rows, and expressions cost ~40 us a row there.
        columns = [frame.get_column(c).to_list() for c in (
            "job", "rank", "pid", "step", "ts", "duration_s", "world_size", "sync_arrival_s", "phase_comm_s",
            "phase_data_s", "process_start_ts", "restored_step")]
        with self._lock:
            for job_name, rank, pid, step, ts, duration, world, sync, comm, data, pstart, restored in zip(*columns):
                end = ts + duration
                # A rank's compute before it waits for its peers, as collector.training.compute_times has it.
                comp = sync if sync is not None else duration - comm if comm is not None else duration
                job = self._jobs.get(job_name)
                if job is None:
                    job = self._jobs[job_name] = _Job()
                job.seen = now
                inc = self._incarnation_of(job, rank, pid or 0, step, pstart, restored, ts)
                acc = job.steps.get((inc, step))
                if acc is None:
                    job.steps[(inc, step)] = [ts, end, 1, comp, comp, data or 0.0, 0 if data is None else 1, world, now]
                    continue
                acc[0], acc[1] = min(acc[0], ts), max(acc[1], end)
                acc[2] += 1
                acc[3] += comp
                acc[4] = max(acc[4], comp)
                if data is not None:
                    acc[5] += data
                    acc[6] += 1
                acc[7], acc[8] = max(acc[7], world), now

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
            for key in [k for k in job.open if k[0] == rank]:  # a pause the old process never ended: gone with it
                del job.open[key]
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
        if job.open:  # a step of the same process after a pause began: the pause ended then
            for key in [k for k in job.open if k[0] == rank and job.open[k] <= ts]:
                job.pauses[_pause_class(key[1])].append((job.open.pop(key), ts))
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
                if phase == "begin":
                    job.open[(rank, reason)] = ts
                    continue
                begin = job.open.pop((rank, reason), None)
                start = ts - duration if duration is not None else begin
                if start is not None and ts >= start:
                    intervals = job.pauses[_pause_class(reason)]
                    intervals.append((start, ts))
                    if len(intervals) > 256:  # thousands of ranks declare the same checkpoint: one interval
                        job.pauses[_pause_class(reason)] = union(intervals)

    # --- upkeep -----------------------------------------------------------------------------------
    def maintain(self, now: float | None = None) -> None:
        """Fold settled steps into spans, forget jobs older than the retention."""
        now = time.time() if now is None else now
        with self._lock:
            if self.retention_s is not None:
                for name in [n for n, j in self._jobs.items() if j.seen < now - self.retention_s]:
                    del self._jobs[name]
            for job in self._jobs.values():
                self._typical(job)
                settled = sorted(((k, v) for k, v in job.steps.items() if v[8] < now - SETTLE_S), key=lambda kv: kv[1][0])
                for key, _ in settled:
                    del job.steps[key]
                if settled:
                    self._fold(job, settled)
                for kind, intervals in job.pauses.items():
                    job.pauses[kind] = union(intervals)

    @staticmethod
    def _typical(job: _Job) -> None:
        """The job's typical step and data phase, from its recent steps (kept when there are none)."""
        if not job.steps:
            return
        walls = sorted(v[1] - v[0] for v in job.steps.values())
        job.step_s = walls[len(walls) // 2]
        datas = sorted(v[5] / v[6] for v in job.steps.values() if v[6])
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
            for (inc, step), acc in j.steps.items():
                straggler, data = _waits(acc, j.data_s)
                segments.append([inc, step, step, acc[0], acc[1], acc[7], straggler, data])
            incs = [(i, m.start, m.restored, len(m.pids)) for i, m in j.incs.items()]
            pauses = [(kind, a, b) for kind, ivs in j.pauses.items() for a, b in ivs]
            # A pause under way counts until now, but not for longer than a job may be silent before it is
            # stopped: one whose end never comes (the job died in it) must not count forever.
            pauses += [(_pause_class(reason), ts, max(ts, min(now, ts + STOPPED_AFTER_S))) for (_, reason), ts in j.open.items()]
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
    def snapshot(self) -> bytes:
        with self._lock:
            return json.dumps({name: _dump(job) for name, job in self._jobs.items()}).encode()

    def restore(self, data: bytes) -> None:
        saved = json.loads(data)
        with self._lock:
            self._jobs = {name: _load(state) for name, state in saved.items()}


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
        "steps": [[inc, step, *acc] for (inc, step), acc in job.steps.items()],
        "spans": job.spans, "pauses": {k: [list(iv) for iv in union(v)] for k, v in job.pauses.items()},
        "open": [[rank, reason, ts] for (rank, reason), ts in job.open.items()],
    }


def _load(state: dict) -> _Job:
    job = _Job(max_inc=state["max_inc"], step_s=state["step_s"], data_s=state["data_s"], seen=state["seen"])
    job.ranks = {rank: _Rank(inc, pid, ps, ms, st) for rank, inc, pid, ps, ms, st in state["ranks"]}
    job.incs = {i: _Incarnation(start, restored, set(pids)) for i, start, restored, pids in state["incs"]}
    job.steps = {(inc, step): acc for inc, step, *acc in state["steps"]}
    job.spans = state["spans"]
    job.pauses = {k: [tuple(iv) for iv in v] for k, v in state["pauses"].items()}
    job.open = {(rank, reason): ts for rank, reason, ts in state["open"]}
    return job
