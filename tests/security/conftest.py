"""Attacks against real processes: the e2e fixtures, and a collector started with a config file."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port, http_get, wait_until
from tests.e2e.conftest import INGEST, READ, collector, collector_flags, procs  # noqa: F401 - fixtures for these tests

__all__ = ["INGEST", "READ", "agent_metrics", "collector", "collector_flags", "procs", "collector_with"]


@pytest.fixture
def collector_with(procs, tmp_path):  # noqa: F811
    """Start a real collector with `config` (the text of its TOML config file), at its defaults otherwise."""

    def start(config: str, name: str = "collector"):
        port = free_port()
        path = tmp_path / f"{name}.toml"
        path.write_text(config)
        proc = procs(name, [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                            "--data-dir", str(tmp_path / name), "--config", str(path)],
                     {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ})
        proc.url = f"http://127.0.0.1:{port}"
        proc.port = port
        wait_until(lambda: http_get(proc.url + "/healthz")[0] == 200, what=name, timeout=30)
        return proc

    return start


def agent_metrics(agent) -> dict[str, float]:
    """An agent's /metrics (`agent.metrics_url`) as {series: value}."""
    status, body = http_get(agent.metrics_url, timeout=10)
    assert status == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
            if line and not line.startswith("#")}
