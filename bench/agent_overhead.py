"""Agent overhead against node_exporter, measured in the same run on the same machine.

Both are scraped once a second for DURATION seconds (the agent also samples once a second);
we report CPU seconds used per minute, resident memory at the end, scrape latency and series.
node_exporter is Debian's `prometheus-node-exporter`; without it, only the agent's figures print.

    python -m bench.agent_overhead [--duration 30]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, argv: list[str], url: str, duration: float) -> dict:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.2)
        time.sleep(2)  # past start-up costs (imports, first sample)
        ps = psutil.Process(proc.pid)
        cpu0 = sum(ps.cpu_times()[:2])
        t0 = time.monotonic()
        latencies, series = [], 0
        while time.monotonic() - t0 < duration:
            s = time.perf_counter()
            body = urllib.request.urlopen(url, timeout=5).read()
            latencies.append(time.perf_counter() - s)
            series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - s)))
        elapsed = time.monotonic() - t0
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        rss = ps.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {
        "name": name,
        "cpu_s_per_min": cpu / elapsed * 60,
        "rss_mib": rss / 2**20,
        "scrape_p50_ms": statistics.median(latencies) * 1000,
        "series": series,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0)
    args = p.parse_args(argv)
    rows = []
    for label, backend in (("fleetscope agent (no GPU)", "none"), ("fleetscope agent (8 simulated GPUs)", "simulated")):
        port = free_port()
        rows.append(measure(label, [sys.executable, "-m", "fleetscope", "agent", "--gpu-backend", backend, "--gpus", "8",
                                    "--interval", "1", "--metrics-address", f"127.0.0.1:{port}",
                                    "--events-address", f"127.0.0.1:{free_port()}"],
                            f"http://127.0.0.1:{port}/metrics", args.duration))
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter:
        port = free_port()
        rows.append(measure("node_exporter (defaults)", [exporter, f"--web.listen-address=127.0.0.1:{port}"],
                            f"http://127.0.0.1:{port}/metrics", args.duration))
    print(f"{'':38} {'CPU s/min':>10} {'RSS MiB':>8} {'scrape p50 ms':>14} {'series':>7}")
    for r in rows:
        print(f"{r['name']:38} {r['cpu_s_per_min']:10.3f} {r['rss_mib']:8.1f} {r['scrape_p50_ms']:14.2f} {r['series']:7d}")
    if exporter:
        ne = rows[-1]
        for r in rows[:-1]:
            print(f"{r['name']} / node_exporter: CPU x{r['cpu_s_per_min'] / ne['cpu_s_per_min']:.2f}, "
                  f"RSS x{r['rss_mib'] / ne['rss_mib']:.2f}, scrape latency x{r['scrape_p50_ms'] / ne['scrape_p50_ms']:.2f}")
    else:
        print("node_exporter is not installed (apt-get install prometheus-node-exporter) - no ratio this run")


if __name__ == "__main__":
    main()
