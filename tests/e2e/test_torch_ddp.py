"""A real 4-rank PyTorch DDP job (gloo, CPU) reports every step of every rank through a real agent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, http_get, wait_until
from tests.e2e.conftest import INGEST, api

torch = pytest.importorskip("torch", reason="make test installs torch==2.13.0 (CPU)")

JOB_SCRIPT = Path(__file__).with_name("ddp_job.py")


STEPS = 36  # 10 of warm-up, then a full window of 16 judged, and some to spare


@pytest.fixture
def collector_flags() -> list[str]:
    """The collector analyses every second, not every 5 s: each straggler is named that much sooner."""
    return ["--analysis-interval", "1s"]


def torchrun(events_port: int, **env: str) -> None:
    """tests/e2e/ddp_job.py on 4 ranks (gloo, CPU), reporting to the agent at `events_port`."""
    master = str(free_port())
    env = {**os.environ, "STEPS": str(STEPS), "FLEETSCOPE_AGENT_ADDR": f"127.0.0.1:{events_port}", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master, **env}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
         "--master-addr", "127.0.0.1", "--master-port", master, str(JOB_SCRIPT)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_every_step_of_every_rank_arrives_and_the_straggler_arrives_late_at_the_all_reduce(procs, collector, tmp_path):
    metrics_port, events_port = free_port(), free_port(socket.SOCK_DGRAM)
    procs("agent", [sys.executable, "-m", "fleetscope", "agent", "--node", "ddp-node", "--gpu-backend", "none",
                    "--interval", "0.5", "--metrics-address", f"127.0.0.1:{metrics_port}",
                    "--events-address", f"127.0.0.1:{events_port}", "--collector-url", collector.url,
                    "--spool-dir", str(tmp_path / "spool")], {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    wait_until(lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 200, what="the agent")

    torchrun(events_port, JOB="ddp-e2e", SLOW_RANK="2")

    def complete():
        ranks = api(collector, "/v1/jobs/ddp-e2e")["ranks"]
        return ranks if len(ranks) == 4 and all(r["steps"] == STEPS for r in ranks) else None

    ranks = wait_until(complete, timeout=30, what=f"{STEPS} steps from each of the 4 ranks")
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and all(r["node"] == "ddp-node" for r in ranks)
    # Whole steps take about as long on every rank (they wait for each other) ...
    p50 = [r["step_time_p50_s"] for r in ranks]
    assert max(p50) < 2 * min(p50)
    # ... but the slow rank reaches the all-reduce last and waits the least there.
    arrival = {r["rank"]: r["metric_sync_arrival_s_mean"] for r in ranks}
    comm = {r["rank"]: r["phase_comm_mean_s"] for r in ranks}
    assert max(arrival, key=arrival.get) == 2, arrival
    assert min(comm, key=comm.get) == 2, comm
    # The collector's own analysis names that rank as the straggler (it runs every second here).
    def straggler():
        found = api(collector, "/v1/findings?kind=straggler&job=ddp-e2e")["findings"]
        return found if found else None

    (finding,) = wait_until(straggler, timeout=30, what="the collector to name the straggler")
    assert finding["subject"]["rank"] == 2 and finding["subject"]["node"] == "ddp-node"
    assert finding["evidence"]["straggler_score"] > 0.5  # 100 ms on top of a few ms of compute

    # Instrumented only the README's way (data, forward, backward, optimizer; no comm, no instrument_ddp), a
    # rank whose forward pass takes a tenth of a step longer from step 12 on is found all the same.
    torchrun(events_port, JOB="ddp-readme", SLOW_RANK="1", SLOW_MODE="forward10", SLOW_AFTER="12", INSTRUMENT_DDP="0",
             DEVICE_S="0.05")

    def readme_straggler():
        found = api(collector, "/v1/findings?kind=straggler&job=ddp-readme")["findings"]
        return found if found else None

    (finding,) = wait_until(readme_straggler, timeout=30, what="the collector to name the README-way job's straggler")
    assert finding["subject"]["rank"] == 1 and 0.04 <= finding["evidence"]["straggler_score"] < 0.3
    ranks = api(collector, "/v1/jobs/ddp-readme")["ranks"]
    assert all("metric_sync_arrival_s_mean" not in r and "phase_comm_mean_s" not in r for r in ranks)
