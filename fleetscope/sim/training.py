"""A synthetic data-parallel training job: one process per rank, synchronised at every step, run by a
launcher that restarts it from its last checkpoint when a rank dies.

Each rank loads data, computes forward and backward, then waits at a barrier standing in for DDP's
all-reduce, then steps the optimizer. As in real synchronous training, whole-step times are nearly equal
across ranks; a slow rank shows in its compute phases and its short `comm` wait.

The GPU under each rank (--gpu-model, or a --scenario): each rank plays the simulated GPU it runs on
(its node, its local rank as the GPU index) with the agent's own simulator (agent.gpu.sim, imported, not
copied), from the same seed (the node's index, as `fleetscope demo` seeds its agents), the same fault
scenario and the same start (the scenario's `start_ts`, which the agent also counts its faults from).
That is the same deterministic model the node's agent reports from, so the two agree without talking to
each other (to within the agent's start-up, a second or two of warm-up, and their samples' noise), as a
real rank and its monitoring agent agree because they share one GPU. Forward and backward take longer in
proportion to the GPU's SM clock (x max clock / clock; an idle GPU is treated as boosting for the work it
is given), so a GPU the scenario heats into thermal slowdown makes its rank a straggler while the agent
reports the throttle; the data phase (host-side) does not slow. An XID that ends the CUDA contexts on a
GPU (FATAL_XIDS), or a GPU lost from the bus, kills the rank on it.

The launcher acts as torchrun's elastic agent does. Ranks save a checkpoint every --checkpoint-every steps
(a declared pause, `run.pause("checkpoint")`, then a barrier: the checkpoint counts once every rank wrote
its part). When a rank dies, the launcher stops the others (the collective they wait in would time out),
waits --restart-delay (noticing, rescheduling), and starts every rank again as a new process that loads
the last checkpoint (--startup-s) and declares `run.restored(step)`: step numbers continue from the
checkpoint, and the steps since it run again, which the collector's goodput counts as recomputed.

--slow-rank/--slow-factor make one rank slower in every phase from its first step: a manual straggler for
tests that want one without a GPU model (tests/e2e/dashboard_fleet.py).

    python -m fleetscope.sim.training --job demo --agents 127.0.0.1:9836,127.0.0.1:9901 --gpus-per-node 8 \\
        --scenario node-01=faults.toml --checkpoint-every 50
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from threading import BrokenBarrierError

TOKENS_PER_STEP = 8 * 4096
# XIDs that end every CUDA context on the GPU (NVIDIA's XID catalogue): the process on it dies.
FATAL_XIDS = frozenset({13, 31, 43, 48, 74, 79, 94, 95})
IDLE_REASON = 0x1  # NVML clock-event reason: the GPU idles (it boosts as soon as it is given work)


class RankFailed(Exception):
    """The rank's GPU failed under it (a CUDA error, as a real rank would get)."""


@dataclass(frozen=True)
class GpuSpec:
    """What a rank needs to play its GPU: the node's name and seed, its scenario's faults and start."""

    node: str
    seed: int
    faults: tuple = ()
    start_ts: float | None = None


class RankGpu:
    """The simulated GPU under one rank, played with the agent's simulator from the same seed, faults and start."""

    def __init__(self, spec: GpuSpec, index: int, started: float) -> None:
        # the demo's one model of a GPU (this process is the demo's, which may import the services)
        from agent.gpu.sim import SimulatedGpus

        self.node, self.index = spec.node, index
        # GPUs are independent (each has its own random stream): modelling 0..index plays GPU `index` exactly.
        self.gpus = SimulatedGpus(index + 1, seed=spec.seed, node=spec.node, clock=time.time,
                                  faults=[f for f in spec.faults if f.gpu <= index],
                                  start=spec.start_ts if spec.start_ts is not None else started)
        self.fatal_seen: int | None = None  # fatal XIDs before this process started are a previous incarnation's

    def slowdown(self) -> float:
        """How much longer the GPU's compute takes now than at its maximum clock; raises RankFailed when
        the GPU is lost or a fatal XID arrived since this process started."""
        state = self.gpus.read()[self.index]
        where = f"GPU {self.index} of {self.node}"
        if not state.up:
            raise RankFailed(f"CUDA error: {where} is lost (XID {state.last_xid})")
        fatal = sum(n for code, n in (state.xid_counts or {}).items() if code in FATAL_XIDS)
        if self.fatal_seen is None:
            self.fatal_seen = fatal
        elif fatal > self.fatal_seen:
            raise RankFailed(f"CUDA error on {where}: XID {state.last_xid}")
        if (state.clock_event_mask or 0) & IDLE_REASON or not state.sm_clock_hertz or not state.sm_clock_max_hertz:
            return 1.0
        return state.sm_clock_max_hertz / state.sm_clock_hertz


def rank_main(job: str, rank: int, world: int, local_rank: int, agent: str, barrier, stop, checkpoint,
              restored: int | None, spec: GpuSpec | None, started: float, args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when ranks stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the launcher's handler: a terminated rank just ends
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), FLEETSCOPE_AGENT_ADDR=agent)
    import fleetscope

    # ~6 x 1B parameters: with 32k tokens per 0.5 s step on a simulated H100, an MFU of about 40%
    run = fleetscope.training(job=job, flops_per_token=6e9)
    rng = random.Random(f"{args.seed}:{rank}:{os.getpid()}")
    device = RankGpu(spec, local_rank, started) if spec is not None else None
    manual = 1.0 + (args.slow_factor if rank == args.slow_rank else 0.0)

    def gpu() -> float:
        """The GPU's slowdown now; raises RankFailed when it failed (checked wherever the rank uses it)."""
        return device.slowdown() if device is not None else 1.0

    try:
        if restored is not None:
            run.restored(restored)
        gpu()  # what went wrong before this process started is not its failure
        time.sleep(args.startup_s)  # loading the model and the checkpoint: start-up time in goodput
        step = restored or 0
        while not stop.is_set() and (args.steps is None or step < args.steps):
            gpu_slowdown = gpu()
            with run.step(tokens=TOKENS_PER_STEP, samples=8) as s:
                compute = args.step_time * 0.8 * manual * rng.lognormvariate(0, args.jitter)
                with run.phase("data"):
                    time.sleep(compute * 0.05)
                with run.phase("forward"):
                    time.sleep(compute * 0.32 * gpu_slowdown)
                with run.phase("backward"):
                    time.sleep(compute * 0.63 * gpu_slowdown)
                    gpu()  # a kernel that failed mid-step: the step is lost
                with run.phase("comm"):
                    barrier.wait(timeout=60)
                    time.sleep(args.step_time * 0.1)
                with run.phase("optimizer"):
                    time.sleep(args.step_time * 0.05)
                s.record(loss=4.0 * (0.999**step) + rng.gauss(0, 0.02))
            step += 1
            if args.checkpoint_every and step % args.checkpoint_every == 0 and not stop.is_set():
                with run.pause("checkpoint"):
                    time.sleep(args.checkpoint_s)
                    gpu()  # a GPU that failed while its memory was saved: this checkpoint is not whole
                    barrier.wait(timeout=60)  # every rank wrote its part: the checkpoint is whole
                if rank == 0:
                    checkpoint.value = step  # the next step to run, as run.restored() takes it
    except RankFailed as exc:
        print(f"rank {rank}: {exc}; exiting", file=sys.stderr, flush=True)
        sys.exit(1)
    except BrokenBarrierError:  # the launcher is stopping the job
        pass


def gpu_specs(args, nodes: int, started: float) -> list[GpuSpec | None]:
    """Per node, what its ranks need to play their GPUs (None for each without --gpu-model or a --scenario)."""
    from agent.gpu.scenario import Scenario, read_scenario

    names = [n for n in (args.node_names or "").split(",") if n] or [f"node-{i:02d}" for i in range(nodes)]
    if len(names) != nodes:
        raise SystemExit(f"--node-names names {len(names)} nodes, but --agents gives {nodes}")
    scenarios: dict[str, Scenario] = {}
    for item in args.scenario:
        node, sep, path = item.partition("=")
        if not sep or node not in names:
            raise SystemExit(f"--scenario {item!r}: expected NODE=PATH with NODE one of {', '.join(names)}")
        scenarios[node] = read_scenario(path)
    if not (args.gpu_model or scenarios):
        return [None] * nodes
    # GPUs start when their scenario says; those of a node without one, with the other scenarios' clock, else the job.
    common = next((s.start_ts for s in scenarios.values() if s.start_ts is not None), started)
    specs: list[GpuSpec | None] = []
    for seed, name in enumerate(names):
        scenario = scenarios.get(name, Scenario(()))
        specs.append(GpuSpec(name, seed, scenario.faults, scenario.start_ts if scenario.start_ts is not None else common))
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="demo-llama-8b")
    p.add_argument("--agents", default="127.0.0.1:9836", help="comma-separated agent event addresses, one per node")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--step-time", type=float, default=0.5, help="seconds per step (at the GPUs' maximum clock)")
    p.add_argument("--jitter", type=float, default=0.03, help="log-normal sigma of compute time")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: run until stopped)")
    p.add_argument("--gpu-model", action="store_true",
                   help="each rank computes at the SM clock of its simulated GPU (agent/gpu/sim.py, as the node's agent plays it)")
    p.add_argument("--scenario", action="append", default=[], metavar="NODE=PATH",
                   help="the fault scenario NODE's agent plays (agent/gpu/scenario.py); implies --gpu-model; repeatable")
    p.add_argument("--node-names", default=None,
                   help="comma-separated node names, one per agent (default node-00, node-01, ...; node i's GPUs have seed i)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every this many steps (0: never)")
    p.add_argument("--checkpoint-s", type=float, default=3.0, help="seconds a checkpoint save takes")
    p.add_argument("--startup-s", type=float, default=2.0, help="seconds from a rank's process start to its first step")
    p.add_argument("--restart-delay", type=float, default=10.0,
                   help="seconds from a rank's death to the job's new processes (noticing the failure, rescheduling)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts before the launcher gives up")
    p.add_argument("--slow-rank", type=int, default=-1,
                   help="a rank slower in every phase from its first step (a manual straggler for tests without a GPU model)")
    p.add_argument("--slow-factor", type=float, default=0.15, help="how much slower --slow-rank is (0.15: 15%%)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    agents = [a for a in args.agents.split(",") if a]
    world = len(agents) * args.gpus_per_node
    started = time.time()
    specs = gpu_specs(args, len(agents), started)
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    checkpoint = ctx.RawValue("q", -1)  # the last whole checkpoint's step (no lock: a rank may be killed any time)
    state = {"barrier": None}

    def shutdown(*_):
        stop.set()
        if state["barrier"] is not None:
            state["barrier"].abort()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    restored: int | None = None
    for incarnation in range(args.max_restarts + 1):
        barrier = state["barrier"] = ctx.Barrier(world)
        procs = []
        for node, agent in enumerate(agents):
            for local in range(args.gpus_per_node):
                rank = node * args.gpus_per_node + local
                proc = ctx.Process(target=rank_main, daemon=True, args=(
                    args.job, rank, world, local, agent, barrier, stop, checkpoint, restored, specs[node], started, args))
                proc.start()
                procs.append(proc)
        failed = wait_for_ranks(procs, stop)
        if failed is None:
            return 0
        # The job fails as a whole: its other ranks would time out in the collective. Their barrier goes
        # with them (never aborted: that would wait for the killed ranks it holds to wake).
        state["barrier"] = None
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        if incarnation == args.max_restarts:
            print(f"training: rank {failed} died and {args.max_restarts} restarts are spent; giving up", file=sys.stderr, flush=True)
            return 1
        restored = max(0, checkpoint.value)
        print(f"training: rank {failed} died; the job restarts from the checkpoint at step {restored} "
              f"in {args.restart_delay:g} s", file=sys.stderr, flush=True)
        if stop.wait(args.restart_delay):
            return 0
    return 0


def wait_for_ranks(procs: list, stop) -> int | None:
    """Wait until every rank has ended (None) or one has died (its index in `procs`, its rank)."""
    alive = list(procs)
    while alive:
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.5)
        for proc in [p for p in alive if not p.is_alive()]:
            alive.remove(proc)
            if proc.exitcode != 0 and not stop.is_set():
                return procs.index(proc)
    return None


if __name__ == "__main__":
    sys.exit(main())
