"""A small real fleet for the dashboard tests: a collector, two agents, a training job, an inference service
through the real client and one read only from its server's /metrics (a vLLM exposition that grows), scraped
by a real Prometheus; and the check that every Grafana panel's
query returns a series from a store's query API."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import yaml

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
# What the dashboards' variables stand for when a panel is run outside Grafana ("All" for the selectors).
ALL = {"$instance": ".*", "$gpu": ".*", "$training_job": ".*", "$service": ".*", "$cluster": ".*"}


def start_fleet(procs, tmp_path: Path, *, cluster: str | None = None, remote_write: str | None = None) -> str:
    """Start the fleet and its Prometheus; return Prometheus' base URL. A `cluster` names the cluster as
    docs/multi-cluster.md does: in the collector's config and in Prometheus' external_labels."""
    prometheus = require_binary("prometheus")
    (tmp_path / "collector.toml").write_text((f'[collector]\ncluster = "{cluster}"\n\n' if cluster else "") + SLO)
    c_port = free_port()
    env = {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ}
    procs("collector", [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{c_port}",
                        "--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "collector.toml")], env)
    collector = f"http://127.0.0.1:{c_port}"
    wait_until(lambda: http_get(collector + "/healthz")[0] == 200, what="the collector")
    (tmp_path / "faults.toml").write_text(SCENARIO)
    server_port = free_port()
    procs("vllm", [sys.executable, "-m", "tests.e2e.fake_inference_server", "--port", str(server_port)])
    agent_toml = tmp_path / "agent0.toml"  # node-0's agent reads the server: the inference panels' per-replica row
    agent_toml.write_text(f'[agent]\n[[agent.inference_servers]]\nurl = "http://127.0.0.1:{server_port}/metrics"\n'
                          'kind = "vllm"\nservice = "scraped"\n')
    agent_toml.chmod(0o600)
    agents = []
    for i in range(2):
        m_port, e_port = free_port(), free_port(socket.SOCK_DGRAM)
        procs(f"agent{i}", [sys.executable, "-m", "fleetscope", "agent", "--node", f"node-{i}", "--gpu-backend", "simulated",
                            "--gpus", "4", "--seed", str(i), "--interval", "1", "--metrics-address", f"127.0.0.1:{m_port}",
                            "--events-address", f"127.0.0.1:{e_port}", "--collector-url", collector,
                            "--spool-dir", str(tmp_path / f"spool{i}"), "--scenario", str(tmp_path / "faults.toml"),
                            *(["--config", str(agent_toml)] if i == 0 else [])], env)
        agents.append((m_port, e_port))
    for m_port, _ in agents:
        wait_until(lambda: http_get(f"http://127.0.0.1:{m_port}/metrics")[0] == 200, what="an agent")
    # Short steps, rank 5 slower: a straggler. The step-time baseline panel needs 600 steps (collector/training.py's
    # REGRESSION_* windows), the last panel to have data: 20 ms steps get there in about half the time 40 ms ones
    # took, and 1,400 of them keep the job running (its series fresh) for as long as 700 did.
    procs("training", [sys.executable, "-m", "fleetscope.sim.training", "--job", "panels", "--gpus-per-node", "4",
                       "--agents", ",".join(f"127.0.0.1:{e}" for _, e in agents), "--step-time", "0.02",
                       "--steps", "1400", "--slow-rank", "5", "--slow-factor", "0.5"])
    procs("inference", [sys.executable, "-m", "fleetscope.sim.inference", "--service", "chat", "--model", "tiny",
                        "--agent", f"127.0.0.1:{agents[0][1]}", "--rps", "20", "--tpot", "0.002", "--error-rate", "0.05"])

    config: dict = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(ROOT / "alerts" / "fleetscope.rules.yml")],
        "scrape_configs": [
            {"job_name": "fleetscope-agent", "sample_limit": 20000, "static_configs": [{"targets": [f"127.0.0.1:{m}" for m, _ in agents]}]},
            {"job_name": "fleetscope-collector", "sample_limit": 20000, "authorization": {"credentials": READ},
             "static_configs": [{"targets": [f"127.0.0.1:{c_port}"]}]},
        ],
    }
    if cluster:
        config["global"]["external_labels"] = {"cluster": cluster}
    if remote_write:  # send within a second rather than the default 5 s batch deadline
        config["remote_write"] = [{"url": remote_write, "queue_config": {"batch_send_deadline": "1s"}}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    p_port = free_port()
    procs("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{p_port}"])
    return f"http://127.0.0.1:{p_port}"


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) of every panel of the committed dashboards."""
    queries = [(path.stem, title, expr) for path in sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
               for title, expr in panel_queries(path.read_text())]
    assert len(queries) >= 30
    return queries


def instant_query(base_url: str, expr: str) -> list:
    """The result of a PromQL instant query at `base_url`/api/v1/query; [] while the server is not up."""
    try:
        status, body = http_get(f"{base_url}/api/v1/query?query=" + urllib.parse.quote(expr))
    except OSError:
        return []
    return json.loads(body)["data"]["result"] if status == 200 else []


def assert_every_panel_returns_data(base_url: str, variables: dict[str, str], timeout: float = 150) -> None:
    """Poll until every panel's query, with `variables` substituted, returns a series at `base_url`."""
    queries = []
    for dashboard, title, expr in dashboard_queries():
        for name, value in variables.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{dashboard} / {title}: a variable the test does not set: {expr}"
        queries.append((dashboard, title, expr))
    deadline = time.monotonic() + timeout
    empty = []
    while time.monotonic() < deadline:
        empty = [(d, t) for d, t, e in queries if not instant_query(base_url, e)]
        if not empty:
            return
        time.sleep(1)  # a pass of every query takes a few hundredths of a second
    raise AssertionError(f"panels with no data from {base_url}: {empty}")
