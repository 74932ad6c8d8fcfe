"""PyTorch DDP: when each rank reaches the first all-reduce of a step, and how long communication takes.

In synchronous data-parallel training the slow rank computes longer and waits less, so its whole
step looks like everyone else's. What tells it apart is when it *arrives* at the collective: DDP
calls its communication hook as each gradient bucket becomes ready, so the first call of a step
marks the end of that rank's compute. `instrument_ddp` registers a hook that does DDP's default
all-reduce and records, on the current step:

- metric `sync_arrival_s`: seconds from the step's start to the first bucket's all-reduce;
- phase `comm`: from that first all-reduce to the completion of the last one.
"""

import time
from typing import Any

from fleetscope.client import TrainingRun


class _State:
    def __init__(self, run: TrainingRun, process_group: Any) -> None:
        self.run = run
        self.process_group = process_group
        self.step: Any = None
        self.first: float | None = None


def instrument_ddp(model: Any, run: TrainingRun, process_group: Any = None) -> None:
    """Register fleetscope's communication hook on a DistributedDataParallel model (instead of the default)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    # DDP checks the hook's annotations at registration, so they must be the real types (no
    # `from __future__ import annotations` in this module).
    def hook(state: _State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        now = time.perf_counter()
        step = state.run._current
        try:
            if step is not None and step is not state.step:  # the first bucket of a new step
                state.step, state.first = step, now
                step.record(sync_arrival_s=now - step._t0)
        except Exception:  # never break training
            pass
        future = allreduce_hook(state.process_group, bucket)

        def done(fut: torch.futures.Future) -> torch.Tensor:
            try:
                if step is not None and state.first is not None and step is state.step:
                    step.phases["comm"] = time.perf_counter() - state.first  # the last bucket to finish wins
            except Exception:
                pass
            return fut.value()

        return future.then(done)

    group = process_group if process_group is not None else dist.group.WORLD
    model.register_comm_hook(_State(run, group), hook)
