"""Real processes on loopback: the collector, agents, Prometheus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, http_get, stop_process, wait_until

INGEST, READ = "e2e-ingest", "e2e-read"


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self.fh = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig)
        self.fh.close()
        return code


@pytest.fixture
def procs(tmp_path):
    started: list[Proc] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, argv, tmp_path / f"{name}.log", env)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop()


@pytest.fixture
def collector_flags() -> list[str]:
    """Extra flags for the `collector` fixture's collector; a module overrides this fixture to set some."""
    return []


@pytest.fixture
def collector(procs, tmp_path, collector_flags):
    port = free_port()
    proc = procs("collector", [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                               "--data-dir", str(tmp_path / "collector"), *collector_flags],
                 {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_get(url + "/healthz")[0] == 200, what="the collector", timeout=30)
    proc.url = url
    proc.port = port
    return proc


def api(collector, path: str) -> dict:
    status, body = http_get(collector.url + path, READ)
    assert status == 200, (path, status, body)
    return json.loads(body)


def gauge(metrics_url: str, name: str, token: str | None = None) -> float | None:
    """The value of the unlabelled series `name` on an agent's or collector's /metrics (None when absent or not
    answering); `token`: the collector's read token."""
    status, body = http_get(metrics_url, token)
    values = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines() if line.startswith(name + " ")]
    return values[0] if status == 200 and values else None


def wait_until_agent_holds_nothing(metrics_url: str, timeout: float = 60.0) -> None:
    """Until the agent holds no event it has not had acknowledged, in memory or in its spool (an in-flight batch
    stays held until acknowledged). A duplicate can only come from a batch held and sent again: once none is
    held, every send has been answered, and none comes later (as long as nothing new is sent to the agent)."""
    wait_until(lambda: gauge(metrics_url, "fleetscope_agent_shipper_queue_events") == 0
               and gauge(metrics_url, "fleetscope_agent_shipper_spool_events") == 0,
               timeout=timeout, what="the agent to hold no unacknowledged event")
