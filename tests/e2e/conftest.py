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
def collector(procs, tmp_path):
    port = free_port()
    proc = procs("collector", [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                               "--data-dir", str(tmp_path / "collector")],
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
