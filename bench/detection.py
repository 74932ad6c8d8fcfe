"""Detection quality of the collector's training detectors on labelled synthetic traces.

For each fault kind, many seeded traces are generated (bench/traces.py) and the detectors run as
the collector runs them: after every few steps, on the steps known so far. Reported per kind:
recall (the fault named correctly), precision (findings that were right), steps to detection after
the fault began, and false alarms on clean runs per 10,000 rank-steps. Then the time to analyse a
16,384-rank job over its last 600 steps.

    python -m bench.detection [--runs 20] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import polars as pl

from bench.traces import Trace, end_ts, generate
from collector.findings import analyse
from collector.tables import SCHEMAS

NO_GPUS, NO_HOSTS = pl.DataFrame(schema=SCHEMAS["gpus"]), pl.DataFrame(schema=SCHEMAS["hosts"])
EVERY = 5  # steps between two analyses, as a collector analysing every 5 s sees a 1 s step job


def first_detection(trace: Trace, expect, onset: int) -> tuple[int | None, int]:
    """Steps after `onset` until a finding satisfies `expect`, and how many wrong findings came first."""
    steps, pauses = generate(trace)
    wrong = 0
    for upto in range(EVERY, trace.steps + 1, EVERY):
        known = steps.filter(pl.col("step") < upto)
        found, _ = analyse(known, pauses.filter(pl.col("ts") <= end_ts(known)), NO_GPUS, NO_HOSTS, end_ts(known) + 0.5)
        good = [f for f in found if expect(f)]
        wrong += len(found) - len(good)
        if good and upto > onset:
            return upto - onset, wrong
    return None, wrong


def scenario(name: str, runs: int, make, expect, onset: int) -> dict:
    delays, wrong, hits = [], 0, 0
    for seed in range(runs):
        delay, bad = first_detection(make(seed), expect, onset)
        wrong += bad
        if delay is not None:
            hits += 1
            delays.append(delay)
    return {"kind": name, "recall": hits / runs, "precision": hits / (hits + wrong) if hits + wrong else 1.0,
            "median_steps": statistics.median(delays) if delays else None, "max_steps": max(delays) if delays else None}


def clean_false_alarms(runs: int, ranks: int, steps: int) -> tuple[int, int]:
    """Findings on clean runs (half of them pipeline-parallel with uneven stages), with checkpoint pauses."""
    alarms = 0
    for seed in range(runs):
        trace = Trace(ranks=ranks, steps=steps, seed=10_000 + seed, checkpoint_every=100, stages=4 if seed % 2 else 1)
        data, pauses = generate(trace)
        for upto in range(50, steps + 1, 25):
            known = data.filter(pl.col("step") < upto)
            found, _ = analyse(known, pauses.filter(pl.col("ts") <= end_ts(known)), NO_GPUS, NO_HOSTS, end_ts(known) + 0.5)
            alarms += len(found)
    return alarms, runs * ranks * steps


def regression_alarms_per_week(seed: int = 0, step_s: float = 1.0) -> int:
    """A clean week of a 1 s-step job (shared sequence-length variance, 3% rank jitter, drift of 2% a
    day), checked every 100 steps with the collector's regression detector; alarms counted as episodes."""
    from collector.training import REGRESSION_BASELINE, REGRESSION_GAP, REGRESSION_RECENT, REGRESSION_THRESHOLD, step_time_change

    rng = np.random.default_rng(seed)
    n = int(7 * 86400 / step_s)
    shared = rng.lognormal(0, 0.05, n) * (1 + 0.02 * np.arange(n) * step_s / 86400)
    slowest = np.exp(rng.normal(0, 0.03, (n, 16))).max(axis=1)  # each step waits for the slowest of 16 ranks
    duration = step_s * 0.7 * shared * slowest + 0.1 * step_s * shared
    need = REGRESSION_RECENT + REGRESSION_GAP + REGRESSION_BASELINE
    episodes, alarming = 0, False
    for end in range(need, n, 100):
        window = pl.DataFrame({"job": "week", "step": np.arange(end - need, end), "ts": np.arange(end - need, end) * step_s,
                               "duration_s": duration[end - need:end]})
        ratio = step_time_change(window)["change_ratio"][0]
        if ratio >= REGRESSION_THRESHOLD and not alarming:
            episodes += 1
        alarming = ratio >= REGRESSION_THRESHOLD
    return episodes


def big_job(ranks: int = 16_384, steps: int = 600) -> pl.DataFrame:
    """A large job's steps table built with numpy (a Python loop would take minutes to make it)."""
    rng = np.random.default_rng(0)
    n = ranks * steps
    step = np.repeat(np.arange(steps), ranks)
    rank = np.tile(np.arange(ranks), steps)
    compute = 0.7 * rng.lognormal(0, 0.03, n)
    duration = np.repeat(compute.reshape(steps, ranks).max(axis=1) + 0.1, ranks)
    frame = pl.DataFrame({"ts": 1.8e9 + step.astype(float), "job": "big", "rank": rank, "step": step,
                          "duration_s": duration, "compute": compute, "node": [f"n{r // 8}" for r in range(ranks)] * steps})
    return frame.with_columns(
        pl.lit(None, pl.Int64).alias("stage"), pl.col("rank").alias("local_rank"), pl.lit(ranks).alias("world_size"),
        pl.lit(None, pl.Int64).alias("tokens"), pl.lit(None, pl.Int64).alias("samples"),
        pl.lit(None, pl.Float64).alias("flops_per_token"), pl.lit(False).alias("failed"),
        pl.concat_list(pl.struct(pl.lit("comm").alias("phase"), (pl.col("duration_s") - pl.col("compute")).alias("seconds"))).alias("phases"),
        pl.concat_list(pl.struct(pl.lit("sync_arrival_s").alias("name"), pl.col("compute").alias("value"))).alias("metrics"),
        pl.lit(None, pl.String).alias("gpu_uuid"), pl.lit(0).alias("pid"), pl.lit("a").alias("agent_id"),
    ).select(list(SCHEMAS["steps"])).cast(SCHEMAS["steps"])  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer runs, smaller jobs")
    args = p.parse_args(argv)
    runs = 5 if args.quick else args.runs
    ranks = 32 if args.quick else 64
    rows = []
    for pct in (0.05, 0.10, 0.20):
        rows.append(scenario(f"rank {pct:.0%} slower", runs,
                             lambda s, pct=pct: Trace(ranks=ranks, steps=80, slow_rank=7, slow_factor=pct, slow_from_step=30, seed=s),
                             lambda f: f.kind == "straggler" and f.subject["rank"] == 7, onset=30))
    rows.append(scenario("rank 10% slower, 4 PP stages", runs,
                         lambda s: Trace(ranks=ranks, steps=80, stages=4, slow_rank=7, slow_factor=0.10, slow_from_step=30, seed=s),
                         lambda f: f.kind == "straggler" and f.subject["rank"] == 7, onset=30))
    rows.append(scenario("rank 10% slower, 1,024 ranks", max(2, runs // 5),
                         lambda s: Trace(ranks=1024, steps=60, slow_rank=700, slow_factor=0.10, slow_from_step=30, seed=s),
                         lambda f: f.kind == "straggler" and f.subject["rank"] == 700, onset=30))
    rows.append(scenario("slow node (10%)", runs,
                         lambda s: Trace(ranks=ranks, steps=80, slow_node=1, slow_factor=0.10, slow_from_step=30, seed=s),
                         lambda f: f.kind == "slow_node" and f.subject["node"] == "node-001", onset=30))
    rows.append(scenario("3% regression", max(3, runs // 4),
                         lambda s: Trace(ranks=16, steps=900, regression=0.03, regression_from_step=600, seed=s),
                         lambda f: f.kind == "regression", onset=600))
    print(f"{'fault':22} {'recall':>7} {'precision':>9} {'steps to detect (median/max)':>29}")
    for r in rows:
        steps = f"{r['median_steps']}/{r['max_steps']}" if r["median_steps"] is not None else "-"
        print(f"{r['kind']:22} {r['recall']:7.0%} {r['precision']:9.0%} {steps:>29}")

    # Hang: found once the silence passes max(3 x median step, 30 s)?
    trace = Trace(ranks=16, steps=50, step_s=2.0)
    data, pauses = generate(trace)
    detected_at = next(s for s in range(0, 120) if analyse(data, pauses, NO_GPUS, NO_HOSTS, end_ts(data) + s)[0])
    print(f"hang with 2 s steps: found after {detected_at} s of silence (threshold max(3 x 2 s, 30 s) = 30 s)")

    weeks = 1 if args.quick else 3
    alarms = sum(regression_alarms_per_week(seed) for seed in range(weeks))
    print(f"regression false alarms on clean weeks of 1 s steps (drift 2%/day): {alarms} in {weeks} simulated week(s)")

    alarms, rank_steps = clean_false_alarms(max(2, runs // 4), ranks, 300)
    print(f"clean runs with checkpoint pauses: {alarms} false findings in {rank_steps:,} rank-steps "
          f"({alarms / rank_steps * 10_000:.2f} per 10,000)")

    big = big_job(1024 if args.quick else 16_384)
    times = []
    for _ in range(3):  # the collector analyses every 5 s: the first run pays for warming up
        t0 = time.perf_counter()
        analyse(big, pl.DataFrame(schema=SCHEMAS["pauses"]), NO_GPUS, NO_HOSTS, 1.8e9 + 601)
        times.append(time.perf_counter() - t0)
    print(f"analysis of a {big['rank'].n_unique():,}-rank job over its last 600 steps ({big.height:,} rows): "
          f"first {times[0]:.2f} s, then {min(times[1:]):.2f} s")


if __name__ == "__main__":
    main()
