"""Slurm: the jobs on this node (from the prolog and epilog, deploy/slurm/) and the jobs of the processes the
agent attributed (agent/slurm.py), as info series to join on `slurm_job`."""

from __future__ import annotations

from dataclasses import replace

from agent.slurm import SlurmAttribution, SlurmJob
from agent.sources.base import Family, NoData, Source, reading, register

INFO_LABELS = ("slurm_job", "user", "partition", "array_job", "array_task", "name")


@register("slurm")
class SlurmSource(Source):
    name = "slurm"
    families = (
        Family("fleetscope_slurm_job_info", "gauge",
               "A Slurm job with a process on this node or registered by the prolog; the value is always 1. Join "
               "on slurm_job with the per-process GPU series.", INFO_LABELS),
        Family("fleetscope_slurm_job_running", "gauge",
               "1 from the job's prolog to its epilog on this node, 0 for an hour after the epilog (deploy/slurm/).",
               ("slurm_job",)),
        Family("fleetscope_slurm_job_gpu", "gauge",
               "1 for each GPU of this node Slurm allocated to a running job (SLURM_JOB_GPUS, from its prolog), "
               "whether or not the job uses it; join on gpu with the GPU series.", ("slurm_job", "gpu")),
    )

    def __init__(self, *, slurm: SlurmAttribution | None = None, **_: object) -> None:
        self.slurm = slurm

    def collect(self):
        if self.slurm is None:
            raise NoData("no Slurm attribution configured")
        registered = self.slurm.jobs()
        jobs: dict[str, SlurmJob] = {}
        for job in self.slurm.processes().values():
            jobs[job.job] = _merge(jobs.get(job.job), job)
        for job_id, node_job in registered.items():
            jobs[job_id] = _merge(jobs.get(job_id), node_job.job)
        if not jobs and self.slurm.state_dir is not None and not self.slurm.registry_seen:
            raise NoData(f"no Slurm job seen and no {self.slurm.state_dir} (the prolog's; deploy/slurm/)")
        for job_id in sorted(jobs, key=int):
            j = jobs[job_id]
            yield reading("fleetscope_slurm_job_info", 1, slurm_job=j.job, user=j.user, partition=j.partition,
                          array_job=j.array_job, array_task=j.array_task, name=j.name)
        for job_id in sorted(registered, key=int):
            yield reading("fleetscope_slurm_job_running", 0 if registered[job_id].ended else 1, slurm_job=job_id)
        for job_id in sorted(registered, key=int):
            if registered[job_id].ended is None:
                for gpu in registered[job_id].gpus:
                    yield reading("fleetscope_slurm_job_gpu", 1, slurm_job=job_id, gpu=str(gpu))


def _merge(seen: SlurmJob | None, other: SlurmJob) -> SlurmJob:
    """One job's info from two views of it: the first's fields, the second's where the first has none (the
    step is left out: it is per process, not per job)."""
    if seen is None:
        return replace(other, step="")
    return replace(seen, **{k: getattr(other, k) for k in ("user", "partition", "array_job", "array_task", "name",
                                                           "restart_count") if not getattr(seen, k)})
