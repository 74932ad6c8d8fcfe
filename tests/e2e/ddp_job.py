"""A real PyTorch DDP job (gloo, CPU) instrumented with fleetscope; run it with torchrun.

Environment: JOB (job name), STEPS (default 20), SLOW_RANK (a straggler rank), SLOW_MODE ("data100ms", the
default: its data loading takes 100 ms longer; "forward10": its forward pass takes 10% of a step longer,
measured on its own steps before the onset), SLOW_AFTER (the first slow step, default 0),
INSTRUMENT_DDP ("1", the default: fleetscope's instrument_ddp; "0": the README's first example only),
DEVICE_S (seconds per step that the rank waits as it would for a GPU's kernels, a third in forward and two
thirds in backward; default 0),
FLEETSCOPE_AGENT_ADDR (the agent's event socket).
"""

import gc
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fleetscope
from fleetscope.integrations.ddp import instrument_ddp


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    torch.set_num_threads(1)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)))
    run = fleetscope.training(job=os.environ["JOB"])
    if os.environ.get("INSTRUMENT_DDP", "1") == "1":
        instrument_ddp(model, run)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    slow = rank == int(os.environ.get("SLOW_RANK", "-1"))
    mode, slow_after = os.environ.get("SLOW_MODE", "data100ms"), int(os.environ.get("SLOW_AFTER", "0"))
    device_s = float(os.environ.get("DEVICE_S", "0"))
    durations: list[float] = []
    extra = 0.0
    for number in range(int(os.environ.get("STEPS", "20"))):
        if slow and number == slow_after and mode == "forward10":
            extra = 0.10 * statistics.median(durations[-20:]) if durations else 0.01
        t0 = time.perf_counter()
        with run.step(tokens=64 * 256, samples=64) as step:
            with run.phase("data"):
                x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
                if slow and mode == "data100ms" and number >= slow_after:
                    time.sleep(0.1)
            with run.phase("forward"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                time.sleep(device_s / 3)
                if extra:
                    time.sleep(extra)
            with run.phase("backward"):
                time.sleep(device_s * 2 / 3)  # the device computes the gradients before they are all-reduced
                loss.backward()  # DDP's all-reduce runs in here, through fleetscope's hook when instrumented
            with run.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad()
            step.record(loss=loss.item())
        durations.append(time.perf_counter() - t0)
    dist.barrier()
    # DDP's module sits in a reference cycle, so it, its reducer and the gloo process group they hold (with its C++
    # threads) outlive main() until a cyclic collection: at interpreter exit that tore the threads down mid-flight
    # now and then ("terminate called without an active exception", SIGABRT; 2 of 4 clean-clone runs of the suite).
    # Free them here, while the interpreter is whole, then destroy the group.
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()
    assert run.emitter.dropped == 0


if __name__ == "__main__":
    main()
