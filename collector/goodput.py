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
  slowest, data-phase total), until no row has come for ten minutes (goodput_ledger.SETTLE_S);
- then *spans* of up to 64 settled steps, broken wherever a gap between steps is a hang or holds a
  declared pause: a week of 1 s steps is ~10,000 spans (under a megabyte), whatever the number of ranks;
- the union of each kind of declared pause (thousands of ranks declaring the same checkpoint are one
  interval).
A read turns this into pieces of time (`account`, pure, here) and sums them over [since, until]; the
ledger itself is collector.goodput_ledger. Lost work is exact to the step while the steps are
unsettled (the last ~10 minutes), and split by step count inside a span after that.

Approximations, stated: a rank's data stall is the step's data-phase total beyond ranks x the job's
typical data phase (per-step sums, not per-rank excesses); straggler wait uses each rank's compute
as collector.training.compute_times defines it (DDP's sync arrival, else the step less its `comm`
phase, else the whole step): without phases, in synchronous training every rank's step lasts as
long as the slowest's and the wait cannot be seen; with pipeline parallelism, stages uneven by
design count as waiting too (the pipeline goes at its slowest stage's pace); sums from fewer ranks
than the world size are scaled to it. History older than the ledger (before it was deployed, or a
data directory restored without its checkpoint) is not counted.
"""

from __future__ import annotations

import bisect
import math

import polars as pl

from collector.training import HANG_FACTOR, HANG_MIN_S

REASONS = ("productive", "recomputed", "checkpoint", "startup", "hang", "pause", "data_stall", "straggler_wait")
BADPUT = REASONS[1:]

PIECES = {"ts": pl.Float64, "end_ts": pl.Float64, "reason": pl.String, "gpu_s": pl.Float64}
SEGMENTS = {"incarnation": pl.Int64, "step_lo": pl.Int64, "step_hi": pl.Int64, "ts": pl.Float64, "end_ts": pl.Float64,
            "world_size": pl.Int64, "straggler_gpu_s": pl.Float64, "data_gpu_s": pl.Float64}
INCARNATIONS = {"incarnation": pl.Int64, "start_ts": pl.Float64, "restored_step": pl.Int64, "pids": pl.Int64}
PAUSES = {"reason": pl.String, "start_ts": pl.Float64, "end_ts": pl.Float64}


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
