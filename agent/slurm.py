"""Which Slurm job a process belongs to (its cgroup and environment), and which jobs run on this node (prolog).

A process's Slurm job comes from two places:
- its cgroup, which slurmd makes and the process cannot leave: `/slurm/uid_<uid>/job_<id>/step_<step>/task_<n>`
  (cgroup/v1), `/system.slice/[<node>_]slurmstepd.scope/job_<id>/step_<step>/user/task_<n>` (cgroup/v2; from
  Slurm 26.05 the job directory is the job's SLUID, `sXXXXXXXXXXXXX`, unless CgroupJobIdPaths=yes). The step is a
  number or `batch`, `extern`, `interactive`;
- its environment (`/proc/<pid>/environ`, readable by root or the process's owner): SLURM_JOB_ID, SLURM_STEP_ID,
  SLURM_JOB_USER, SLURM_JOB_PARTITION, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURM_JOB_NAME,
  SLURM_RESTART_COUNT, SLURM_JOB_SLUID.
The cgroup decides the job and step (a process can set any environment it likes); the environment adds the rest
when it names the same job. An environment the agent may not read leaves the cgroup's ids alone, never an error.
What the prolog wrote about the job (below) fills in the user and partition the cgroup does not hold.

Each pid is read once per process (pid and start time), not at every sample or event.

The prolog and epilog (deploy/slurm/) keep one file per job on the node in the state directory
(/run/fleetscope-slurm): `<job id>.job` (KEY=value lines of the prolog's SLURM_* environment) when a job starts,
and `<job id>.ended` (the end time) when it ends, so the agent knows which jobs run and which ended.
"""

from __future__ import annotations

import os
import pwd
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent.procfs import start_ticks

DEFAULT_STATE_DIR = "/run/fleetscope-slurm"
ENDED_KEPT_S = 3600.0  # a job the epilog ended is remembered this long (its processes may linger)
RECHECK_S = 5.0  # how often a cached pid's start time is checked again (pids get reused)

_JOB_DIR = re.compile(r"^(?:job_(\d+)|(s[0-9A-HJKMNP-TV-Z]{13}))$")  # the job id, or (cgroup/v2, 26.05+) its SLUID
_STEP_DIR = re.compile(r"^step_(\d+|batch|extern|interactive)$")
_UID_DIR = re.compile(r"^uid_(\d+)$")
ENVIRON_KEYS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_USER", "SLURM_JOB_PARTITION", "SLURM_ARRAY_JOB_ID",
                "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "SLURM_JOB_SLUID", "SLURM_JOB_UID",
                # the prolog's names for two of them
                "SLURM_JOB_RESTART_COUNT", "SLURM_JOBID")


@dataclass(frozen=True)
class SlurmJob:
    """A Slurm job as the agent knows it; "" where it does not."""

    job: str
    step: str = ""
    user: str = ""
    partition: str = ""
    array_job: str = ""
    array_task: str = ""
    name: str = ""
    restart_count: str = ""

    def wire(self) -> dict:
        """The fields of fleetscope.schema.SlurmIds that are known (and that its bounds allow)."""
        out = {"job": self.job}
        for key in ("step", "user", "partition", "array_job", "array_task", "name"):
            value = getattr(self, key)
            if value and len(value) <= (256 if key in ("user", "partition", "name") else 64) \
                    and not any(ord(c) < 0x20 for c in value):
                out[key] = value
        if self.restart_count.isdigit():
            out["restart_count"] = int(self.restart_count)
        return out


@dataclass(frozen=True)
class CgroupIds:
    """What a process's cgroup path says about its Slurm job."""

    job: str = ""  # the numeric id
    sluid: str = ""  # cgroup/v2 from Slurm 26.05: the job directory is the SLUID instead
    step: str = ""
    uid: str = ""  # cgroup/v1 only


def parse_cgroup(text: str) -> CgroupIds:
    """/proc/<pid>/cgroup (v1 or v2) -> the Slurm job, step and (v1) uid of the process, or CgroupIds()."""
    for line in text.splitlines():
        parts = line.split(":", 2)[-1].split("/")
        for i, part in enumerate(parts):
            m = _JOB_DIR.match(part)
            if m is None or i == 0:
                continue
            parent = parts[i - 1]
            uid = _UID_DIR.match(parent)
            # under slurmd's own directory: /slurm[...]/[uid_N/]job_N (v1), [<node>_]slurmstepd.scope/job_N (v2)
            if not (uid and i >= 2 and parts[i - 2].startswith("slurm")) and not (
                    parent.startswith("slurm") or parent.endswith("slurmstepd.scope")):
                continue
            step = _STEP_DIR.match(parts[i + 1]) if i + 1 < len(parts) else None
            return CgroupIds(job=m.group(1) or "", sluid=m.group(2) or "", step=step.group(1) if step else "",
                             uid=uid.group(1) if uid else "")
    return CgroupIds()


def parse_environ(data: bytes) -> dict[str, str]:
    """/proc/<pid>/environ (NUL-separated KEY=value) -> the SLURM_* variables the agent uses."""
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        if item.startswith(b"SLURM_"):
            key, _, value = item.partition(b"=")
            name = key.decode("ascii", "replace")
            if name in ENVIRON_KEYS:
                out[name] = value.decode("utf-8", "replace")[:256]
    return out


def job_from_environ(env: dict[str, str]) -> SlurmJob | None:
    """The Slurm job an environment (a process's, or the prolog's) describes; None outside Slurm."""
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
    if not job.isdigit():
        return None
    return SlurmJob(job=job, step=env.get("SLURM_STEP_ID", ""), user=env.get("SLURM_JOB_USER", ""),
                    partition=env.get("SLURM_JOB_PARTITION", ""), array_job=env.get("SLURM_ARRAY_JOB_ID", ""),
                    array_task=env.get("SLURM_ARRAY_TASK_ID", ""), name=env.get("SLURM_JOB_NAME", ""),
                    restart_count=env.get("SLURM_RESTART_COUNT") or env.get("SLURM_JOB_RESTART_COUNT", ""))


def combine(cgroup: CgroupIds, env: dict[str, str], known: SlurmJob | None = None) -> SlurmJob | None:
    """A process's Slurm job: the cgroup's job and step, the rest from its environment when that names the same
    job (or there is no Slurm cgroup to check it against), else from `known` (what the prolog wrote)."""
    from_env = job_from_environ(env)
    if cgroup.sluid and from_env is not None and env.get("SLURM_JOB_SLUID") != cgroup.sluid:
        from_env = None  # the environment is another job's (it was inherited or made up)
    if cgroup.job and from_env is not None and from_env.job != cgroup.job:
        from_env = None
    if from_env is not None:
        return replace(from_env, step=cgroup.step or from_env.step)
    if not cgroup.job:
        return None  # a SLUID alone does not give the job id the rest of the system knows
    base = known if known is not None and known.job == cgroup.job else SlurmJob(cgroup.job)
    user = base.user or _user_name(cgroup.uid)
    return replace(base, step=cgroup.step, user=user)


def _user_name(uid: str) -> str:
    if not uid:
        return ""
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except (KeyError, ValueError):
        return uid


@dataclass(frozen=True)
class NodeJob:
    """A job the prolog registered on this node."""

    job: SlurmJob
    started: float  # when the prolog ran (its file's mtime)
    ended: float | None = None  # when the epilog ran
    gpus: tuple[int, ...] = ()  # the node's GPUs Slurm allocated it (SLURM_JOB_GPUS in the prolog's environment)


MAX_JOB_GPUS = 256


def parse_gpu_ids(text: str) -> tuple[int, ...]:
    """SLURM_JOB_GPUS ("0,1,3", or with ranges "0-3,6") -> the GPU indices, sorted; () for anything else. Slurm's GPU
    ids are the node's GPUs in gres.conf's order (AutoDetect=nvml orders them as NVML does, by PCI bus id)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            return ()
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first or last - first >= MAX_JOB_GPUS:
            return ()
        out.update(range(first, last + 1))
        if len(out) > MAX_JOB_GPUS:
            return ()
    return tuple(sorted(out))


class SlurmAttribution:
    """The Slurm job of each process (cached per pid and start time) and the jobs the prolog/epilog registered.

    Shared by the GPU source (process labels), the Slurm source (job info) and the listener (events from a
    Unix-socket sender, whose pid the kernel vouches for)."""

    def __init__(self, procfs: str = "/proc", state_dir: str | None = DEFAULT_STATE_DIR, clock=time.monotonic,
                 wall=time.time) -> None:
        self.procfs = procfs
        self.state_dir = Path(state_dir) if state_dir else None
        self.clock, self.wall = clock, wall
        # pid -> (start time, job or None, when checked, its wire dict); bounded
        self._pids: dict[int, tuple[str | None, SlurmJob | None, float, dict | None]] = {}
        self._lock = threading.Lock()  # the listener's thread and the sampler's both look processes up
        self._files: dict[str, tuple[float, NodeJob | None]] = {}  # file name -> (mtime, what it said)
        self._registry: dict[str, NodeJob] = {}
        self._registry_at = float("-inf")
        self.registry_seen = False  # whether the state directory existed when jobs() last looked

    # --- processes ------------------------------------------------------------------------------
    def of(self, pid: int) -> SlurmJob | None:
        """The Slurm job of a live process; None outside Slurm or when the process is gone."""
        return self._entry(pid)[1]

    def wire(self, pid: int) -> dict | None:
        """fleetscope.schema.SlurmIds fields of a process's job, for an event it sent; None outside Slurm."""
        return self._entry(pid)[3]

    def _entry(self, pid: int):
        now = self.clock()
        cached = self._pids.get(pid)
        if cached is not None and now - cached[2] < RECHECK_S:
            return cached
        start = start_ticks(self.procfs, pid)
        # A process found in a job keeps it; one found in none is read again (it may have been caught between
        # fork and exec, with its parent's environment).
        if cached is not None and start is not None and cached[0] == start and cached[1] is not None:
            entry = (start, cached[1], now, cached[3])
        else:
            job = self._read(pid) if start is not None else None
            entry = (start, job, now, job.wire() if job is not None else None)
        with self._lock:
            self._pids[pid] = entry
            while len(self._pids) > 65536:
                del self._pids[next(iter(self._pids))]
        return entry

    def _read(self, pid: int) -> SlurmJob | None:
        base = Path(self.procfs) / str(pid)
        try:
            cgroup = parse_cgroup((base / "cgroup").read_text())
        except OSError:
            cgroup = CgroupIds()
        try:
            env = parse_environ((base / "environ").read_bytes())
        except OSError:  # another user's process and the agent is not root, or it just ended: cgroup only
            env = {}
        known = self.jobs().get(cgroup.job) if cgroup.job else None
        return combine(cgroup, env, known.job if known is not None else None)

    def processes(self) -> dict[int, SlurmJob]:
        """The Slurm job of each live process the agent has looked at (GPU processes, event senders); the
        cache forgets the processes that ended."""
        out = {}
        with self._lock:
            cached = [(pid, entry[1]) for pid, entry in self._pids.items() if entry[1] is not None]
        # Only the processes found in a job are checked for life (on a node without Slurm: none, no system
        # call); those found in none stay cached, bounded, until their pid is looked up again.
        for pid, job in cached:
            if not os.path.exists(f"{self.procfs}/{pid}"):
                with self._lock:
                    self._pids.pop(pid, None)
            else:
                out[pid] = job
        return out

    # --- jobs on the node (prolog/epilog) -------------------------------------------------------
    def jobs(self) -> dict[str, NodeJob]:
        """Jobs the prolog registered, running or ended within ENDED_KEPT_S; read at most once a second."""
        now = self.clock()
        if self.state_dir is None or now - self._registry_at < 1.0:
            return self._registry
        self._registry_at = now
        try:
            names = os.listdir(self.state_dir)
        except OSError:
            self._registry, self._files, self.registry_seen = {}, {}, False
            return self._registry
        self.registry_seen = True
        files: dict[str, tuple[float, NodeJob | None]] = {}
        registry: dict[str, NodeJob] = {}
        ended: dict[str, float] = {}
        for name in names:
            stem, dot, kind = name.partition(".")
            if not stem.isdigit() or kind not in ("job", "ended"):
                continue  # the scripts' temporary files, anything else
            try:
                mtime = os.stat(self.state_dir / name).st_mtime
            except OSError:
                continue
            if kind == "ended":
                ended[stem] = mtime
                continue
            cached = self._files.get(name)
            if cached is None or cached[0] != mtime:
                cached = (mtime, _read_job_file(self.state_dir / name, mtime))
            files[name] = cached
            if cached[1] is not None:
                registry[cached[1].job.job] = cached[1]
        wall = self.wall()
        for job_id, at in ended.items():
            if job_id in registry:
                registry[job_id] = replace(registry[job_id], ended=at)
            else:  # an epilog without its prolog (the agent's node rebooted in between, or Prolog is not set)
                registry[job_id] = NodeJob(SlurmJob(job_id), started=at, ended=at)
        self._registry = {j: n for j, n in registry.items() if n.ended is None or wall - n.ended < ENDED_KEPT_S}
        self._files = files
        return self._registry


def _read_job_file(path: Path, mtime: float) -> NodeJob | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    job = job_from_environ(env)
    if job is None or job.job != path.name.partition(".")[0]:
        return None
    return NodeJob(replace(job, step=""), started=mtime, gpus=parse_gpu_ids(env.get("SLURM_JOB_GPUS", "")))
