"""Agent overhead against node_exporter, measured in the same run on the same machine.

Figures per process, each from its own CPU-time counters (psutil):
- CPU per second at rest: nothing scrapes it for DURATION seconds (for the agent: its 1-second
  sampler over every source, 8 simulated GPUs, the listener and shipper threads idling);
- CPU per scrape: one scrape a second for DURATION seconds, less the CPU at rest, per scrape
  (every scrape sees a new snapshot, as in production), and 200 back-to-back scrapes (the
  agent serves those from its cached rendering; node_exporter collects again each time);
- resident memory, exposition size and series count.
node_exporter is Debian's `prometheus-node-exporter` with its defaults; without it only the
agent's figures print. Goals (issue #3): CPU per scrape no more than node_exporter's, resident
memory under 60 MB, the 1-second sampler under 1% of one core.

    python -m bench.agent_overhead [--duration 30] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import psutil


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def measure(name: str, argv: list[str], url: str, duration: float, scrapes: int) -> dict:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.2)
        time.sleep(3)  # past start-up costs (imports, first samples)
        ps = psutil.Process(proc.pid)

        c0, t0 = cpu(ps), time.monotonic()
        time.sleep(duration)
        rest = (cpu(ps) - c0) / (time.monotonic() - t0)

        # One scrape a second, as many samples: every scrape sees a new snapshot (the agent renders it).
        c0, t0, n = cpu(ps), time.monotonic(), 0
        while time.monotonic() - t0 < duration:
            s = time.monotonic()
            urllib.request.urlopen(url, timeout=5).read()
            n += 1
            time.sleep(max(0.0, 1.0 - (time.monotonic() - s)))
        fresh = ((cpu(ps) - c0) - rest * (time.monotonic() - t0)) / n

        body = b""
        c0 = cpu(ps)
        for _ in range(scrapes):
            body = urllib.request.urlopen(url, timeout=5).read()
        per_scrape = (cpu(ps) - c0) / scrapes
        rss = ps.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {
        "name": name,
        "scrape_ms": per_scrape * 1000,
        "fresh_ms": fresh * 1000,
        "rest_pct": rest * 100,
        "rss_mib": rss / 2**20,
        "kib": len(body) / 1024,
        "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0, help="seconds at rest")
    p.add_argument("--scrapes", type=int, default=200)
    args = p.parse_args(argv)
    rows = []
    for label, backend in (("fleetscope agent, no GPU", "none"), ("fleetscope agent, 8 simulated GPUs", "simulated")):
        port = free_port()
        rows.append(measure(label, [sys.executable, "-m", "fleetscope", "agent", "--gpu-backend", backend, "--gpus", "8",
                                    "--interval", "1", "--metrics-address", f"127.0.0.1:{port}",
                                    "--events-address", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"],
                            f"http://127.0.0.1:{port}/metrics", args.duration, args.scrapes))
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter:
        port = free_port()
        rows.append(measure("node_exporter, defaults", [exporter, f"--web.listen-address=127.0.0.1:{port}"],
                            f"http://127.0.0.1:{port}/metrics", args.duration, args.scrapes))
    print(f"{'':36} {'CPU/scrape ms':>13} {'(back-to-back)':>14} {'CPU at rest %':>13} {'RSS MiB':>8} {'KiB':>7} {'series':>7}")
    for r in rows:
        print(f"{r['name']:36} {r['fresh_ms']:13.2f} {r['scrape_ms']:14.2f} {r['rest_pct']:13.3f} {r['rss_mib']:8.1f} "
              f"{r['kib']:7.1f} {r['series']:7d}")
    if exporter:
        ne = rows[-1]
        for r in rows[:-1]:
            print(f"{r['name']} / node_exporter: CPU per scrape x{r['fresh_ms'] / ne['fresh_ms']:.2f} "
                  f"(back-to-back x{r['scrape_ms'] / ne['scrape_ms']:.2f}), "
                  f"RSS x{r['rss_mib'] / ne['rss_mib']:.2f}, series x{r['series'] / ne['series']:.2f}")
    else:
        print("node_exporter is not installed (apt-get install prometheus-node-exporter): no ratio this run")


if __name__ == "__main__":
    main()
