"""Detection quality of the collector's training detectors, on labelled traces and on a real DDP job.

Every row is --runs seeded runs (20 by default). A run is analysed as the collector analyses it: every
5 s of the job's time (every 5 steps of a 1 s step), on the steps reported so far, with `collector.
findings.analyse` and the collector's own finding tracker semantics: a finding counts once from the
analysis where it appears until it goes away (an episode, as an alert would open it). Every wrong
episode counts, before and after the fault's onset, whatever else was found: a finding of the wrong
kind or subject, or the right one before the fault began. Reported per row: recall (runs where the
fault was named after its onset), precision (right episodes over all episodes), wrong episodes per
10,000 rank-steps, and steps from the onset to the first right finding (median / max).

Synthetic traces (bench/traces.py) carry real-world noise (`noisy`): per-phase jitter, heavy-tailed
phases, contention bursts on random ranks, warm-up after each start, timer noise on the DDP arrival,
checkpoint pauses; the clean rows add a restart from a checkpoint and pipeline stages. Each row names
how the job is instrumented: `ddp` (fleetscope's `instrument_ddp`), `readme` (the README's first
example: data, forward, backward, optimizer, nothing else) or `comm` (a `comm` phase).

Hang latency is measured on a live collector (`python -m fleetscope collector`, real HTTP): --runs jobs
with 2 s steps post their steps and go silent; the latency is from each job's last step's end to the
moment `GET /v1/findings` names it hung. `stopped` (10 minutes of silence) is measured on the pure
analysis at the collector's 5 s cadence.

`--ddp N` adds the rows measured on a real PyTorch DDP job (`tests/e2e/ddp_job.py`, gloo on the CPU,
4 ranks under torchrun): N runs with one rank 10% slower in its forward pass (10% of its own median
step before the onset) from a third of the way in, and N runs with no slow rank, each instrumented the
README's way and with `instrument_ddp`. The model is small, so each step also sleeps 0.25 s as a rank
waits for its GPU's kernels (steps of about 0.3 s; the jitter is the real job's). The job's datagrams
are received by the bench and analysed as above, at the collector's 5 s cadence.

    python -m bench.detection [--runs 20] [--ddp 10 [--ddp-steps 100] [--ddp-device-s 0.25] [--ddp-only]]
                              [--quick] [--skip-live]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from bench.traces import Trace, end_ts, generate, noisy
from collector.attribution import frame_samples
from collector.findings import Finding, analyse
from collector.rollups import step_aggregates
from collector.tables import SCHEMAS, empty, frame_from_rows

REPO = Path(__file__).resolve().parents[1]
SAMPLES = frame_samples(empty("gpus"), empty("hosts"))
EVERY_S = 5.0  # the collector analyses every 5 s
HOT_STEPS = 120  # the hot tier keeps each rank's last 120 steps


@dataclass
class Tally:
    runs: int = 0
    hits: int = 0
    right: int = 0  # right episodes
    wrong: int = 0  # wrong episodes
    rank_steps: int = 0
    delays: list[int] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        for name in ("runs", "hits", "right", "wrong", "rank_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.delays += other.delays
        self.wrong_examples += other.wrong_examples


def replay(steps: pl.DataFrame, pauses: pl.DataFrame, expect: Callable[[Finding], bool] | None,
           onset_ts: float | None, onset_step: int | None) -> Tally:
    """Analyse `steps` as a collector would have while they arrived; judge every finding episode."""
    tally = Tally(runs=1, rank_steps=steps.height)
    steps = steps.with_columns((pl.col("ts") + pl.col("duration_s")).alias("_end"))
    start, last = float(steps["ts"].min()), float(steps["_end"].max())
    active: set[tuple] = set()
    now = start + EVERY_S
    while now <= last + EVERY_S:
        known = steps.filter(pl.col("_end") <= now).drop("_end")
        aggs = step_aggregates(known)  # the collector keeps these for the whole window ...
        hot = known.sort("ts").filter(  # ... and each rank's last steps
            pl.int_range(pl.len()).over("job", "rank") >= pl.len().over("job", "rank").cast(pl.Int64) - HOT_STEPS)
        found, _ = analyse(hot, pauses.filter(pl.col("ts") <= now), now, samples=SAMPLES, aggs=aggs)
        keys = set()
        for f in found:
            keys.add(f.key)
            if f.key in active:
                continue
            good = expect is not None and onset_ts is not None and now > onset_ts and expect(f)
            if good:
                tally.right += 1
                if not tally.hits:
                    tally.hits = 1
                    reached = known.filter(pl.col("ts") >= onset_ts)["step"]
                    tally.delays.append(int(reached.max() - onset_step + 1) if reached.len() else 0)
            else:
                tally.wrong += 1
                tally.wrong_examples.append(f"{f.kind} {f.subject} {f.evidence.get('straggler_score', '')}")
        active = keys
        now += EVERY_S
    return tally


ONLY: str | None = None  # --only


def synthetic_row(name: str, runs: int, make: Callable[[int], Trace], expect, onset: int | None) -> dict:
    total = Tally()
    if ONLY is not None and ONLY not in name:
        return summary(name, total, expect is not None)
    for seed in range(runs):
        trace = make(seed)
        steps, pauses = generate(trace)
        onset_ts = float(steps.filter(pl.col("step") >= onset)["ts"].min()) if onset is not None else None
        total.add(replay(steps, pauses, expect, onset_ts, onset))
    return summary(name, total, expect is not None)


def summary(name: str, t: Tally, faulty: bool) -> dict:
    return {"kind": name, "runs": t.runs, "recall": t.hits / t.runs if faulty else None,
            "precision": t.right / (t.right + t.wrong) if t.right + t.wrong else None,
            "wrong": t.wrong, "per_10k": t.wrong / t.rank_steps * 10_000, "rank_steps": t.rank_steps,
            "median_steps": statistics.median(t.delays) if t.delays else None, "max_steps": max(t.delays) if t.delays else None,
            "examples": t.wrong_examples[:3]}


def straggler(rank: int) -> Callable[[Finding], bool]:
    return lambda f: f.kind == "straggler" and f.subject["rank"] == rank


def synthetic_rows(runs: int, ranks: int) -> list[dict]:
    onset = 40
    rows = []
    for pct in (0.05, 0.10, 0.20):
        rows.append(synthetic_row(f"rank {pct:.0%} slower, ddp", runs, lambda s, pct=pct: noisy(Trace(
            ranks=ranks, steps=100, slow_rank=7, slow_factor=pct, slow_from_step=onset, seed=s)), straggler(7), onset))
    for instrument in ("readme", "comm"):
        rows.append(synthetic_row(f"rank 10% slower, {instrument}", runs, lambda s, i=instrument: noisy(Trace(
            ranks=ranks, steps=100, slow_rank=7, slow_from_step=onset, instrument=i, seed=s)), straggler(7), onset))
    rows.append(synthetic_row("data loader 10% slower, readme", runs, lambda s: noisy(Trace(
        ranks=ranks, steps=100, slow_rank=7, slow_phase="data", slow_from_step=onset, instrument="readme", seed=s)),
        straggler(7), onset))
    rows.append(synthetic_row("rank 10% slower, 4 PP stages", runs, lambda s: noisy(Trace(
        ranks=ranks, steps=100, stages=4, slow_rank=7, slow_from_step=onset, seed=s)), straggler(7), onset))
    rows.append(synthetic_row("rank 10% slower, 1,024 ranks", runs, lambda s: noisy(Trace(
        ranks=1024, steps=70, slow_rank=700, slow_from_step=onset, seed=s)), straggler(700), onset))
    rows.append(synthetic_row("node 10% slower", runs, lambda s: noisy(Trace(
        ranks=ranks, steps=100, slow_node=1, slow_from_step=onset, seed=s)),
        lambda f: f.kind == "slow_node" and f.subject["node"] == "node-001", onset))
    rows.append(synthetic_row("3% regression", runs, lambda s: noisy(Trace(
        ranks=16, steps=900, regression=0.03, regression_from_step=600, seed=s)), lambda f: f.kind == "regression", 600))
    rows.append(synthetic_row("clean (restart, half PP)", runs, lambda s: noisy(Trace(
        ranks=ranks, steps=300, restart_after=150, restore_to=100, restart_gap_s=20, stages=4 if s % 2 else 1, seed=10_000 + s,
        instrument=("ddp", "readme", "comm")[s % 3])), None, None))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'row':34} {'runs':>4} {'recall':>7} {'precision':>9} {'wrong':>5} {'per 10k':>7} {'steps to detect':>15}")
    for r in rows:
        recall = f"{r['recall']:.0%}" if r["recall"] is not None else "-"
        precision = f"{r['precision']:.0%}" if r["precision"] is not None else "-"
        steps = f"{r['median_steps']:g} / {r['max_steps']:g}" if r["median_steps"] is not None else "-"
        print(f"{r['kind']:34} {r['runs']:4} {recall:>7} {precision:>9} {r['wrong']:5} {r['per_10k']:7.2f} {steps:>15}")
        for example in r["examples"]:
            print(f"    wrong: {example}")
    sys.stdout.flush()


# --- hangs on a live collector --------------------------------------------------------------------
def live_hangs(runs: int) -> list[float]:
    """Seconds from each job's last step to the collector's hang finding (real collector, real HTTP)."""
    import httpx

    from fleetscope.schema import Batch, StepEvent, encode

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FLEETSCOPE_INGEST_TOKEN": "bench-ingest", "FLEETSCOPE_READ_TOKEN": "bench-read"}
        proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                                 "--data-dir", str(Path(tmp) / "data")], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=10) as client:
                deadline = time.time() + 60
                while True:
                    try:
                        if client.get(f"{url}/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.time() > deadline:
                        raise RuntimeError("the collector did not become ready")
                    time.sleep(0.2)
                headers = {"Authorization": "Bearer bench-ingest"}
                step_s, ranks, steps = 2.0, 4, 12
                # Job j steps in real time and stops after its last step; the jobs stop 1.3 s apart.
                t0 = time.time() - steps * step_s
                last_end: dict[str, float] = {}
                for j in range(runs):
                    job = f"hang-{j}"
                    start = t0 + j * 1.3
                    events = [StepEvent(v=1, job=job, rank=r, world_size=ranks, step=n, ts=start + n * step_s,
                                        duration_s=step_s, pid=100 + r) for n in range(steps) for r in range(ranks)]
                    last_end[job] = start + steps * step_s
                    body = encode(Batch(v=1, agent_id=f"bench-{j}", seq=1, node="bench-node", sent_ts=time.time(), events=events))
                    client.post(f"{url}/v1/ingest", content=body, headers=headers).raise_for_status()
                found: dict[str, float] = {}
                read = {"Authorization": "Bearer bench-read"}
                while len(found) < runs and time.time() < t0 + 200:
                    reply = client.get(f"{url}/v1/findings?kind=hang", headers=read).json()
                    for f in reply["findings"]:
                        found.setdefault(f["subject"]["job"], time.time())
                    time.sleep(0.2)
                return [found[job] - last_end[job] for job in sorted(found)]
        finally:
            proc.terminate()
            proc.wait(10)


def stopped_latency() -> float:
    """Seconds of silence before `stopped`, at the collector's 5 s cadence, on the pure analysis."""
    steps, pauses = generate(Trace(ranks=8, steps=60, step_s=2.0))
    last = end_ts(steps)
    silence = 0.0
    while silence < 3600:
        silence += EVERY_S
        found, _ = analyse(steps, pauses, last + silence, samples=SAMPLES)
        if any(f.kind == "stopped" for f in found):
            return silence
    return float("nan")


DDP_DEVICE_S = 0.25  # each step also waits this long, as for a GPU's kernels: steps of ~0.3 s, not 16 ms


# --- a real DDP job --------------------------------------------------------------------------------
def ddp_run(slow: bool, instrument: bool, steps: int, seed: int,
            device_s: float | None = None) -> tuple[pl.DataFrame, float | None, int | None]:
    """Run tests/e2e/ddp_job.py under torchrun (4 ranks); its steps as the collector's table, the onset."""
    device_s = DDP_DEVICE_S if device_s is None else device_s
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.5)
    received: list[bytes] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                received.append(receiver.recv(65536))
            except socket.timeout:
                continue

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master = s.getsockname()[1]
    onset = steps // 3
    env = {**os.environ, "JOB": f"ddp-{seed}", "STEPS": str(steps), "SLOW_RANK": "2" if slow else "-1",
           "SLOW_MODE": "forward10", "SLOW_AFTER": str(onset), "INSTRUMENT_DDP": "1" if instrument else "0",
           "DEVICE_S": str(device_s),
           "FLEETSCOPE_AGENT_ADDR": f"127.0.0.1:{receiver.getsockname()[1]}", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
                             "--master-addr", "127.0.0.1", "--master-port", str(master), str(REPO / "tests/e2e/ddp_job.py")],
                            env=env, capture_output=True, text=True, timeout=600)
    time.sleep(0.5)
    stop.set()
    thread.join()
    receiver.close()
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    rows = []
    for data in received:
        event = json.loads(data)
        if event.get("kind") != "step":
            continue
        rows.append({"ts": event["ts"], "job": event["job"], "rank": event["rank"], "local_rank": event.get("local_rank", 0),
                     "world_size": event["world_size"], "step": event["step"], "duration_s": event["duration_s"],
                     "phases": event.get("phases", {}), "metrics": event.get("metrics", {}), "node": "ddp-node",
                     "gpu_uuid": f"GPU-{event['rank']}", "pid": event.get("pid", 0), "agent_id": "bench",
                     "tokens": event.get("tokens"), "samples": event.get("samples"), "failed": False, "stage": None})
    frame = frame_from_rows("steps", rows)
    onset_ts = float(frame.filter((pl.col("rank") == 2) & (pl.col("step") >= onset))["ts"].min()) if slow else None
    return frame, onset_ts, onset if slow else None


def ddp_rows(runs: int, steps: int, device_s: float | None = None) -> list[dict]:
    rows = []
    for instrument in (False, True):
        how = "instrument_ddp" if instrument else "readme"
        for slow in (True, False):
            total = Tally()
            for seed in range(runs):
                frame, onset_ts, onset = ddp_run(slow, instrument, steps, seed, device_s)
                total.add(replay(frame, empty("pauses"), straggler(2) if slow else None, onset_ts, onset))
            rows.append(summary(f"real DDP, {how}, {'rank 2 10% slower' if slow else 'clean'}", total, slow))
            print_rows(rows[-1:])
    return rows


# --- regression alarms over weeks, and the cost of analysis ----------------------------------------
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
                               "step_time_p50_s": duration[end - need:end]})
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
                          "duration_s": duration, "phase_backward_s": duration - compute * 0.7, "phase_forward_s": compute * 0.3,
                          "sync_arrival_s": compute * 0.9, "node": [f"n{r // 8}" for r in range(ranks)] * steps})
    return frame.with_columns(pl.lit(False).alias("failed"), pl.lit(0).alias("pid"), pl.lit("a").alias("agent_id"),
                              pl.col("rank").alias("local_rank"), pl.lit(ranks).alias("world_size")) \
        .select(pl.col(c) if c in frame.columns or c in ("failed", "pid", "agent_id", "local_rank", "world_size")
                else pl.lit(None).alias(c) for c in SCHEMAS["steps"]).cast(SCHEMAS["steps"])  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--ddp", type=int, default=0, help="runs of each real DDP row (0: skip them)")
    p.add_argument("--ddp-steps", type=int, default=100)
    p.add_argument("--ddp-device-s", type=float, default=DDP_DEVICE_S, help="seconds each DDP step waits as for a GPU")
    p.add_argument("--ddp-only", action="store_true", help="only the real DDP rows")
    p.add_argument("--quick", action="store_true", help="5 runs, 32-rank jobs, no weeks")
    p.add_argument("--skip-live", action="store_true", help="no live collector (hang latency)")
    p.add_argument("--only", help="only the rows whose name contains this")
    args = p.parse_args(argv)
    runs = 5 if args.quick else args.runs
    ranks = 32 if args.quick else 64
    t0 = time.perf_counter()
    if args.ddp_only:
        print(f"real DDP job (4 ranks, gloo on the CPU, {args.ddp_steps} steps, {args.ddp_device_s:g} s of device time a step, "
              f"{args.ddp} runs per row):")
        ddp_rows(args.ddp, args.ddp_steps, args.ddp_device_s)
        return
    global ONLY
    ONLY = args.only
    rows = [r for r in synthetic_rows(runs, ranks) if r["runs"]]
    print(f"synthetic traces ({ranks}-rank jobs unless named, noisy, analysed every {EVERY_S:g} s):")
    print_rows(rows)
    faulty = [r for r in rows if r["recall"] is not None]
    all_wrong = sum(r["wrong"] for r in rows)
    all_rank_steps = sum(r["rank_steps"] for r in rows)
    print(f"all synthetic rows: {all_wrong} wrong findings in {all_rank_steps:,} rank-steps "
          f"({all_wrong / all_rank_steps * 10_000:.2f} per 10,000); lowest recall {min(r['recall'] for r in faulty):.0%}")

    if not args.skip_live:
        latencies = live_hangs(runs)
        print(f"hang (2 s steps, threshold max(3 x 2 s, 30 s) = 30 s), live collector, {len(latencies)} of {runs} jobs found: "
              f"last step to finding median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s")
    print(f"stopped: found after {stopped_latency():.0f} s of silence (threshold 600 s; analysis every {EVERY_S:g} s)")
    if not args.quick and args.only is None:
        weeks = 3
        alarms = sum(regression_alarms_per_week(seed) for seed in range(weeks))
        print(f"regression false alarms on clean weeks of 1 s steps (drift 2%/day): {alarms} in {weeks} simulated weeks")
    if args.ddp:
        print(f"real DDP job (4 ranks, gloo on the CPU, {args.ddp_steps} steps, {args.ddp_device_s:g} s of device time a step, "
              f"{args.ddp} runs per row):")
        ddp_rows(args.ddp, args.ddp_steps, args.ddp_device_s)

    big = big_job(1024 if args.quick else 16_384)
    times = []
    for _ in range(3):  # the collector analyses every 5 s: the first run pays for warming up
        start = time.perf_counter()
        analyse(big, empty("pauses"), 1.8e9 + 601, samples=SAMPLES)
        times.append(time.perf_counter() - start)
    print(f"analysis of a {big['rank'].n_unique():,}-rank job over its last 600 steps ({big.height:,} rows): "
          f"first {times[0]:.2f} s, then {min(times[1:]):.2f} s")
    print(f"bench took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
