"""Labelled synthetic training traces, for the detectors' tests and `bench/detection.py`.

A trace is the steps table the collector would hold for one synchronous job: every rank's compute
time varies with jitter (log-normal, ~3%), sequence-length variance (shared by all ranks of a
step) and slow drift; ranks then wait for the slowest at the all-reduce, so whole-step times are
equal, and each step carries the `comm` phase and DDP's `sync_arrival_s` as the real integration
reports them. Faults: a slow rank, a slow node, a regression from a given step, a hang (the trace
ends early), checkpoint pauses. Pure: no I/O, reproducible from the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import polars as pl


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
    slow_rank: int | None = None
    slow_node: int | None = None
    slow_factor: float = 0.10
    slow_from_step: int = 0
    regression: float = 0.0  # e.g. 0.03: the whole job 3% slower ...
    regression_from_step: int = 0  # ... from this step on
    checkpoint_every: int = 0  # a declared pause every N steps
    seed: int = 0
    start_ts: float = 1_800_000_000.0
    labels: dict = field(default_factory=dict)


def generate(t: Trace) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(steps, pauses) tables of the trace, in the collector's schemas."""
    from collector.tables import frame_from_rows

    rng = random.Random(t.seed)
    rows, pauses = [], []
    ts = t.start_ts
    for step in range(t.steps):
        shared = rng.lognormvariate(0, t.seq_var) * (1 + t.drift_per_1000 * step / 1000)
        if t.regression and step >= t.regression_from_step:
            shared *= 1 + t.regression
        compute = []
        for rank in range(t.ranks):
            stage = rank * t.stages // t.ranks
            c = t.step_s * 0.7 * shared * (1 + 0.1 * stage) * rng.lognormvariate(0, t.jitter)
            slow = (rank == t.slow_rank) or (t.slow_node is not None and rank // t.ranks_per_node == t.slow_node)
            if slow and step >= t.slow_from_step:
                c *= 1 + t.slow_factor
            compute.append((rank, stage, c))
        barrier = max(c for _, _, c in compute)
        comm_floor = t.step_s * 0.1 * shared
        duration = barrier + comm_floor
        for rank, stage, c in compute:
            rows.append({
                "ts": ts, "job": t.job, "rank": rank, "local_rank": rank % t.ranks_per_node, "world_size": t.ranks,
                "step": step, "stage": stage if t.stages > 1 else None, "duration_s": duration, "tokens": 4096,
                "samples": 8, "failed": False,
                "phases": {"data": 0.05 * c, "comm": duration - c},
                "metrics": {"sync_arrival_s": c},
                "node": f"node-{rank // t.ranks_per_node:03d}", "gpu_uuid": f"GPU-{t.job}-{rank}", "pid": 1000 + rank,
                "agent_id": f"agent-{rank // t.ranks_per_node}",
            })
        ts += duration
        if t.checkpoint_every and step and step % t.checkpoint_every == 0:
            pause_s = 20 * t.step_s
            for rank in range(t.ranks):
                pauses.append({"ts": ts, "job": t.job, "rank": rank, "reason": "checkpoint", "phase": "begin",
                               "duration_s": None, "node": f"node-{rank // t.ranks_per_node:03d}", "agent_id": "a"})
                pauses.append({"ts": ts + pause_s, "job": t.job, "rank": rank, "reason": "checkpoint", "phase": "end",
                               "duration_s": pause_s, "node": f"node-{rank // t.ranks_per_node:03d}", "agent_id": "a"})
            ts += pause_s
    return frame_from_rows("steps", rows), frame_from_rows("pauses", pauses)


def end_ts(steps: pl.DataFrame) -> float:
    return float((steps["ts"] + steps["duration_s"]).max())  # type: ignore[arg-type]


def median_step(steps: pl.DataFrame) -> float:
    value = steps["duration_s"].median()
    return float(value) if value is not None and not math.isnan(value) else 0.0  # type: ignore[arg-type]
