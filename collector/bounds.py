"""Input bounds: records dated too far ahead or older than retention, and step numbers that jump, are refused one by one.

A batch is screened before it is logged. What passes is stored exactly as if the batch had held only
that; what fails is counted by kind and reason and listed in the ingest reply. The batch as a whole is
still acknowledged: a 4xx would make the agent drop it (or retry it forever), losing the good records
beside the bad one.

Why these bounds: the analysis reads "now" from the collector's clock and "latest" from the largest
step number, so one record dated years ahead hides a hang (its job looks busy until then), one step
numbered 2^53 pushes every real step out of the analysed window, and requests dated ahead dilute every
SLO window until that date. A real agent's clock is within seconds of the collector's, and a real job's
step numbers grow by small amounts (going back to a checkpoint's step after a restart is fine).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import msgspec

from fleetscope.schema import Batch, StepEvent

REASONS = ("future", "too_old", "step_jump")
RECORD_KINDS = ("step", "request", "pause", "host_frame", "server_frame")
LISTED = 100  # refusals listed in one reply; the rest are counted only


@dataclass(frozen=True)
class Refusal:
    field: str  # where in the batch: "events", "frames" or "servers"
    index: int  # position in that list, as sent
    kind: str  # step, request, pause, host_frame, server_frame
    reason: str  # future, too_old, step_jump
    message: str


@dataclass
class Screened:
    batch: Batch  # what passed (the batch itself when nothing was refused)
    refused: int = 0
    counts: Counter = field(default_factory=Counter)  # (kind, reason) -> records refused
    listed: list[Refusal] = field(default_factory=list)  # the first LISTED refusals
    highs: dict = field(default_factory=dict)  # (job, rank) -> highest step that passed


@dataclass(frozen=True)
class Bounds:
    max_future_s: float | None = 600.0
    max_age_s: float | None = None  # the retention: older records would be deleted at once anyway
    max_step_jump: int | None = 1_000_000


class StepHistory:
    """The highest step number each (job, rank), and each job, has reported: the base of the jump bound.

    Read without a lock by screening (a dict lookup is atomic); raised under its lock as batches are
    applied; an entry not raised for `forget`'s horizon is dropped, so names that stop do not pile up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ranks: dict[tuple[str, int], tuple[int, float]] = {}  # -> (highest step, when last raised or seen)
        self.jobs: dict[str, tuple[int, float]] = {}

    def raise_to(self, highs: dict[tuple[str, int], int], now: float) -> None:
        if not highs:
            return
        with self._lock:
            ranks, jobs = self.ranks, self.jobs
            for (job, rank), step in highs.items():
                old = ranks.get((job, rank))
                ranks[(job, rank)] = (step if old is None or step > old[0] else old[0], now)
                old = jobs.get(job)
                jobs[job] = (step if old is None or step > old[0] else old[0], now)

    def raise_jobs(self, highs: dict[str, int], now: float) -> None:
        with self._lock:
            for job, step in highs.items():
                old = self.jobs.get(job)
                self.jobs[job] = (step if old is None or step > old[0] else old[0], now)

    def forget(self, before: float) -> None:
        with self._lock:
            self.ranks = {k: v for k, v in self.ranks.items() if v[1] >= before}
            self.jobs = {k: v for k, v in self.jobs.items() if v[1] >= before}


def step_highs(events) -> dict[tuple[str, int], int]:
    """(job, rank) -> highest step among a batch's step events (for a batch replayed from the log)."""
    highs: dict[tuple[str, int], int] = {}
    for ev in events:
        if type(ev) is StepEvent:
            key = (ev.job, ev.rank)
            old = highs.get(key)
            if old is None or ev.step > old:
                highs[key] = ev.step
    return highs


def screen(batch: Batch, now: float, bounds: Bounds, history: StepHistory) -> Screened:
    """The batch without the records that break the bounds, and what was refused and why."""
    latest = now + bounds.max_future_s if bounds.max_future_s is not None else math.inf
    earliest = now - bounds.max_age_s if bounds.max_age_s is not None else -math.inf
    jump = bounds.max_step_jump
    out = Screened(batch)
    refused: dict[str, set[int]] = {}

    def refuse(where: str, index: int, kind: str, reason: str, explain) -> None:
        out.refused += 1
        out.counts[(kind, reason)] += 1
        refused.setdefault(where, set()).add(index)
        if len(out.listed) < LISTED:  # a flood of refusals costs no message each
            out.listed.append(Refusal(where, index, kind, reason, f"$.{where}[{index}]{explain()}"))

    def dated(where: str, index: int, kind: str, ts: float) -> bool:
        """Refuse a record dated out of bounds; True when it was."""
        if ts > latest:
            refuse(where, index, kind, "future", lambda: (
                f".ts: {ts!r} is {ts - now:.0f} s ahead of the collector's clock; at most "
                f"{bounds.max_future_s:.0f} s are allowed (is the sender's clock wrong?)"))
            return True
        if ts < earliest:
            refuse(where, index, kind, "too_old", lambda: (
                f".ts: {ts!r} is {now - ts:.0f} s in the past, older than the collector's retention of "
                f"{bounds.max_age_s:.0f} s"))
            return True
        return False

    highs = out.highs
    job_highs: dict[str, int] = {}
    ranks, jobs = history.ranks, history.jobs  # the dicts of this moment (forget swaps them)
    for i, ev in enumerate(batch.events):
        ts = ev.ts
        if (ts > latest or ts < earliest) and dated("events", i, ev.__struct_config__.tag, ts):
            continue
        if type(ev) is not StepEvent:
            continue
        key = (ev.job, ev.rank)
        base = highs.get(key)
        if base is None:
            seen = ranks.get(key)
            base = seen[0] if seen is not None else None
        if base is None:  # a rank new to the collector starts where its job is
            seen = jobs.get(ev.job)
            known = [b for b in (job_highs.get(ev.job), seen[0] if seen is not None else None) if b is not None]
            base = max(known) if known else None
        if jump is not None and base is not None and ev.step > base + jump:
            refuse("events", i, "step", "step_jump", lambda: (
                f".step: {ev.step} is {ev.step - base} above the highest step ({base}) of job {ev.job!r} "
                f"rank {ev.rank}; at most {jump} are allowed"))
            continue
        highs[key] = ev.step if base is None or ev.step > base else base
        if ev.step > job_highs.get(ev.job, -1):
            job_highs[ev.job] = ev.step
    for i, frame in enumerate(batch.frames):
        dated("frames", i, "host_frame", frame.ts)
    for i, server in enumerate(batch.servers):
        dated("servers", i, "server_frame", server.ts)
    if refused:
        out.batch = msgspec.structs.replace(batch, **{
            where: [r for i, r in enumerate(getattr(batch, where)) if i not in gone] for where, gone in refused.items()})
    return out


def quick_screen(dated: tuple[float, float] | None, ranks: dict[tuple[str, int], int], now: float, bounds: Bounds,
                 history: StepHistory) -> dict[tuple[str, int], int] | None:
    """`screen`'s verdict from a batch's summary (collector.decoders.Prepared), when it can tell that nothing
    breaks a bound: then the highs `screen` would return, else None (screen the batch itself).

    `dated` is the earliest and latest ts of its records, `ranks` each (job, rank)'s highest step. Nothing is
    refused when every ts is within the bounds and every rank known to the history stays within the jump of
    its highest step: `screen` compares each step with a base that starts there and only rises. A rank new
    to the history is screened against its job's steps, in the batch's order: this leaves it to `screen`."""
    if dated is not None:
        lo, hi = dated
        if bounds.max_future_s is not None and not hi <= now + bounds.max_future_s:
            return None
        if bounds.max_age_s is not None and not lo >= now - bounds.max_age_s:
            return None
    jump, seen = bounds.max_step_jump, history.ranks
    highs: dict[tuple[str, int], int] = {}
    for key, top in ranks.items():
        known = seen.get(key)
        if known is None:
            return None
        base = known[0]
        if jump is not None and top > base + jump:
            return None
        highs[key] = top if top > base else base
    return highs
