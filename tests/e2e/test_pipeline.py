"""End to end: workload client → real agent → real collector → API, and real Prometheus scraping the agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse

import fleetscope
from fleetscope.client import Emitter
from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.e2e.conftest import INGEST, gauge, api, wait_until_agent_holds_nothing


def start_agent(procs, collector_url: str | None, spool_dir, node: str = "e2e-node", gpus: int = 4):
    metrics_port, events_port = free_port(), free_port(__import__("socket").SOCK_DGRAM)
    argv = [sys.executable, "-m", "fleetscope", "agent", "--node", node, "--gpu-backend", "simulated", "--gpus", str(gpus),
            "--interval", "0.5", "--metrics-address", f"127.0.0.1:{metrics_port}", "--events-address", f"127.0.0.1:{events_port}",
            "--spool-dir", str(spool_dir)]
    if collector_url:
        argv += ["--collector-url", collector_url]
    proc = procs(f"agent-{node}", argv, {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    proc.events = ("127.0.0.1", events_port)
    wait_until(lambda: http_get(proc.metrics_url)[0] == 200, what="the agent's /metrics", timeout=30)
    return proc


def send_workload(events_addr, steps: int, ranks: int, requests: int) -> None:
    emitter = Emitter(events_addr)
    runs = [fleetscope.training(job="e2e-job", rank=r, world_size=ranks, local_rank=r, emitter=emitter) for r in range(ranks)]
    for _ in range(steps):
        for run in runs:
            with run.step(tokens=1024):
                with run.phase("forward"):
                    time.sleep(0.001)
    svc = fleetscope.inference(service="e2e-chat", model="tiny", emitter=emitter)
    for _ in range(requests):
        with svc.request(input_tokens=8) as r:
            time.sleep(0.002)
            r.first_token()
            time.sleep(0.003)
            r.finish(output_tokens=4)
    assert emitter.dropped == 0


def test_events_flow_from_client_through_agent_to_collector_and_prometheus_scrapes_the_agent(procs, collector, tmp_path):
    agent = start_agent(procs, collector.url, tmp_path / "spool")
    send_workload(agent.events, steps=25, ranks=4, requests=30)

    def job_complete():
        ranks = api(collector, "/v1/jobs/e2e-job")["ranks"] if api(collector, "/v1/jobs")["jobs"] else []
        return ranks if sum(r["steps"] for r in ranks) == 100 else None

    ranks = wait_until(job_complete, timeout=30, what="all 100 steps at the collector")
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["node"] == "e2e-node" for r in ranks)
    # the agent attributed each rank to the simulated GPU of its local rank
    gpus = api(collector, "/v1/nodes/e2e-node")["gpus"]
    assert [r["gpu_uuid"] for r in ranks] == [g["uuid"] for g in gpus[:4]]
    assert all(0.001 <= r["step_time_p50_s"] < 1 for r in ranks)

    service = wait_until(lambda: api(collector, "/v1/services/e2e-chat") if api(collector, "/v1/services")["services"] else None,
                         timeout=15, what="the service")
    (model,) = service["models"]
    assert model["requests"] == 30 and model["ttft_p50_s"] >= 0.002 and model["e2e_p50_s"] >= 0.005
    node = api(collector, "/v1/nodes")["nodes"][0]
    assert node["node"] == "e2e-node" and node["gpu_count"] == 4

    # The agent's own endpoint passes promtool and counts what it shipped.
    promtool = require_binary("promtool")
    status, text = http_get(agent.metrics_url)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert b'fleetscope_agent_events_received_total{kind="step"} 100.0' in text

    # A real Prometheus scrapes the real agent.
    prometheus = require_binary("prometheus")
    prom_port = free_port()
    target = agent.metrics_url.split("/")[2]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: fleetscope-agent\n    sample_limit: 20000\n    static_configs:\n      - targets: ['{target}']\n"
    )
    procs("prometheus", [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}"])

    def query(expr: str):
        status, body = http_get(f"http://127.0.0.1:{prom_port}/api/v1/query?query=" + urllib.parse.quote(expr))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return result

    up = wait_until(lambda: query('up{job="fleetscope-agent"}'), timeout=60, what="Prometheus to scrape the agent")
    assert up[0]["value"][1] == "1"
    present = wait_until(lambda: query("fleetscope_gpus_present"), timeout=30, what="GPU metrics in Prometheus")
    assert present[0]["value"][1] == "4"


def test_events_sent_while_the_collector_is_down_arrive_once_it_is_up(procs, tmp_path):
    from tests.e2e.conftest import READ

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    agent = start_agent(procs, url, tmp_path / "spool", node="patient")
    send_workload(agent.events, steps=10, ranks=2, requests=0)
    # the agent tries and fails to ship meanwhile
    wait_until(lambda: gauge(agent.metrics_url, "fleetscope_agent_shipper_send_failures_total"), timeout=30,
               what="the agent to fail to ship")
    assert agent.proc.poll() is None, "the agent must keep running without its collector"

    collector = procs("late-collector", [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                                         "--data-dir", str(tmp_path / "late")],
                      {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ})
    collector.url = url
    wait_until(lambda: http_get(url + "/healthz")[0] == 200, what="the collector", timeout=30)
    ranks = wait_until(lambda: api(collector, "/v1/jobs/e2e-job")["ranks"] if api(collector, "/v1/jobs")["jobs"] else None,
                       timeout=60, what="the queued steps")
    wait_until_agent_holds_nothing(agent.metrics_url)  # any duplicate would have arrived by now
    ranks = api(collector, "/v1/jobs/e2e-job")["ranks"]
    assert [r["steps"] for r in ranks] == [10, 10]
