"""A synthetic data-parallel training job: one process per rank, synchronised at every step.

Each rank loads data, computes forward and backward, then waits at a barrier standing in for
DDP's all-reduce, then steps the optimizer. As in real synchronous training, whole-step times are
nearly equal across ranks; a slow rank shows in its compute phases and its short `comm` wait.

    python -m fleetscope.sim.training --job demo --agents 127.0.0.1:9836,127.0.0.1:9901 --gpus-per-node 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
import time

TOKENS_PER_STEP = 8 * 4096


def rank_main(job: str, rank: int, world: int, local_rank: int, agent: str, barrier, stop, args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when ranks stop
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), FLEETSCOPE_AGENT_ADDR=agent)
    import fleetscope

    # ~6 x 1B parameters: with 32k tokens per 0.5 s step on a simulated H100, an MFU of about 40%
    run = fleetscope.training(job=job, flops_per_token=6e9)
    rng = random.Random(f"{args.seed}:{rank}")
    started = time.monotonic()
    step = 0
    while not stop.is_set() and (args.steps is None or step < args.steps):
        # A rank on a throttled GPU computes slower from --slow-after seconds on, as a real one would.
        slow = 1.0 + (args.slow_factor if rank == args.slow_rank and time.monotonic() - started >= args.slow_after else 0.0)
        with run.step(tokens=TOKENS_PER_STEP, samples=8) as s:
            compute = args.step_time * 0.8 * slow * rng.lognormvariate(0, args.jitter)
            with run.phase("data"):
                time.sleep(compute * 0.05)
            with run.phase("forward"):
                time.sleep(compute * 0.32)
            with run.phase("backward"):
                time.sleep(compute * 0.63)
            with run.phase("comm"):
                try:
                    barrier.wait(timeout=60)
                except Exception:  # broken barrier: the job is stopping
                    break
                time.sleep(args.step_time * 0.1)
            with run.phase("optimizer"):
                time.sleep(args.step_time * 0.05)
            s.record(loss=4.0 * (0.999**step) + rng.gauss(0, 0.02))
        step += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="demo-llama-8b")
    p.add_argument("--agents", default="127.0.0.1:9836", help="comma-separated agent event addresses, one per node")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--step-time", type=float, default=0.5, help="seconds per step")
    p.add_argument("--jitter", type=float, default=0.03, help="log-normal sigma of compute time")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: run until stopped)")
    p.add_argument("--slow-rank", type=int, default=-1, help="rank that computes slower (a straggler)")
    p.add_argument("--slow-factor", type=float, default=0.15)
    p.add_argument("--slow-after", type=float, default=0.0, help="seconds before the slow rank slows down")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    agents = [a for a in args.agents.split(",") if a]
    world = len(agents) * args.gpus_per_node
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(world)
    stop = ctx.Event()
    procs = []
    for node, agent in enumerate(agents):
        for local in range(args.gpus_per_node):
            rank = node * args.gpus_per_node + local
            proc = ctx.Process(target=rank_main, args=(args.job, rank, world, local, agent, barrier, stop, args), daemon=True)
            proc.start()
            procs.append(proc)

    def shutdown(*_):
        stop.set()
        barrier.abort()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
