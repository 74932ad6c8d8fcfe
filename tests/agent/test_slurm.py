"""The agent's Slurm attribution: cgroup layouts slurmd makes, environ, the per-process cache, the prolog's
registry, the Slurm source's series and the listener's enrichment of events."""

from __future__ import annotations

import os
import socket

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from agent.cgroup import Owner, parse_cgroup as parse_owner
from agent.listener import Listener
from agent.slurm import CgroupIds, SlurmAttribution, SlurmJob, combine, parse_cgroup, parse_environ
from agent.sources.base import NoData
from agent.sources.slurm import SlurmSource
from fleetscope.schema import SlurmIds, decode_event

# Paths as slurmd makes them (src/plugins/cgroup/v1/xcgroup.c, v2/cgroup_v2.c), as /proc/<pid>/cgroup shows them.
V1 = ("12:pids:/slurm/uid_1000/job_4711/step_0/task_1\n"
      "4:memory:/slurm/uid_1000/job_4711/step_0/task_1\n"
      "1:name=systemd:/system.slice/slurmd.service\n")


@pytest.mark.parametrize("text, ids", [
    (V1, CgroupIds(job="4711", step="0", uid="1000")),
    ("0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n", CgroupIds(job="4711", step="0")),
    ("0::/system.slice/slurmstepd.scope/job_4711/step_batch/user/task_0\n", CgroupIds(job="4711", step="batch")),
    ("0::/system.slice/slurmstepd.scope/job_4711/step_extern/user/task_special\n", CgroupIds(job="4711", step="extern")),
    ("0::/system.slice/slurmstepd.scope/job_9/step_interactive/user/task_0\n", CgroupIds(job="9", step="interactive")),
    # several slurmd on one host (--enable-multiple-slurmd): the scope is prefixed with the node name
    ("0::/system.slice/gpu-007_slurmstepd.scope/job_12/step_3/user/task_2\n", CgroupIds(job="12", step="3")),
    # slurmstepd itself sits in the step's slurm directory, not under user/
    ("0::/system.slice/slurmstepd.scope/job_12/step_3/slurm\n", CgroupIds(job="12", step="3")),
    # Slurm 26.05 on cgroup/v2 names the job directory by its SLUID unless CgroupJobIdPaths=yes
    ("0::/system.slice/slurmstepd.scope/sEKNKTV3WPV500/step_0/user/task_0\n", CgroupIds(sluid="sEKNKTV3WPV500", step="0")),
    ("4:memory:/slurm_gpu-007/uid_0/job_5/step_batch/task_0\n", CgroupIds(job="5", step="batch", uid="0")),
    # a job_ directory that slurmd did not make is no Slurm job
    ("0::/user.slice/user-1000.slice/job_12/step_0\n", CgroupIds()),
    ("0::/system.slice/slurmd.service\n", CgroupIds()),
    ("0::/\n", CgroupIds()),
])
def test_cgroup_layouts(text, ids):
    assert parse_cgroup(text) == ids


def test_the_owner_of_a_process_takes_the_slurm_job_from_the_same_parser():
    assert parse_owner(V1) == Owner(slurm_job="4711")
    assert parse_owner("0::/system.slice/n1_slurmstepd.scope/job_8/step_0/user/task_0\n") == Owner(slurm_job="8")


ENV = {"SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0", "SLURM_JOB_USER": "alice", "SLURM_JOB_PARTITION": "gpu",
       "SLURM_ARRAY_JOB_ID": "4700", "SLURM_ARRAY_TASK_ID": "11", "SLURM_JOB_NAME": "llama", "SLURM_RESTART_COUNT": "2"}


def environ(env: dict) -> bytes:
    return b"\0".join(f"{k}={v}".encode() for k, v in {"PATH": "/usr/bin", **env}.items()) + b"\0"


def test_environ_gives_the_ids_and_nothing_else():
    assert parse_environ(environ({**ENV, "SLURM_CPUS_ON_NODE": "8", "HOME": "/root"})) == ENV
    job = combine(CgroupIds(job="4711", step="0", uid="1000"), ENV)
    assert job == SlurmJob("4711", "0", "alice", "gpu", "4700", "11", "llama", "2")
    assert job.wire() == {"job": "4711", "step": "0", "user": "alice", "partition": "gpu", "array_job": "4700",
                          "array_task": "11", "name": "llama", "restart_count": 2}
    msgspec.convert(job.wire(), SlurmIds)  # what the listener puts on an event passes the schema


def test_the_cgroup_decides_the_job_and_an_environment_of_another_job_is_ignored():
    # a process that inherited (or made up) another job's environment: only what the cgroup vouches for
    job = combine(CgroupIds(job="99", step="1", uid=str(os.getuid())), ENV)
    assert job.job == "99" and job.step == "1" and job.partition == "" and job.name == ""
    assert job.user  # from the uid of the v1 path
    # the SLUID layout: the environment must carry the same SLUID to be believed
    assert combine(CgroupIds(sluid="sEKNKTV3WPV500", step="0"), ENV) is None
    assert combine(CgroupIds(sluid="sEKNKTV3WPV500", step="0"), {**ENV, "SLURM_JOB_SLUID": "sEKNKTV3WPV500"}).job == "4711"
    # no Slurm cgroup (proctrack/linuxproc, a container): the environment alone
    assert combine(CgroupIds(), ENV).partition == "gpu"
    assert combine(CgroupIds(), {}) is None


def fake_proc(root, pid: int, cgroup: str, env: dict | None, start: int = 1000) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} (python3 (x) y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n")
    (d / "cgroup").write_text(cgroup)
    if env is not None:
        (d / "environ").write_bytes(environ(env))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_attribution_is_read_once_per_process_and_again_when_the_pid_is_reused(tmp_path):
    proc, clock = tmp_path / "proc", Clock()
    fake_proc(proc, 42, "0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n", ENV)
    slurm = SlurmAttribution(str(proc), None, clock=clock)
    assert slurm.of(42) == SlurmJob("4711", "0", "alice", "gpu", "4700", "11", "llama", "2")
    (proc / "42" / "environ").write_bytes(environ({**ENV, "SLURM_JOB_USER": "mallory"}))
    clock.t += 60
    assert slurm.of(42).user == "alice"  # the same process (same start time): not read again
    # the pid is reused by a process of another job
    fake_proc(proc, 42, "0::/system.slice/slurmstepd.scope/job_5000/step_2/user/task_0\n",
              {**ENV, "SLURM_JOB_ID": "5000", "SLURM_STEP_ID": "2", "SLURM_JOB_USER": "bob"}, start=2000)
    clock.t += 1
    assert slurm.of(42).user == "alice"  # within RECHECK_S the cache answers without a read
    clock.t += 10
    assert (slurm.of(42).job, slurm.of(42).user, slurm.of(42).step) == ("5000", "bob", "2")
    assert slurm.of(43) is None  # no such process
    (proc / "42" / "stat").unlink()
    (proc / "42" / "cgroup").unlink()
    (proc / "42" / "environ").unlink()
    (proc / "42").rmdir()
    assert slurm.processes() == {}  # the ended process is forgotten


def test_an_unreadable_environ_leaves_the_cgroup_and_the_prolog_s_registry(tmp_path):
    proc, state = tmp_path / "proc", tmp_path / "slurm"
    state.mkdir()
    (state / "4711.job").write_text("SLURM_JOB_ID=4711\nSLURM_JOB_USER=alice\nSLURM_JOB_PARTITION=gpu\n")
    fake_proc(proc, 7, V1, None)
    (proc / "7" / "environ").mkdir()  # reading it fails (as another user's environ does without root)
    slurm = SlurmAttribution(str(proc), str(state))
    assert slurm.of(7) == SlurmJob("4711", "0", "alice", "gpu")
    fake_proc(proc, 8, "0::/system.slice/slurmstepd.scope/job_12/step_0/user/task_0\n", None)
    assert slurm.of(8) == SlurmJob("12", "0")  # no environ, no prolog file: the cgroup's ids, no error


def samples(source) -> dict:
    return {(r.name, r.labels): r.value for r in source.collect()}


def test_the_slurm_source_exports_job_info_and_the_prolog_s_running_and_ended_jobs(tmp_path):
    proc, state = tmp_path / "proc", tmp_path / "slurm"
    state.mkdir()
    (state / "4711.job").write_text("SLURM_JOB_ID=4711\nSLURM_JOB_USER=alice\nSLURM_JOB_PARTITION=gpu\n"
                                    "SLURM_JOB_GPUS=0-1,3\n")
    (state / "4712.job").write_text("SLURM_JOB_ID=4712\nSLURM_JOB_USER=bob\nSLURM_JOB_PARTITION=cpu\nSLURM_JOB_GPUS=2\n")
    (state / "4712.ended").write_text("")
    (state / "junk.tmp").write_text("x")
    (state / "13.job").write_text("SLURM_JOB_ID=14\n")  # names another job than its file: ignored
    fake_proc(proc, 42, "0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n", ENV)
    slurm = SlurmAttribution(str(proc), str(state))
    slurm.of(42)
    got = samples(SlurmSource(slurm=slurm))
    info = (("slurm_job", "4711"), ("user", "alice"), ("partition", "gpu"), ("array_job", "4700"),
            ("array_task", "11"), ("name", "llama"))
    assert got[("fleetscope_slurm_job_info", info)] == 1
    assert got[("fleetscope_slurm_job_info", (("slurm_job", "4712"), ("user", "bob"), ("partition", "cpu"),
                                              ("array_job", ""), ("array_task", ""), ("name", "")))] == 1
    assert got[("fleetscope_slurm_job_running", (("slurm_job", "4711"),))] == 1
    assert got[("fleetscope_slurm_job_running", (("slurm_job", "4712"),))] == 0
    assert not any(dict(k[1]).get("slurm_job") in ("13", "14") for k in got)
    # the GPUs Slurm gave each running job on this node (the ended job's are free again)
    allocated = sorted(dict(k[1])["gpu"] for k in got if k[0] == "fleetscope_slurm_job_gpu")
    assert allocated == ["0", "1", "3"]
    assert all(dict(k[1])["slurm_job"] == "4711" for k in got if k[0] == "fleetscope_slurm_job_gpu")


@pytest.mark.parametrize("text, ids", [("0", (0,)), ("0,1,3", (0, 1, 3)), ("0-3,6", (0, 1, 2, 3, 6)), ("3,1", (1, 3)),
                                       ("", ()), ("gpu0", ()), ("1-", ()), ("3-1", ()), ("0-100000", ()), ("0,x", ())])
def test_slurm_job_gpus_parses_lists_and_ranges_and_nothing_else(text, ids):
    from agent.slurm import parse_gpu_ids

    assert parse_gpu_ids(text) == ids


def test_no_slurm_is_no_data_not_an_error(tmp_path):
    from agent.sources.base import NoData

    with pytest.raises(NoData):
        list(SlurmSource(slurm=SlurmAttribution(str(tmp_path), str(tmp_path / "absent"))).collect())


def test_without_slurm_a_sample_looks_up_no_process_again(tmp_path, monkeypatch):
    """Processes found outside Slurm (every GPU process on a node without it) are not checked for life at each
    sample: only those found in a job are, so that a job whose processes ended leaves the job info series."""
    proc = tmp_path / "proc"
    fake_proc(proc, 42, "0::/user.slice/user-1000.slice/session-1.scope\n", {"HOME": "/root"})
    fake_proc(proc, 43, "0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n", ENV)
    slurm = SlurmAttribution(str(proc), str(tmp_path / "absent"))
    assert slurm.of(42) is None and slurm.of(43).job == "4711"
    looked = []
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: looked.append(str(p)) or real_exists(p))
    assert slurm.processes() == {43: slurm.of(43)}
    assert looked == [f"{proc}/43"]
    for name in ("stat", "cgroup", "environ"):
        (proc / "43" / name).unlink()
    (proc / "43").rmdir()
    assert slurm.processes() == {}  # the job's process ended: forgotten
    source = SlurmSource(slurm=slurm)
    with pytest.raises(NoData):  # no job, no prolog's directory
        list(source.collect())
    (tmp_path / "absent").mkdir()  # the prolog ran for the first time: no job yet, but Slurm is here
    slurm._registry_at = float("-inf")
    assert list(source.collect()) == []


def test_the_agent_renders_the_slurm_families_through_the_exporter(tmp_path):
    """What Prometheus scrapes: the families pass the exporter with their help and labels."""
    from agent.exporter import AgentCollector, make_registry
    from agent.sampler import Sampler

    state = tmp_path / "slurm"
    state.mkdir()
    (state / "77.job").write_text("SLURM_JOB_ID=77\nSLURM_JOB_USER=alice\nSLURM_JOB_PARTITION=gpu\n")
    source = SlurmSource(slurm=SlurmAttribution(str(tmp_path / "proc"), str(state)))
    sampler = Sampler([source], 60)
    sampler.sample_once()
    registry = make_registry(AgentCollector(sampler, [], version="test"))
    assert isinstance(registry, CollectorRegistry)
    assert registry.get_sample_value("fleetscope_slurm_job_running", {"slurm_job": "77"}) == 1
    assert registry.get_sample_value("fleetscope_slurm_job_info", {
        "slurm_job": "77", "user": "alice", "partition": "gpu", "array_job": "", "array_task": "", "name": ""}) == 1


def test_events_of_a_unix_socket_sender_get_its_slurm_job_and_udp_events_keep_the_client_s(tmp_path):
    """The kernel names a Unix sender's pid: the agent's reading of that process wins over what it claims."""
    got = []
    ours = {"job": "4711", "step": "0", "user": "alice", "partition": "gpu"}
    path = str(tmp_path / "events.sock")
    listener = Listener(f"unix:{path},127.0.0.1:0", node="n1", deliver=got.append,
                        slurm_lookup=lambda pid: ours if pid == os.getpid() else None)
    try:
        claim = (b'{"v":1,"kind":"step","job":"j","rank":0,"world_size":1,"step":1,"ts":1.0,"duration_s":0.1,'
                 b'"pid":%d,"slurm":{"job":"1","user":"mallory"}}' % os.getpid())
        event = listener.handle(claim, None, (os.getpid(), os.getuid(), os.getgid()))
        assert event.slurm == SlurmIds(job="4711", step="0", user="alice", partition="gpu")
        # over UDP nothing vouches for the pid: the client's own ids stay
        event = listener.handle(claim, ("127.0.0.1", 5555), None)
        assert event.slurm == SlurmIds(job="1", user="mallory")
        # a Unix sender outside Slurm keeps what it sent (its own environment)
        other = claim.replace(b'"pid":%d' % os.getpid(), b'"pid":1')
        event = listener.handle(other, None, (1, 0, 0))
        assert event.slurm == SlurmIds(job="1", user="mallory")
        # a real datagram over the real socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(claim, path)
        listener.sock.setblocking(False)
        listener.unix_sock.setblocking(False)
        listener._drain_unix(listener.unix_sock)
        assert got[-1].slurm.user == "alice" and got[-1].pid == os.getpid()
        assert decode_event(msgspec.json.encode(got[-1])).slurm.job == "4711"
    finally:
        listener.stop()


def test_the_real_agent_attributes_this_very_process_from_its_own_proc(tmp_path, monkeypatch):
    """No fake tree: /proc/self of a process given a Slurm environment (as srun gives it)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                             env={**os.environ, **ENV}, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"  # past exec: its environ is its own, not this process's copy
        job = SlurmAttribution("/proc", None).of(child.pid)
        assert job is not None and (job.job, job.user, job.partition, job.array_task) == ("4711", "alice", "gpu", "11")
    finally:
        child.kill()
        child.wait()


def test_gpu_process_series_carry_the_slurm_job_and_info_joins_on_it(tmp_path):
    """A real NVML code path (fake pynvml): the process on GPU 0 is labelled with its Slurm job from its environ
    (proctrack/linuxproc: no Slurm cgroup), and the Slurm source's info series names its user and partition."""
    from agent.exporter import AgentCollector
    from agent.gpu.nvml import Nvml
    from agent.sampler import Sampler
    from agent.sources.gpu import GpuSource
    from tests.agent.fake_pynvml import FakeNvml
    from tests.agent.test_nvml import G0, device

    fake_proc(tmp_path, 4242, "0::/\n", {**ENV, "SLURM_JOB_ID": "31"})
    slurm = SlurmAttribution(str(tmp_path), None)
    sampler = Sampler([GpuSource(backend=Nvml(FakeNvml([device(0)])), procfs=str(tmp_path), slurm=slurm),
                       SlurmSource(slurm=slurm)])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler))
    sampler.sample_once()
    sampler.sample_once()  # the GPU source runs after the others (it may block): its processes' jobs show a sample later
    labels = {**G0, "pid": "4242", "container": "", "pod_uid": "", "slurm_job": "31", "training_job": "", "rank": ""}
    assert reg.get_sample_value("fleetscope_gpu_process_memory_used_bytes", labels) == 2**30
    assert reg.get_sample_value("fleetscope_slurm_job_info", {"slurm_job": "31", "user": "alice", "partition": "gpu",
                                                              "array_job": "4700", "array_task": "11", "name": "llama"}) == 1
