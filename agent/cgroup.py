"""Who a GPU process belongs to: its container, Kubernetes pod or Slurm job, read from its cgroup."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.procfs import read_text
from agent.slurm import parse_cgroup as parse_slurm_cgroup

_CONTAINER = re.compile(r"(?:docker|cri-containerd|crio|containerd|libpod)[-:]([0-9a-f]{12,64})|/docker/([0-9a-f]{64})")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# The kubelet's cgroupfs driver names a container's cgroup by its bare id, under its pod's: .../pod<uid>/<id>
_POD_CHILD = re.compile(r"pod[0-9a-f_-]{36}/([0-9a-f]{64})(?:/|$)")


@dataclass(frozen=True)
class Owner:
    container: str = ""
    pod_uid: str = ""
    slurm_job: str = ""


def parse_cgroup(text: str) -> Owner:
    """/proc/<pid>/cgroup (v1 or v2) -> the container id (12 chars), pod UID and Slurm job id it shows."""
    container = pod = ""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        if not container and (m := _CONTAINER.search(path) or _POD_CHILD.search(path)):
            container = (m.group(1) or m.group(2))[:12]
        if not pod and (m := _POD.search(path)):
            pod = m.group(1).replace("_", "-")
    return Owner(container, pod, parse_slurm_cgroup(text).job)


def owner_of(pid: int, procfs: str = "/proc") -> Owner:
    text = read_text(Path(procfs) / str(pid) / "cgroup")
    return parse_cgroup(text) if text is not None else Owner()
