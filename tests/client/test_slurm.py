"""Under srun/sbatch the client puts its Slurm job's ids on every event (fleetscope.schema.SlurmIds)."""

from __future__ import annotations

import json

import fleetscope
from fleetscope.client import Emitter, slurm_ids
from fleetscope.schema import SlurmIds, decode_event

SRUN = {"SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0", "SLURM_JOB_USER": "alice", "SLURM_JOB_PARTITION": "gpu",
        "SLURM_ARRAY_JOB_ID": "4700", "SLURM_ARRAY_TASK_ID": "11", "SLURM_JOB_NAME": "llama",
        "SLURM_RESTART_COUNT": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}


def test_every_event_of_a_run_under_srun_carries_the_slurm_ids(udp, monkeypatch):
    for key, value in SRUN.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    emitter = Emitter(udp.getsockname())
    run = fleetscope.training(emitter=emitter)  # no arguments under Slurm
    with run.step(tokens=8):
        pass
    with run.pause("checkpoint"):
        pass
    svc = fleetscope.inference("chat", model="m", emitter=emitter)
    with svc.request() as r:
        r.finish(output_tokens=2)
    events = [decode_event(udp.recv(65536)) for _ in range(4)]
    expected = SlurmIds(job="4711", step="0", user="alice", partition="gpu", array_job="4700", array_task="11",
                        name="llama", restart_count=1)
    assert [e.slurm for e in events] == [expected] * 4
    step = events[0]
    assert (step.job, step.rank, step.world_size, step.local_rank) == ("llama", 1, 2, 1)


def test_outside_slurm_no_slurm_field_and_bad_values_are_left_out(udp, monkeypatch):
    for key in SRUN:
        monkeypatch.delenv(key, raising=False)
    run = fleetscope.training(job="j", emitter=Emitter(udp.getsockname()))
    with run.step():
        pass
    assert "slurm" not in json.loads(udp.recv(65536))
    assert slurm_ids({"SLURM_JOB_ID": "12x"}) is None
    ids = slurm_ids({"SLURM_JOB_ID": "12", "SLURM_JOB_NAME": "x" * 300, "SLURM_JOB_USER": "a\nb",
                     "SLURM_RESTART_COUNT": "two"})
    assert ids == {"job": "12"}
