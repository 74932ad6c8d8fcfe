"""Alerts end to end: real Prometheus scrapes a real agent whose simulated GPUs play a fault scenario;
real Alertmanager routes to a webhook receiver in this test. Right alert, labels and receiver; an
inhibited alert does not arrive; a silence stops one; the time from fault to notification is reported."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import fleetscope
from alerts.render_alertmanager import render
from fleetscope.client import Emitter
from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.e2e.conftest import INGEST, READ

ALERTS = Path(__file__).resolve().parents[2] / "alerts"
# Prometheus must have scraped the XID counters at 0 before an XID happens: increase() cannot see a
# counter's first step if its first sample is already 1. The agent starts after Prometheus, and the fault
# comes after a few scrapes.
FAULT_AT_S = 12
SCENARIO = f"""
[[fault]]
at_s = {FAULT_AT_S}
gpu = 1
kind = "xid"
xid = 79          # GPU 1 falls off the bus: FleetscopeGpuLost pages; its XID 79 alert is inhibited by it

[[fault]]
at_s = {FAULT_AT_S}
gpu = 2
kind = "xid"
xid = 13          # an application error: a ticket ... silenced in this test

[[fault]]
at_s = {FAULT_AT_S}
gpu = 3
kind = "xid"
xid = 31          # ... and another one that is not silenced
"""


def quick_rules(tmp_path: Path) -> Path:
    """The project's rules with every `for` of 2 minutes or less cut to 10 s: routing, inhibition and silences
    are what this test is about (promtool's unit tests hold each rule's own timing). Those on the collector's
    findings are cut to 2 s: a finding is already held for its own time by the collector (a hang is 30 s of
    silence), and the hang's page is this test's last wait. Not below 10 s for the others. The rules on a scrape
    target being down keep a minute: Prometheus is ready before the agent starts, and an agent that starts slowly
    on a loaded machine must not page as down (nothing in this test should). Longer ones are kept: they would not
    fire within this test either way."""
    groups = yaml.safe_load((ALERTS / "fleetscope.rules.yml").read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            duration = rule.get("for", "0s")
            seconds = int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]
            if 0 < seconds <= 120:
                rule["for"] = ("2s" if "fleetscope_finding_active" in rule["expr"]
                               else "60s" if rule["expr"].lstrip().startswith("up{") else "10s")
    path = tmp_path / "fleetscope.rules.yml"
    path.write_text(yaml.safe_dump(groups))
    return path


@pytest.fixture
def collector_flags() -> list[str]:
    """The collector analyses every second, not every 5 s: the hang is found (and paged for) that much sooner."""
    return ["--analysis-interval", "1s"]


class Receiver:
    def __init__(self) -> None:
        self.received: list[tuple[str, float, dict]] = []  # (receiver path, arrival time, alert)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                for alert in body["alerts"]:
                    if alert["status"] == "firing":
                        outer.received.append((self.path, time.time(), alert))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def names(self, path: str) -> list[str]:
        return [a["labels"]["alertname"] for p, _, a in self.received if p == path]


def test_a_gpu_off_the_bus_pages_once_and_tickets_are_routed_and_silenced(procs, collector, tmp_path):
    prometheus = require_binary("prometheus")
    alertmanager = require_binary("prometheus-alertmanager", "alertmanager")
    receiver = Receiver()

    am_port = free_port()
    (tmp_path / "alertmanager.yml").write_text(render({"FLEETSCOPE_PAGE_WEBHOOK_URL": receiver.url + "/page",
                                                       "FLEETSCOPE_TICKET_WEBHOOK_URL": receiver.url + "/ticket"}))
    procs("alertmanager", [alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
                           f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="])
    am = f"http://127.0.0.1:{am_port}"
    wait_until(lambda: http_get(am + "/-/ready")[0] == 200, what="Alertmanager", timeout=30)
    # Silence the XID 13 ticket of GPU 2 before anything fires.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    silence = {"matchers": [{"name": "alertname", "value": "FleetscopeGpuXid", "isRegex": False},
                            {"name": "gpu", "value": "2", "isRegex": False}],
               "startsAt": now, "endsAt": later, "createdBy": "test", "comment": "known application bug"}
    req = urllib.request.Request(am + "/api/v2/silences", data=json.dumps(silence).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    assert urllib.request.urlopen(req).status == 200

    metrics_port, events_port = free_port(), free_port(socket.SOCK_DGRAM)
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        f"rule_files: ['{quick_rules(tmp_path)}']\n"
        f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{am_port}']}}]}}]}}\n"
        f"scrape_configs:\n  - job_name: fleetscope-agent\n    sample_limit: 20000\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        f"  - job_name: fleetscope-collector\n    sample_limit: 20000\n    authorization: {{credentials: '{READ}'}}\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{collector.port}']\n")
    procs("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}"])
    wait_until(lambda: http_get(f"http://127.0.0.1:{prom_port}/-/ready")[0] == 200, what="Prometheus", timeout=60)

    scenario = tmp_path / "faults.toml"
    scenario.write_text(SCENARIO)
    agent_started = time.time()
    procs("agent", [sys.executable, "-m", "fleetscope", "agent", "--node", "alert-node", "--gpu-backend", "simulated",
                    "--gpus", "4", "--expected-gpus", "4", "--scenario", str(scenario), "--interval", "1",
                    "--metrics-address", f"127.0.0.1:{metrics_port}", "--events-address", f"127.0.0.1:{events_port}",
                    "--collector-url", collector.url, "--spool-dir", str(tmp_path / "spool")],
          {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    fault_ts = agent_started + FAULT_AT_S
    wait_until(lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 200, what="the agent")
    # A training job that stops without a word: the collector finds the hang, Prometheus pages for it.
    run = fleetscope.training(job="stuck", rank=0, world_size=1, emitter=Emitter(("127.0.0.1", events_port)))
    for _ in range(20):
        with run.step(tokens=1):
            time.sleep(0.05)

    page = wait_until(lambda: [r for r in receiver.received if r[0] == "/page"], timeout=120, what="a page")
    path, arrived, alert = page[0]
    assert alert["labels"]["alertname"] == "FleetscopeGpuLost"
    assert alert["labels"]["gpu"] == "1" and alert["labels"]["severity"] == "page"
    assert alert["annotations"]["runbook_url"] == "alerts/runbooks/FleetscopeGpuLost.md"
    print(f"\nfault to page: {arrived - fault_ts:.1f} s (2 s scrape and evaluation intervals)")

    wait_until(lambda: "FleetscopeGpuXid" in receiver.names("/ticket"), timeout=60, what="the unsilenced ticket")
    (ticket,) = [a for p, _, a in receiver.received if p == "/ticket"]
    assert ticket["labels"]["gpu"] == "3" and ticket["labels"]["xid"] == "31"

    # Alertmanager holds the XID 79 alert (inhibited by the GPU being lost) and the silenced ticket, and sent neither.
    def suppressed():
        status, body = http_get(am + "/api/v2/alerts")
        alerts = json.loads(body)
        by = {(a["labels"]["alertname"], a["labels"].get("gpu")): a["status"] for a in alerts}
        xid79, xid13 = by.get(("FleetscopeGpuXidCritical", "1")), by.get(("FleetscopeGpuXid", "2"))
        missing = by.get(("FleetscopeGpusMissing", None))
        return (xid79, xid13, missing) if xid79 and xid13 and missing else None

    # FleetscopeGpusMissing waits out its `for` (2 min, 10 s here) before Alertmanager sees it
    xid79, xid13, missing = wait_until(suppressed, timeout=180, what="the inhibited and silenced alerts in Alertmanager")
    assert xid79["state"] == "suppressed" and xid79["inhibitedBy"]
    assert missing["state"] == "suppressed" and missing["inhibitedBy"]
    assert xid13["state"] == "suppressed" and xid13["silencedBy"]
    time.sleep(12)  # longer than any group_wait: had they been sent, they would be here
    # The silent training job pages too, through the collector's finding.
    hang = wait_until(lambda: [a for p, _, a in receiver.received if a["labels"]["alertname"] == "FleetscopeTrainingHang"],
                      timeout=150, what="the hang page")
    assert hang[0]["labels"]["training_job"] == "stuck" and hang[0]["labels"]["severity"] == "page"
    assert sorted(receiver.names("/page")) == ["FleetscopeGpuLost", "FleetscopeTrainingHang"]
    assert receiver.names("/ticket") == ["FleetscopeGpuXid"]
