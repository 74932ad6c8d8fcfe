"""A real PyTorch DDP job (gloo, CPU) instrumented with fleetscope; run it with torchrun.

Environment: JOB (job name), STEPS (default 20), SLOW_RANK (a rank whose data loading takes
100 ms longer: a straggler), FLEETSCOPE_AGENT_ADDR (the agent's event socket).
"""

import os
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
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)))
    run = fleetscope.training(job=os.environ["JOB"])
    instrument_ddp(model, run)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    slow_rank = int(os.environ.get("SLOW_RANK", "-1"))
    for _ in range(int(os.environ.get("STEPS", "20"))):
        with run.step(tokens=32 * 64, samples=32) as step:
            with run.phase("data"):
                x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
                if rank == slow_rank:
                    time.sleep(0.1)
            with run.phase("forward"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            with run.phase("backward"):
                loss.backward()  # DDP's all-reduce runs in here, through fleetscope's hook
            with run.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad()
            step.record(loss=loss.item())
    dist.barrier()
    dist.destroy_process_group()
    assert run.emitter.dropped == 0


if __name__ == "__main__":
    main()
