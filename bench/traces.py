"""Labelled synthetic training traces, for the detectors' tests and `bench/detection.py`.

A trace is the steps table the collector would hold for one synchronous data-parallel job. Each rank's
step is data, forward, backward and optimizer, each with its own jitter (log-normal, ~3%), scaled by a
sequence-length variance that all ranks of a step share and by a slow drift of the whole job. Ranks
meet at the all-reduce at the end of backward: every rank leaves it when the slowest has arrived and
the collective has run, so whole steps take the same time on every rank and the wait sits inside the
phase that holds the collective. How the job reports it (`instrument`):

- "ddp": the four phases (the wait inside backward) plus DDP's `sync_arrival_s` (fleetscope's
  `instrument_ddp`: when the rank reached its first all-reduce), with measurement noise;
- "readme": the four phases only, the README's first example (no `comm`, no `instrument_ddp`);
- "comm": data, forward, backward (compute only), `comm` (the wait and the collective) and optimizer;
- "none": whole steps only (nothing can tell a straggler then).

Faults: a slow rank or node (its extra work in `slow_phase`), a regression from a given step, a hang
(the trace ends early), checkpoint pauses, a restart that restores an earlier step (new pids, step
numbers going back). Real-world noise, off by default: rare heavy-tailed phases (a GC pause, a page
fault storm), contention bursts (one rank slowed for a few steps), warm-up after each start, and
timer noise on `sync_arrival_s`. Pure: no I/O, reproducible from the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import polars as pl

# Shares of a step (at the base speed): the all-reduce itself takes the rest (0.1) after the last arrival.
DATA, FORWARD, BACKWARD, OPTIMIZER, COLLECTIVE = 0.05, 0.25, 0.35, 0.05, 0.10
FIRST_BUCKET = 0.3  # DDP's first gradient bucket is ready this far into backward


@dataclass
class Trace:
    job: str = "trace"
    ranks: int = 16
    ranks_per_node: int = 8
    steps: int = 200
    step_s: float = 1.0
    jitter: float = 0.03
    seq_var: float = 0.05  # step-to-step variation shared by all ranks (sequence lengths)
    drift_per_1000: float = 0.01  # slow drift of the whole job
    stages: int = 1  # pipeline stages; stage s computes (1 + 0.1 s) x the base: uneven by design
    instrument: str = "ddp"  # ddp | readme | comm | none
    slow_rank: int | None = None
    slow_node: int | None = None
    slow_factor: float = 0.10  # the slow rank's compute is this much longer ...
    slow_phase: str = "forward"  # ... all of the extra in this phase
    slow_from_step: int = 0
    regression: float = 0.0  # e.g. 0.03: the whole job 3% slower ...
    regression_from_step: int = 0  # ... from this step on
    checkpoint_every: int = 0  # a declared pause every N steps
    restart_after: int | None = None  # after this many steps the job fails and restarts ...
    restore_to: int = 0  # ... from the checkpoint of this step, after restart_gap_s
    restart_gap_s: float = 60.0
    # real-world noise
    tail_prob: float = 0.0  # per rank and step: a phase takes 1.5-3x (GC pause, page faults)
    burst_prob: float = 0.0  # per step: one rank slowed 20-50% for 2-6 steps (a noisy neighbour)
    warmup_steps: int = 0  # after each start, compute up to +50% (random per rank), fading out
    measurement_noise_s: float = 0.0  # timer noise on sync_arrival_s (standard deviation)
    seed: int = 0
    start_ts: float = 1_800_000_000.0
    labels: dict = field(default_factory=dict)


def noisy(trace: Trace) -> Trace:
    """The same trace with the noise a real job has (as `bench.detection` runs it)."""
    return replace(trace, tail_prob=0.005, burst_prob=0.02, warmup_steps=10,
                   measurement_noise_s=0.002 * trace.step_s, checkpoint_every=trace.checkpoint_every or 100)


def _phases(t: Trace, data: float, forward: float, backward: float, optimizer: float, wait: float) -> dict:
    if t.instrument == "none":
        return {}
    if t.instrument == "comm":
        return {"data": data, "forward": forward, "backward": backward, "comm": wait, "optimizer": optimizer}
    return {"data": data, "forward": forward, "backward": backward + wait, "optimizer": optimizer}


def generate(t: Trace) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(steps, pauses) tables of the trace, in the collector's schemas."""
    from collector.tables import frame_from_rows

    rng = random.Random(t.seed)
    rows, pauses = [], []
    ts = t.start_ts
    number, since_start, pid_base = 0, 0, 1000
    bursts: dict[int, tuple[int, float]] = {}  # rank -> (steps left, factor)
    warm = [rng.uniform(0, 0.5) for _ in range(t.ranks)]
    for executed in range(t.steps):
        if t.restart_after is not None and executed == t.restart_after:
            ts += t.restart_gap_s
            number, since_start, pid_base = t.restore_to, 0, pid_base + 10_000
            warm = [rng.uniform(0, 0.5) for _ in range(t.ranks)]
        shared = rng.lognormvariate(0, t.seq_var) * (1 + t.drift_per_1000 * executed / 1000)
        if t.regression and executed >= t.regression_from_step:
            shared *= 1 + t.regression
        if t.burst_prob and rng.random() < t.burst_prob:
            bursts[rng.randrange(t.ranks)] = (rng.randint(2, 6), rng.uniform(1.2, 1.5))
        per_rank = []
        for rank in range(t.ranks):
            stage = rank * t.stages // t.ranks
            scale = t.step_s * shared * (1 + 0.1 * stage)
            if t.warmup_steps and since_start < t.warmup_steps:
                scale *= 1 + warm[rank] * (1 - since_start / t.warmup_steps)
            if rank in bursts:
                scale *= bursts[rank][1]
            phase = {name: scale * share * rng.lognormvariate(0, t.jitter)
                     for name, share in (("data", DATA), ("forward", FORWARD), ("backward", BACKWARD), ("optimizer", OPTIMIZER))}
            if t.tail_prob and rng.random() < t.tail_prob:
                phase[rng.choice(("data", "forward", "backward"))] *= rng.uniform(1.5, 3.0)
            slow = (rank == t.slow_rank) or (t.slow_node is not None and rank // t.ranks_per_node == t.slow_node)
            if slow and executed >= t.slow_from_step:
                phase[t.slow_phase] += t.slow_factor * (phase["data"] + phase["forward"] + phase["backward"])
            arrival = phase["data"] + phase["forward"] + FIRST_BUCKET * phase["backward"]
            per_rank.append((rank, stage, phase, arrival))
        bursts = {r: (left - 1, f) for r, (left, f) in bursts.items() if left > 1}
        # Everyone leaves the all-reduce when the last rank has finished backward and the collective has run.
        done = max(p["data"] + p["forward"] + p["backward"] for _, _, p, _ in per_rank) + COLLECTIVE * t.step_s * shared
        longest = 0.0
        for rank, stage, phase, arrival in per_rank:
            wait = done - (phase["data"] + phase["forward"] + phase["backward"])
            duration = done + phase["optimizer"]
            longest = max(longest, duration)
            metrics = {}
            if t.instrument == "ddp":
                metrics["sync_arrival_s"] = max(1e-6, arrival + (rng.gauss(0, t.measurement_noise_s) if t.measurement_noise_s else 0))
            node = rank // t.ranks_per_node
            rows.append({
                "ts": ts, "job": t.job, "rank": rank, "local_rank": rank % t.ranks_per_node, "world_size": t.ranks,
                "step": number, "stage": stage if t.stages > 1 else None, "duration_s": duration, "tokens": 4096,
                "samples": 8, "failed": False,
                "phases": _phases(t, phase["data"], phase["forward"], phase["backward"], phase["optimizer"], wait),
                "metrics": metrics,
                "node": f"node-{node:03d}", "gpu_uuid": f"GPU-{t.job}-{rank}", "pid": pid_base + rank,
                "agent_id": f"agent-{node}",
            })
        ts += longest
        number += 1
        since_start += 1
        if t.checkpoint_every and number % t.checkpoint_every == 0:
            pause_s = 20 * t.step_s
            for rank in range(t.ranks):
                node = f"node-{rank // t.ranks_per_node:03d}"
                pauses.append({"ts": ts, "job": t.job, "rank": rank, "reason": "checkpoint", "phase": "begin",
                               "duration_s": None, "node": node, "agent_id": "a"})
                pauses.append({"ts": ts + pause_s, "job": t.job, "rank": rank, "reason": "checkpoint", "phase": "end",
                               "duration_s": pause_s, "node": node, "agent_id": "a"})
            ts += pause_s
    return frame_from_rows("steps", rows), frame_from_rows("pauses", pauses)


def end_ts(steps: pl.DataFrame) -> float:
    return float((steps["ts"] + steps["duration_s"]).max())  # type: ignore[arg-type]


def median_step(steps: pl.DataFrame) -> float:
    value = steps["duration_s"].median()
    return float(value) if value is not None and not math.isnan(value) else 0.0  # type: ignore[arg-type]
