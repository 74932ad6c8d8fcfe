"""Cgroup paths name the container, pod and Slurm job of a process."""

from __future__ import annotations

import pytest

from agent.cgroup import Owner, parse_cgroup


@pytest.mark.parametrize(
    "text, owner",
    [
        ("0::/system.slice/docker-" + "ab" * 32 + ".scope\n", Owner(container="abababababab")),
        ("12:memory:/docker/" + "cd" * 32 + "\n", Owner(container="cdcdcdcdcdcd")),
        ("0::/kubepods/burstable/pod0a1b2c3d-0000-1111-2222-333344445555/" + "ef" * 32 + "\n",  # cgroupfs driver
         Owner(container="efefefefefef", pod_uid="0a1b2c3d-0000-1111-2222-333344445555")),
        ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_0000_1111_2222_333344445555.slice/"
         "cri-containerd-" + "12" * 32 + ".scope\n",  # systemd driver
         Owner(container="121212121212", pod_uid="0a1b2c3d-0000-1111-2222-333344445555")),
        ("0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n", Owner(slurm_job="4711")),  # cgroup v2
        ("4:memory:/slurm/uid_1000/job_4711/step_0/task_0\n", Owner(slurm_job="4711")),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", Owner()),
    ],
)
def test_parse_cgroup(text, owner):
    assert parse_cgroup(text) == owner
