"""`fleetscope demo` (what `make demo` runs) starts the whole platform, feeds it, and stops it all."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from fleetscope.demo import ALERTMANAGER_PORT, COLLECTOR_PORT, CONSOLE_PORT, PROMETHEUS_PORT, agent_ports, port_free
from tests.conftest import http_get, wait_until


def https_get(url: str, token: str, ca_file) -> tuple[int, bytes]:
    """GET over HTTPS, the server's certificate verified against `ca_file` (and its name, 127.0.0.1)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ssl.create_default_context(cafile=str(ca_file))) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def holders(ports: list[int]) -> list[str]:
    """Who holds these ports, to say so when a test cannot start."""
    import psutil

    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.laddr and conn.laddr.port in ports and conn.status == psutil.CONN_LISTEN:
            try:
                out.append(f"{conn.laddr.port}: {' '.join(psutil.Process(conn.pid).cmdline()[:6])}")
            except (psutil.Error, TypeError):
                out.append(f"{conn.laddr.port}: pid {conn.pid}")
    return out


def test_demo_runs_every_part_and_stops_them(tmp_path):
    pytest.importorskip("cryptography", reason="the demo serves HTTPS only with the cryptography package (the demo extra)")
    ports = [COLLECTOR_PORT, CONSOLE_PORT, *agent_ports(0), *agent_ports(1)]
    with_prometheus = bool(shutil.which("prometheus"))
    if with_prometheus:
        ports += [PROMETHEUS_PORT, ALERTMANAGER_PORT]
    busy = [p for p in ports if not port_free(p)]
    assert not busy, f"the demo's ports must be free for this test; busy: {busy} ({holders(busy)})"

    out = (tmp_path / "demo.out").open("w+")
    demo = subprocess.Popen(
        [sys.executable, "-m", "fleetscope", "demo", "--duration", "30", "--nodes", "2", "--gpus", "4",
         "--workdir", str(tmp_path / "demo")],
        stdout=out, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def printed():
            out.flush()
            return (tmp_path / "demo.out").read_text()

        token = wait_until(lambda: re.search(r"read token: (\S+)\)", printed()), timeout=60, what="the demo's URLs").group(1)
        text = printed()
        assert f"http://127.0.0.1:{CONSOLE_PORT}" in text and f"127.0.0.1:{agent_ports(1)[0]}/metrics" in text
        ca_file = tmp_path / "demo" / "tls" / "fleetscope-demo-CA.crt"
        assert f"https://127.0.0.1:{COLLECTOR_PORT}/docs" in text and str(ca_file) in text

        base = f"https://127.0.0.1:{COLLECTOR_PORT}"

        def get(path):
            status, body = https_get(base + path, token, ca_file)
            return json.loads(body) if status == 200 else None

        # HTTPS only, with a certificate that the demo's CA signed and no other trusts
        assert https_get(base + "/healthz", token, ca_file)[0] == 200
        try:
            status = http_get(f"http://127.0.0.1:{COLLECTOR_PORT}/healthz", token)[0]
        except (OSError, http.client.HTTPException) as exc:  # the TLS server's alert is no HTTP status line
            status = exc
        assert not isinstance(status, int), f"the collector answered plain HTTP with {status}"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(base + "/healthz", timeout=5, context=ssl.create_default_context())
        for key in (tmp_path / "demo" / "tls").glob("*.key"):
            assert key.stat().st_mode & 0o077 == 0, f"{key} is readable by others"

        # Ten steps of each rank at least: a rank's first step waits at the barrier for ranks still starting, and on
        # a loaded machine the median of two or three steps is that start-up (CI: 0.58 s against 0.48 s).
        job = wait_until(lambda: (j := get("/v1/jobs/demo-llama-8b")) and j["job"]["ranks"] == 8
                         and min(r["steps"] for r in j["ranks"]) >= 10 and j, timeout=90,
                         what="all 8 ranks of the demo job, ten steps each")
        assert sorted(job["job"]["nodes"]) == ["node-00", "node-01"]
        # synchronous ranks: every rank's median step is close to the job's
        p50s = [r["step_time_p50_s"] for r in job["ranks"]]
        assert max(p50s) / min(p50s) < 1.2
        service = wait_until(lambda: get("/v1/services/chat"), timeout=30, what="the inference service")
        assert service["models"][0]["requests"] > 0
        nodes = wait_until(lambda: (n := get("/v1/nodes")) and len(n["nodes"]) == 2 and n, timeout=30, what="both nodes")
        assert all(n["gpu_count"] == 4 for n in nodes["nodes"])

        assert wait_until(lambda: http_get(f"http://127.0.0.1:{CONSOLE_PORT}/_stcore/health")[0] == 200,
                          timeout=60, what="the console")
        if with_prometheus:
            def targets_up():
                status, body = http_get(f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?query=up")
                result = json.loads(body)["data"]["result"] if status == 200 else []
                return len(result) == 3 and all(r["value"][1] == "1" for r in result)

            wait_until(targets_up, timeout=60, what="Prometheus scraping both agents and the collector")
            status, body = http_get(f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/targets")
            urls = {t["labels"]["job"]: t["scrapeUrl"] for t in json.loads(body)["data"]["activeTargets"]}
            assert urls["fleetscope-collector"].startswith("https://"), urls
            status, body = http_get(f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/rules")
            assert {g["name"] for g in json.loads(body)["data"]["groups"]} >= {"fleetscope-agent", "fleetscope-gpu"}
    finally:
        code = demo.wait(timeout=120)
        log = (tmp_path / "demo.out").read_text()
    assert code == 0, log
    assert "exited with code" not in log, log  # no part died during the run
    time.sleep(1)
    assert all(port_free(p) for p in ports), "the demo left a process behind"


def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path):
    import signal

    import psutil

    out = (tmp_path / "demo.out").open("w+")
    demo = subprocess.Popen([sys.executable, "-m", "fleetscope", "demo", "--nodes", "1", "--gpus", "2", "--no-console",
                             "--no-prometheus", "--workdir", str(tmp_path / "demo")], stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "Ctrl-C stops everything" in (tmp_path / "demo.out").read_text(), timeout=60, what="the demo to start")
    children = psutil.Process(demo.pid).children(recursive=True)
    assert len(children) >= 4  # collector, agent, training launcher (and its ranks), inference
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
