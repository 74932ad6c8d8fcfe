"""fleetscope: the workload client that training and inference processes import.

    import fleetscope
    run = fleetscope.training(job="llama3-70b")
    with run.step(tokens=4096):
        ...
    svc = fleetscope.inference(service="chat", model="llama3-8b")
    with svc.request() as r:
        r.first_token(); ...; r.finish(output_tokens=128)
"""

from __future__ import annotations

import os

from fleetscope.client import Emitter, InferenceService, Request, Step, TrainingRun

__all__ = ["training", "inference", "TrainingRun", "InferenceService", "Step", "Request", "Emitter"]
__version__ = "0.1.0"


def training(job: str | None = None, **kwargs) -> TrainingRun:
    """Report the steps of this rank of `job`; rank and world size come from torchrun/Slurm env. Under
    `srun`/`sbatch` the job name defaults to Slurm's (SLURM_JOB_NAME); elsewhere it must be given."""
    if job is None:
        job = os.environ.get("SLURM_JOB_NAME") or None
        if job is None:
            raise TypeError("fleetscope.training(): give the job's name (job=...); only under Slurm does it default "
                            "to SLURM_JOB_NAME")
    return TrainingRun(job, **kwargs)


def inference(service: str, *, model: str, **kwargs) -> InferenceService:
    """Report the requests this process serves for `service` running `model`."""
    return InferenceService(service, model=model, **kwargs)
