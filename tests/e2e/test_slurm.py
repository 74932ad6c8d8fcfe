"""End to end on a real single-node Slurm (Debian's slurm-wlm and munge): slurmctld and slurmd on localhost with
the project's prolog and epilog, 2-task `srun` jobs whose script calls only `fleetscope.training()`, a real
agent (its Unix events socket) and a real collector; the collector's API shows the job with its Slurm job ids,
user and partition, and the agent attributes the srun tasks' processes and tracks the job's start and end.

The daemons start once per module in a temporary folder (their own munge key and socket, their own ports,
`proctrack/linuxproc` and `task/none`: no cgroup plugin, which a container seldom allows) and are stopped at
the end, whatever happened."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.slurm import SlurmAttribution
from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.e2e.conftest import INGEST, api

REPO = Path(__file__).resolve().parents[2]
PARTITION = "fsgpu"
JOB = "e2e-slurm-train"
TASK = """
import os, sys, time
import fleetscope

run = fleetscope.training()  # no arguments: job name, rank, world size and local rank from Slurm
folder = sys.argv[1]
steps = int(sys.argv[2])
for n in range(steps):
    with run.step(tokens=64):
        time.sleep(0.01)
    if n == 4 and len(sys.argv) > 3:  # hold the task alive until the test has looked at its process
        with open(os.path.join(folder, f"task-{os.environ['SLURM_PROCID']}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(folder, "go")) and time.time() < deadline:
            time.sleep(0.05)
"""


def _start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node Slurm: yields (environment for its clients, the agent's Slurm folder, the folder)."""
    binaries = {name: require_binary(name) for name in ("munged", "slurmctld", "slurmd", "srun", "sinfo", "squeue")}
    if os.geteuid() != 0:  # slurmd launches tasks as their user, which takes root
        message = "the Slurm end-to-end test runs slurmd, which needs root (make test runs as root in CI)"
        if os.environ.get("FLEETSCOPE_REQUIRE_SYSTEM_DEPS"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "fleetscope"):
        (root / sub).mkdir()
    root.chmod(0o755)  # munged refuses a socket folder others may write to; slurmd's prolog runs as root anyway
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    hooks = {}
    for hook in ("prolog", "epilog"):  # what a site does: the scripts as shipped, with the folder the agent reads
        wrapper = root / f"{hook}.sh"
        wrapper.write_text(f"#!/bin/sh\nFLEETSCOPE_SLURM_DIR={root / 'fleetscope'} exec /bin/sh "
                           f"{REPO / 'deploy' / 'slurm' / f'{hook}.sh'}\n")
        wrapper.chmod(0o755)
        hooks[hook] = wrapper
    node = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=fleetscope-e2e
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root / 'munge.sock'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
Prolog={hooks['prolog']}
Epilog={hooks['epilog']}
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[name]  # a test run inside a Slurm job must not lend its job to these
    daemons = []
    try:
        daemons.append(_start([binaries["munged"], "-F", "-f", f"--socket={root / 'munge.sock'}", f"--key-file={key}",
                               f"--log-file={root / 'log' / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
                               f"--seed-file={root / 'munged.seed'}"], root / "log" / "munged.out", env))
        wait_until(lambda: (root / "munge.sock").exists(), timeout=10, what="munged's socket")
        daemons.append(_start([binaries["slurmctld"], "-D", "-i", "-f", str(conf)], root / "log" / "slurmctld.out", env))
        daemons.append(_start([binaries["slurmd"], "-D", "-N", node, "-f", str(conf)], root / "log" / "slurmd.out", env))

        def idle() -> bool:
            out = subprocess.run([binaries["sinfo"], "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=5)
            return out.stdout.strip() == "idle"

        try:
            wait_until(idle, timeout=30, what="the Slurm node to be idle")
        except AssertionError:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted((root / "log").iterdir()))
            raise AssertionError(f"Slurm did not come up:\n{logs}") from None
        yield env, root / "fleetscope", root
    finally:
        for proc in reversed(daemons):
            _stop(proc)


def metric_lines(url: str, name: str) -> list[str]:
    status, body = http_get(url)
    assert status == 200
    return [line for line in body.decode().splitlines() if line.startswith(name + "{")]


def test_a_2_task_srun_job_is_attributed_on_the_node_and_linked_to_its_slurm_jobs_at_the_collector(
        slurm, procs, collector, tmp_path):
    env, state_dir, root = slurm
    # The agent on the node: its Unix events socket (the kernel names each sender) and the prolog's folder.
    metrics_port, sock = free_port(), tmp_path / "events.sock"
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nslurm_state_dir = "{state_dir}"\n')
    config.chmod(0o600)
    agent = procs("agent", [sys.executable, "-m", "fleetscope", "agent", "--config", str(config), "--node", "slurm-node",
                            "--gpu-backend", "none", "--interval", "0.5", "--metrics-address", f"127.0.0.1:{metrics_port}",
                            "--events-address", f"unix:{sock}", "--collector-url", collector.url,
                            "--spool-dir", str(tmp_path / "spool")], {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_until(lambda: http_get(metrics)[0] == 200 and sock.exists(), timeout=30, what="the agent")

    task = tmp_path / "train.py"
    task.write_text(TASK)
    job_env = {**env, "FLEETSCOPE_AGENT_ADDR": f"unix:{sock}"}
    srun = [require_binary("srun"), "-n", "2", "-J", JOB, "-p", PARTITION, "--kill-on-bad-exit=1", sys.executable, str(task)]
    first = subprocess.Popen([*srun, str(tmp_path), "30", "hold"], env=job_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pids = wait_until(lambda: [int((tmp_path / f"task-{r}.pid").read_text()) for r in (0, 1)], timeout=30,
                          what="both srun tasks to start")
        squeue = subprocess.run(["squeue", "-h", "-n", JOB, "-o", "%i %u %P"], env=env, capture_output=True, text=True)
        job_id, user, partition = squeue.stdout.split()
        assert (user, partition) == (getpass.getuser(), PARTITION)

        # The agent's attribution of the real task processes, read from their /proc (environ: linuxproc makes no
        # Slurm cgroup here), and the prolog's record of the job.
        attribution = SlurmAttribution("/proc", str(state_dir))
        for pid in pids:
            found = attribution.of(pid)
            assert found is not None, open(f"/proc/{pid}/cgroup").read()
            assert (found.job, found.step, found.user, found.partition, found.name) == (job_id, "0", user, PARTITION, JOB)
        assert attribution.jobs()[job_id].ended is None
        assert (state_dir / f"{job_id}.job").read_text().count(f"SLURM_JOB_ID={job_id}") == 1
        info = wait_until(lambda: metric_lines(metrics, "fleetscope_slurm_job_info"), timeout=10, what="job info")
        assert f'slurm_job="{job_id}"' in info[0] and f'user="{user}"' in info[0] and f'partition="{PARTITION}"' in info[0]
        # The info can come first, from the tasks' own events; the running state from the prolog's record, read at
        # the agent's next sample.
        wait_until(lambda: metric_lines(metrics, "fleetscope_slurm_job_running") == [
            f'fleetscope_slurm_job_running{{slurm_job="{job_id}"}} 1.0'], timeout=10, what="the prolog to be seen")
    finally:
        (tmp_path / "go").write_text("")
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out.decode(errors="replace")

    # The job ends: the epilog runs, and the agent says so.
    wait_until(lambda: metric_lines(metrics, "fleetscope_slurm_job_running") == [
        f'fleetscope_slurm_job_running{{slurm_job="{job_id}"}} 0.0'], timeout=20, what="the epilog to be seen")

    # A new sbatch/srun of the same job name is a new Slurm job: a second incarnation, linked too.
    second = subprocess.run([*srun, str(tmp_path), "20"], env=job_env, capture_output=True, timeout=60)
    assert second.returncode == 0, second.stdout + second.stderr

    def linked():
        if not any(j["job"] == JOB for j in api(collector, "/v1/jobs")["jobs"]):
            return None
        detail = api(collector, f"/v1/jobs/{JOB}")
        # every step event of both runs (per-rank figures count a step the second run ran again once)
        return detail if len(detail["slurm"]) == 2 and detail["job"]["step_events"] == 100 else None

    detail = wait_until(linked, timeout=30, what="both Slurm jobs' 100 steps at the collector")
    first_link, second_link = detail["slurm"]
    assert first_link["slurm_job"] == job_id and int(second_link["slurm_job"]) > int(job_id)
    for link in (first_link, second_link):
        assert (link["user"], link["partition"], link["name"], link["steps"], link["ranks"]) == (
            user, PARTITION, JOB, ["0"], 2)
        assert link["nodes"] == ["slurm-node"]
    assert [r["rank"] for r in detail["ranks"]] == [0, 1]
    assert [r["steps"] for r in detail["ranks"]] == [30, 30]  # steps 0-19 of the second run, 20-29 of the first
    (listed,) = [j for j in api(collector, "/v1/jobs")["jobs"] if j["job"] == JOB]
    assert listed["slurm_job_ids"] == [job_id, second_link["slurm_job"]]
    assert (listed["slurm_job"], listed["slurm_user"], listed["slurm_partition"]) == (second_link["slurm_job"], user, PARTITION)
    # the events came over the Unix socket, their pid and Slurm job vouched for by the agent
    status, body = http_get(metrics)
    assert 'fleetscope_agent_events_verified_total{kind="step"} 100.0' in body.decode()
    agent.stop()
