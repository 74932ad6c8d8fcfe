"""The agent's Unix socket against real processes: the kernel, not the event, says who sent it (issue 12).

The review: any local user could send events through the agent's UDP socket, with any pid in them, and
the per-sender buckets were per port, so one user could open sockets until the limits meant nothing.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, http_get, wait_until
from tests.e2e.conftest import api
from tests.security.conftest import INGEST, agent_metrics

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_PASSCRED"), reason="SO_PASSCRED is Linux's")

# A workload that forges its pid: one step through the client's emit() claiming pid 1 (init), one honest step.
FORGER = """
import os, sys
import fleetscope
from fleetscope.client import Emitter
emitter = Emitter(sys.argv[1])
emitter.emit({"v": 1, "kind": "step", "job": "forger", "rank": 0, "world_size": 1, "step": 0, "ts": __import__("time").time(),
              "duration_s": 0.1, "pid": 1})
run = fleetscope.training(job="forger", rank=0, world_size=1, emitter=emitter)
with run.step(number=1):
    pass
print(os.getpid(), emitter.sent, emitter.dropped)
"""

# A sender as some user: switch uid, then n small events (steps, or requests) through a blocking socket (so none is
# lost to a full kernel queue, and what the agent refuses is the agent's doing).
SENDER = """
import json, os, socket, sys, time
path, n, uid, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if uid != os.getuid():
    os.setgid(uid)
    os.setuid(uid)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(n):
    if kind == "step":
        event = {"v": 1, "kind": "step", "job": "flood", "rank": 0, "world_size": 1, "step": i, "ts": time.time(),
                 "duration_s": 0.1}
    else:
        event = {"v": 1, "kind": "request", "service": "chat", "model": "m", "ts": time.time(), "e2e_s": 0.1}
    sock.sendto(json.dumps(event).encode(), path)
print(os.getuid(), n)
"""


@pytest.fixture
def socket_folder():
    # Not tmp_path: a Unix socket's path must fit in 108 bytes. Traversable by every user, as /run/fleetscope is.
    with tempfile.TemporaryDirectory(prefix="fs-", dir="/tmp") as path:
        os.chmod(path, 0o755)
        yield path


def start_agent(procs, socket_path: str, collector_url: str | None = None, spool: Path | None = None):
    metrics_port, events_port = free_port(), free_port(socket.SOCK_DGRAM)
    argv = [sys.executable, "-m", "fleetscope", "agent", "--node", "sock-node", "--gpu-backend", "simulated", "--gpus", "1",
            "--interval", "1", "--metrics-address", f"127.0.0.1:{metrics_port}",
            "--events-address", f"unix:{socket_path},127.0.0.1:{events_port}"]
    if collector_url:
        argv += ["--collector-url", collector_url, "--spool-dir", str(spool)]
    proc = procs("agent", argv, {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_until(lambda: http_get(proc.metrics_url)[0] == 200, what="the agent's /metrics", timeout=30)
    return proc


def run_python(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()


VERIFIED = 'fleetscope_agent_events_verified_total{kind="step"}'
LIMITED = 'fleetscope_agent_events_rejected_total{reason="rate_limited"}'


def test_a_forged_pid_is_stored_as_the_senders_real_pid(procs, collector, tmp_path, socket_folder):
    pl = pytest.importorskip("polars")
    path = os.path.join(socket_folder, "events.sock")
    agent = start_agent(procs, path, collector.url, tmp_path / "spool")
    assert os.stat(path).st_mode & 0o777 == 0o666
    pid, sent, dropped = map(int, run_python(FORGER, f"unix:{path}"))
    assert (sent, dropped) == (2, 0)

    wait_until(lambda: agent_metrics(agent)[VERIFIED] == 2, timeout=30, what="both steps verified")
    m = agent_metrics(agent)
    assert m["fleetscope_agent_events_pid_mismatch_total"] == 1
    wait_until(lambda: api(collector, "/v1/jobs/forger")["job"]["step_events"] == 2
               if "forger" in {j["job"] for j in api(collector, "/v1/jobs")["jobs"]} else False,
               timeout=30, interval=0.5, what="the forger's two steps at the collector")
    collector.stop()  # a clean stop writes the hot tier to Parquet
    files = glob.glob(str(tmp_path / "collector" / "**" / "*.parquet"), recursive=True)
    steps = pl.concat([pl.read_parquet(f) for f in files if "steps" in f], how="diagonal_relaxed")
    stored = steps.filter(pl.col("job") == "forger").sort("step")
    assert stored["step"].to_list() == [0, 1]
    assert stored["pid"].to_list() == [pid, pid], "the claimed pid 1 was stored"
    assert stored["node"].to_list() == ["sock-node"] * 2
    agent.stop()
    assert not os.path.exists(path), "the agent leaves no socket file behind"
    assert "Traceback" not in agent.output()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a sender to another uid needs root")
def test_each_user_has_its_own_bucket_however_many_processes_it_runs(procs, socket_folder):
    path = os.path.join(socket_folder, "events.sock")
    agent = start_agent(procs, path)  # ships nowhere: only its counters matter here
    # User 0 floods steps from four processes at once (four pids, four sockets), as fast as the agent takes them,
    # until killed below: a count they could finish let a fast machine end the flood before the other user sent.
    t0 = time.monotonic()
    flooders = [subprocess.Popen([sys.executable, "-c", SENDER, path, "1000000000", "0", "step"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(4)]
    try:
        wait_until(lambda: agent_metrics(agent)[LIMITED] > 0, timeout=60, what="user 0 held to its rate")
        # While the flood goes on, user 65534 sends 2,000 requests: a bucket of its own (burst 10,000) takes them
        # all. Had it shared user 0's empty one, about 5,000 a second of refill would be split among them all.
        assert run_python(SENDER, path, "2000", "65534", "request") == ["65534", "2000"]
        wait_until(lambda: agent_metrics(agent)['fleetscope_agent_events_verified_total{kind="request"}'] == 2000,
                   timeout=30, what="user 65534's 2,000 requests accepted")
        overlapped = all(f.poll() is None for f in flooders)
    finally:
        for f in flooders:
            f.kill()
            f.wait()
    elapsed = time.monotonic() - t0
    assert overlapped, "the flood ended before the other user had sent: nothing was shown"
    time.sleep(0.5)
    m = agent_metrics(agent)
    accepted, limited = m[VERIFIED], m[LIMITED]
    # One bucket for the four processes: its burst (10,000) and 5,000 a second. Four buckets would take four times.
    assert accepted <= 1.3 * (10_000 + 5_000 * elapsed), f"user 0 got {accepted:.0f} steps in {elapsed:.1f} s"
    assert limited > accepted
    print(f"\nuser 0, four processes flooding for {elapsed:.1f} s: {accepted:.0f} steps accepted, {limited:.0f} "
          f"rate-limited; user 65534 meanwhile: 2,000 of 2,000 requests accepted")
    assert "Traceback" not in agent.output()
