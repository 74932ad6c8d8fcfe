"""Every Grafana panel's query returns data from a real Prometheus scraping a real agent and collector,
fed by a training job (with a slow rank) and an inference service through the real client."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.parse
from pathlib import Path

from dashboards.grafana.build import panel_queries
from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.e2e.conftest import INGEST, READ

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = """
[[fault]]   # a narrow PCIe link: one degraded GPU, so the "not healthy" table has a row
at_s = 0
gpu = 1
kind = "pcie_degraded"

[[fault]]   # a power cap: a clock event holding clocks down
at_s = 0
gpu = 2
kind = "power_cap"
power_limit_watts = 200
"""
SLO = """
[[slo]]
name = "chat-ttft"
service = "chat"
indicator = "ttft"
threshold_s = 0.05
objective = 0.99
"""
VARIABLES = {"$instance": ".*", "$gpu": ".*", "$training_job": ".*", "$service": ".*"}


def test_every_panel_query_returns_a_series(procs, tmp_path):
    prometheus = require_binary("prometheus")
    (tmp_path / "collector.toml").write_text(SLO)
    c_port = free_port()
    env = {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ}
    procs("collector", [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{c_port}",
                        "--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "collector.toml")], env)
    collector = f"http://127.0.0.1:{c_port}"
    wait_until(lambda: http_get(collector + "/healthz")[0] == 200, what="the collector")
    (tmp_path / "faults.toml").write_text(SCENARIO)
    agents = []
    for i in range(2):
        m_port, e_port = free_port(), free_port(socket.SOCK_DGRAM)
        procs(f"agent{i}", [sys.executable, "-m", "fleetscope", "agent", "--node", f"node-{i}", "--gpu-backend", "simulated",
                            "--gpus", "4", "--seed", str(i), "--interval", "1", "--metrics-address", f"127.0.0.1:{m_port}",
                            "--events-address", f"127.0.0.1:{e_port}", "--collector-url", collector,
                            "--spool-dir", str(tmp_path / f"spool{i}"), "--scenario", str(tmp_path / "faults.toml")], env)
        agents.append((m_port, e_port))
    for m_port, _ in agents:
        wait_until(lambda: http_get(f"http://127.0.0.1:{m_port}/metrics")[0] == 200, what="an agent")
    # 700 short steps (enough for the step-time baseline), rank 5 slower: a straggler
    procs("training", [sys.executable, "-m", "fleetscope.sim.training", "--job", "panels", "--gpus-per-node", "4",
                       "--agents", ",".join(f"127.0.0.1:{e}" for _, e in agents), "--step-time", "0.04",
                       "--steps", "700", "--slow-rank", "5", "--slow-factor", "0.5"])
    procs("inference", [sys.executable, "-m", "fleetscope.sim.inference", "--service", "chat", "--model", "tiny",
                        "--agent", f"127.0.0.1:{agents[0][1]}", "--rps", "20", "--tpot", "0.002", "--error-rate", "0.05"])

    p_port = free_port()
    targets = ", ".join(f"'127.0.0.1:{m}'" for m, _ in agents)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        f"rule_files: ['{ROOT / 'alerts' / 'fleetscope.rules.yml'}']\n"
        f"scrape_configs:\n  - job_name: fleetscope-agent\n    static_configs: [{{targets: [{targets}]}}]\n"
        f"  - job_name: fleetscope-collector\n    authorization: {{credentials: '{READ}'}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{c_port}']}}]\n")
    procs("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{p_port}"])

    queries = [(path.stem, title, expr) for path in sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
               for title, expr in panel_queries(path.read_text())]
    assert len(queries) >= 30

    def series(expr: str) -> list:
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        try:
            status, body = http_get(f"http://127.0.0.1:{p_port}/api/v1/query?query=" + urllib.parse.quote(expr))
        except OSError:  # Prometheus is still starting
            return []
        return json.loads(body)["data"]["result"] if status == 200 else []

    deadline = time.monotonic() + 150
    empty = []
    while time.monotonic() < deadline:
        empty = [(d, t) for d, t, e in queries if not series(e)]
        if not empty:
            break
        time.sleep(5)
    assert not empty, f"panels with no data: {empty}"
