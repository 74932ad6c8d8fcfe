"""A datacenter's worth of data through one real collector: memory, ingest, reads, history, restart.

The fleet: 4,096 nodes x 8 GPUs sampled every 5 s, and a 16,384-rank job (8 ranks a node on the
first 2,048 nodes) stepping once a second. Time-compressed through 6 hours, over real HTTP from
sender processes, with the collector at its defaults (2 GiB memory budget, WAL fsync on):
- hours 0-5:50 (older than the raw tier ever holds): one frame per node per minute and one step
  per rank per minute. The collector's per-minute rollups and its hot tier come out the same as at
  5 s (a rollup row per GPU and minute either way); the warm tier's raw files hold 1/12 of the rows
  and the job's per-step aggregates 1/60 of the steps - that is what is compressed;
- the last 10 minutes at the real rate: a frame per node every 5 s, and for the last 3 minutes a
  step per rank per second (2.9 M step events), so the hot tier is at its steady state.
Before the collector starts, 30 days of hourly rollups for the whole fleet are written into its
data folder in the collector's own format (kind=gpus_1h, hosts_1h): that is the "30 days of
partitions" a month-long history query reads. They are generated, not ingested.

Reported: the collector's RSS (current and peak) against its budget, with its workers' (the peak is the highest
of: the collector's own reading at each upkeep pass, the kernel's peak since its last reset (the collector resets it
at each reading: collector.memory), and this bench's samples every 0.2 s); what each hot table holds and the hot
tier's budget at the steady state; ingest acknowledgement
p50/p99 of the real-rate phase; the latency of every read endpoint and of every console page
(Streamlit AppTest against the live collector, script time); a 30-day history query for one GPU;
and the time from start to /healthz ready after a SIGKILL. Goals (issue 10): RSS within the budget,
each endpoint and page under 300 ms, the 30-day query under 1 s, restart under 30 s.

    python -m bench.fleet            # the full fleet (about 15 minutes on 2 cores)
    python -m bench.fleet --quick    # 512 nodes, 2,048 ranks, 2 hours, 7 days (a couple of minutes)
    python -m bench.fleet --training # the job's nodes only, 30 minutes, no history: the Training page and
                                     # the job's endpoints at 16,384 ranks (a few minutes)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import polars as pl

from bench.ingest import free_port

INGEST, READ = "fleet-ingest", "fleet-read"
W = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"}
R = {"Authorization": f"Bearer {READ}"}
GPU_NAME = "NVIDIA H100 80GB HBM3"


# --- the warm tier's 30 days, written directly ----------------------------------------------------
def write_history(data_dir: Path, nodes: int, gpus: int, days: int, end: float) -> int:
    from collector.partitions import SORT_KEYS, for_disk, row_group_of
    from collector.rollups import GPU_SAMPLES, HOST_SAMPLES

    hours = int(days * 24)
    first = (end // 3600 - hours) * 3600
    uuids = [f"GPU-{n:05d}-{i}" for n in range(nodes) for i in range(gpus)]
    node_of = [f"node-{n:05d}" for n in range(nodes) for _ in range(gpus)]
    index = [i for _ in range(nodes) for i in range(gpus)]
    rows = 0
    day: dict[str, list[pl.DataFrame]] = {"gpus_1h": [], "hosts_1h": []}
    for h in range(hours):
        ts = first + h * 3600
        hot = (h % 24) < 2  # two hours a day of thermal throttling on one GPU in 64, for the record to show
        g = pl.DataFrame({
            "ts": [ts] * len(uuids), "node": node_of, "index": index, "uuid": uuids, "samples": [720] * len(uuids),
            "up_ratio": [1.0] * len(uuids), "utilization_ratio": [0.9] * len(uuids), "memory_used_bytes": [60 * 2**30] * len(uuids),
            "temperature_celsius": [65.0] * len(uuids), "temperature_max_celsius": [71.0] * len(uuids),
            "power_watts": [610.0] * len(uuids), "power_limit_watts": [700.0] * len(uuids), "sm_clock_hertz": [1.98e9] * len(uuids),
            "busy_samples": [720] * len(uuids), "busy_clock_ratio": [1.0] * len(uuids),
            "thermal_share": [0.5 if hot and k % 64 == 0 else 0.0 for k in range(len(uuids))],
            "power_cap_share": [0.0] * len(uuids), "hw_slowdown_share": [0.0] * len(uuids), "clock_event_mask": [0] * len(uuids),
            "health": ["healthy"] * len(uuids), "unhealthy_share": [0.0] * len(uuids), "degraded_share": [0.0] * len(uuids),
            "health_reasons": [None] * len(uuids), "xid_total": [0] * len(uuids), "xid_counts": [None] * len(uuids),
            "ecc_corrected_total": [3] * len(uuids), "ecc_uncorrected_total": [0] * len(uuids),
            "remap_pending": [False] * len(uuids), "remap_failure": [False] * len(uuids),
            "xid_total_first": [0] * len(uuids), "ecc_corrected_total_first": [3] * len(uuids),
            "ecc_uncorrected_total_first": [0] * len(uuids), "xid_total_within": [0] * len(uuids),
            "ecc_corrected_total_within": [0] * len(uuids), "ecc_uncorrected_total_within": [0] * len(uuids),
            "xid_counts_first": [None] * len(uuids), "xid_counts_within": [None] * len(uuids),
        }, schema=GPU_SAMPLES)
        host_rows = {c: [None] * nodes for c in HOST_SAMPLES}
        host_rows.update(ts=[ts] * nodes, node=[f"node-{n:05d}" for n in range(nodes)], samples=[720] * nodes,
                         cpu_utilization_ratio=[0.3] * nodes, gpu_count=[gpus] * nodes)
        hosts = pl.DataFrame(host_rows, schema=HOST_SAMPLES)
        for kind, frame in (("gpus_1h", g), ("hosts_1h", hosts)):
            day[kind].append(frame)
        if h == hours - 1 or time.gmtime(ts + 3600).tm_hour == 0:  # a day's files, as compaction leaves them
            stamp = time.strftime("date=%Y-%m-%d/hour=00", time.gmtime(ts))
            for kind, frames in day.items():
                folder = data_dir / f"kind={kind}" / stamp
                folder.mkdir(parents=True, exist_ok=True)
                for_disk(pl.concat(frames)).sort(*SORT_KEYS[kind]).write_parquet(
                    folder / f"part-{0:020d}-{0:020d}.parquet", row_group_size=row_group_of(kind))
                frames.clear()
        rows += g.height
    return rows


# --- senders --------------------------------------------------------------------------------------
def _frame(node: int, gpus: int, ts: float, hot: bool) -> str:
    gpu = ",".join(
        f'{{"index":{i},"uuid":"GPU-{node:05d}-{i}","name":"{GPU_NAME}","utilization_ratio":0.9,'
        f'"memory_used_bytes":64424509440,"memory_total_bytes":85899345920,"temperature_celsius":{66 + i % 4}.0,'
        f'"power_watts":610.0,"power_limit_watts":700.0,"sm_clock_hertz":{1.4e9 if hot and i == 3 else 1.98e9},'
        f'"sm_clock_max_hertz":1.98e9,"clock_event_mask":{64 if hot and i == 3 else 0},"health":"healthy","xid_total":0}}'
        for i in range(gpus))
    return (f'{{"v":1,"kind":"host","node":"node-{node:05d}","ts":{ts},"cpu_utilization_ratio":0.31,'
            f'"memory_used_bytes":412316860416,"memory_total_bytes":2199023255552,"load1":12.5,'
            f'"network_receive_bytes_total":{ts * 1e6},"network_transmit_bytes_total":{ts * 1e6},"gpus":[{gpu}]}}')


def _step(rank: int, world: int, step: int, ts: float, node: int) -> str:
    slow = 1.08 if rank == 27 else 1.0  # one straggler, for the findings
    compute = 0.82 * slow
    return (f'{{"v":1,"kind":"step","job":"llm-16k","rank":{rank},"world_size":{world},"step":{step},"ts":{ts},'
            f'"duration_s":1.0,"tokens":8192,"node":"node-{node:05d}","gpu_uuid":"GPU-{node:05d}-{rank % 8}",'
            f'"phases":{{"data":0.02,"forward":{compute * 0.35:.4f},"backward":{1 - compute * 0.35 - 0.06:.4f},'
            f'"optimizer":0.04}},"metrics":{{"sync_arrival_s":{compute:.4f}}}}}')


def sender(args: tuple) -> tuple[list[float], dict[int, int], Counter[str]]:
    """Send the batches of the nodes `mine` for each (from, to, mode) segment; returns the acknowledgement
    latencies of the real-rate segments, each node's next sequence number, and how many answers were 503 (the batch
    sent again a second later) in each mode."""
    url, mine, gpus, ranks_per_node, world, t0, segments, seqs = args
    latencies: list[float] = []
    refused: Counter[str] = Counter()
    client = httpx.Client(base_url=url, timeout=120, headers=W)

    def post(node: int, frames: list[str], steps: list[str], measure: bool) -> None:
        # The latency is from the first attempt to the acknowledgement: a batch that waited through 503s counts its wait.
        body = (f'{{"v":1,"agent_id":"agent-{node:05d}","seq":{seqs[node]},"node":"node-{node:05d}",'
                f'"sent_ts":{time.time()},"events":[{",".join(steps)}],"frames":[{",".join(frames)}]}}').encode()
        started = time.perf_counter()
        while True:
            r = client.post("/v1/ingest", content=body)
            if r.status_code == 200:
                break
            if r.status_code != 503:
                raise RuntimeError(f"ingest answered {r.status_code}: {r.text[:300]}")
            refused["real" if measure else "compressed"] += 1
            time.sleep(1)  # as the agent does: keep the batch, try again
        if measure:
            latencies.append(time.perf_counter() - started)
        seqs[node] += 1

    def ranks(node: int) -> range:
        return range(ranks_per_node) if node * ranks_per_node < world else range(0)

    for lo, hi, mode in segments:
        if mode == "compressed":  # 30 minutes a batch: a frame and a step per rank each minute
            t = lo
            while t < hi:
                minutes = [t + k * 60 for k in range(30) if t + k * 60 < hi]
                for node in mine:
                    post(node, [_frame(node, gpus, ts, False) for ts in minutes],
                         [_step(node * ranks_per_node + r, world, int(ts - t0), ts, node) for ts in minutes for r in ranks(node)],
                         False)
                t += 1800
        else:  # the real rate, a batch a minute: a frame every 5 s; a step per rank per second in the last 3 minutes
            step_from = hi - 180
            t = lo
            while t < hi:
                for node in mine:
                    post(node, [_frame(node, gpus, t + k * 5, True) for k in range(12) if t + k * 5 < hi],
                         [_step(node * ranks_per_node + r, world, int(ts - t0), ts, node)
                          for ts in (t + s for s in range(60)) if step_from <= ts < hi for r in ranks(node)], True)
                t += 60
    client.close()
    return latencies, seqs, refused


# --- the collector --------------------------------------------------------------------------------
class Peak(threading.Thread):
    """Samples the collector's RSS every 0.2 s and remembers the highest, and in which phase of the bench."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.phase, self.peaks, self.stop = pid, "start", {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                rss = tree_memory(self.pid)[0]
            except OSError:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)


def gauge(lines: list[str], name: str, default=float("nan")) -> float:
    """The value of an unlabelled gauge in /metrics' lines, or `default` if it is not there."""
    return next((float(line.split()[-1]) for line in lines if line.startswith(name + " ")), default)


def tree_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the collector and its ingest workers (collector.decoders), each summed: the summed peaks
    bound the peak of the sum from above."""
    total = [0, 0]
    for p in (pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            if p == pid:
                raise
            continue  # a worker that ended
        values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                  if line.startswith(("VmRSS", "VmHWM"))}
        total[0] += values["VmRSS"]
        total[1] += values["VmHWM"]
    return total[0], total[1]


class Collector:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ}
        self.log = open(log, "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{self.port}",
                                      "--data-dir", str(data_dir)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=300, headers=R)

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the collector exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("the collector never became ready")

    def memory(self) -> tuple[int, int]:
        return tree_memory(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=300)
        self.client.close()
        self.log.close()


def _ingested(c: "Collector") -> float:
    return sum(float(line.split()[-1]) for line in c.client.get("/metrics").text.splitlines()
               if line.startswith("fleetscope_collector_events_ingested_total{"))


def timed(client: httpx.Client, path: str, params: dict | None = None, runs: int = 5) -> tuple[float, float, int]:
    """Median and max over `runs` requests (the first is the max when a view of a big table is computed
    for it and then shared for a few seconds), and the answer's size."""
    times = []
    size = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        r = client.get(path, params=params)
        times.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path} answered {r.status_code}: {r.text[:300]}")
        size = len(r.content)
    return statistics.median(times), max(times), size


def console_pages(url: str, pages: list[str] | None = None, runs: int = 3) -> list[tuple[str, float, float]]:
    import logging

    from streamlit.testing.v1 import AppTest

    for name in ("streamlit", "streamlit.runtime.scriptrunner_utils.script_run_context"):
        logging.getLogger(name).setLevel(logging.ERROR)

    dashboards = Path(__file__).resolve().parents[1] / "dashboards"
    os.environ.update(FLEETSCOPE_COLLECTOR_URL=url, FLEETSCOPE_READ_TOKEN=READ, FLEETSCOPE_CONSOLE_REFRESH_S="0")
    out = []
    for page in pages or ["app.py", "pages/1_Fleet.py", "pages/2_Training.py", "pages/3_Inference.py",
                          "pages/4_Findings.py", "pages/5_Node.py"]:
        # One AppTest per page, run once untimed: its first run also pays Streamlit's one-time scan of the
        # installed packages (~0.4 s), which a served console pays once per process, not per page view.
        at = AppTest.from_file(str(dashboards / page), default_timeout=120)
        at.run()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t0)
            if at.exception:
                raise RuntimeError(f"{page}: {[e.value for e in at.exception]}")
        out.append((page, statistics.median(times), max(times)))
    return out


def training_only(c: "Collector", job: str, now: float) -> None:
    """The calls the Training page makes (with its default one-hour range), then the page itself, 7 times."""
    since = {"since": now - 3600}
    print(f"{'read endpoint (as the Training page asks)':48} {'median ms':>9} {'max ms':>7} {'KiB':>7}")
    for path, params in [("/v1/jobs", since), (f"/v1/jobs/{job}", {**since, "top": 200}),
                         (f"/v1/jobs/{job}/steps", {**since, "max_points": 1000}),
                         (f"/v1/jobs/{job}/goodput", {"max_points": 200}),
                         ("/v1/findings", {"job": job, **since}), (f"/v1/jobs/{job}/matrix", {"last": 100})]:
        med, worst, size = timed(c.client, path, params, runs=7)
        print(f"{path:48} {med * 1000:9.0f} {worst * 1000:7.0f} {size / 1024:7.0f}")
    print(f"{'console page (script time on a rerun)':48} {'median ms':>9} {'max ms':>7}")
    for page, med, worst in console_pages(c.url, ["pages/2_Training.py"], runs=7):
        print(f"{page:48} {med * 1000:9.0f} {worst * 1000:7.0f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--ranks", type=int, default=16384)
    p.add_argument("--hours", type=float, default=6.0)
    p.add_argument("--days", type=float, default=30.0)
    p.add_argument("--senders", type=int, default=3)
    p.add_argument("--log", type=Path, help="where the collector's log goes (default: the bench's temporary folder)")
    p.add_argument("--quick", action="store_true", help="512 nodes, 2,048 ranks, 2 hours, 7 days")
    p.add_argument("--training", action="store_true", help="only the job's nodes, 30 minutes, no history; then only "
                                                              "the job's endpoints and the Training page")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.ranks, args.hours, args.days = 512, 2048, 2.0, 7.0
    if args.training:
        args.nodes, args.hours, args.days = args.ranks // 8, 0.5, 0.0
    ranks_per_node = 8
    with tempfile.TemporaryDirectory(prefix="fleetscope-fleet-") as tmp:
        data = Path(tmp) / "data"
        end = time.time()
        start = end - args.hours * 3600
        t0 = time.perf_counter()
        history_rows = write_history(data, args.nodes, args.gpus, args.days, start)
        print(f"fleet: {args.nodes:,} nodes x {args.gpus} GPUs, a {args.ranks:,}-rank job; {args.hours:g} h compressed; "
              f"{args.days:g} days of hourly history ({history_rows:,} GPU rows) written in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} cores")
        log_path = args.log or Path(tmp) / "collector.log"
        c = Collector(data, log_path)
        first_ready = c.wait_ready()
        watch = Peak(c.proc.pid)
        watch.start()
        nodes = list(range(args.nodes))
        shares = [nodes[i::args.senders] for i in range(args.senders)]
        seqs: dict[int, int] = {n: 0 for n in nodes}
        refused: Counter[str] = Counter()  # 503 answers by mode (a flood held back while the upkeep catches up)

        def feed(segments: list[tuple]) -> list[float]:
            jobs = [(c.url, mine, args.gpus, ranks_per_node, args.ranks, start, segments, {n: seqs[n] for n in mine})
                    for mine in shares]
            with mp.get_context("spawn").Pool(args.senders) as pool:
                results = pool.map(sender, jobs)
            for _, next_seqs, counts in results:
                seqs.update(next_seqs)
                refused.update(counts)
            return sorted(x for part, _, _ in results for x in part)

        t0 = time.perf_counter()
        compressed_until = end - 600
        watch.phase = "feed, compressed hours"
        feed([(start, compressed_until, "compressed")])
        compressed_s = time.perf_counter() - t0
        compressed_events = _ingested(c)
        # Then up to now, the last 10 minutes at the real rate, dated so that they end about when they are
        # all in: the hot tier is at its steady state (5 minutes of raw frames) when the reads are measured.
        real_events = args.nodes * 120 + min(args.ranks, args.nodes * ranks_per_node) * 180
        estimate = real_events / max(compressed_events / compressed_s, 1.0) * 1.1
        end = time.time() + estimate
        t1 = time.perf_counter()
        watch.phase = "feed, last 10 minutes"
        latencies = feed([(compressed_until, end - 600, "compressed"), (end - 600, end, "real")])
        real_s = time.perf_counter() - t1
        feed_s = compressed_s + real_s
        print(f"feed: compressed hours {compressed_s:.0f} s ({compressed_events:,.0f} events and frames); the rest, with "
              f"the last 10 minutes at the real rate, {real_s:.0f} s (estimated {estimate:.0f} s); the data ends "
              f"{end - time.time():+.0f} s from now")
        metrics = c.client.get("/metrics").text
        events = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("fleetscope_collector_events_ingested_total{"))
        print(f"ingest: {events:,.0f} events and frames in {feed_s:.0f} s; real-rate phase: ack p50 "
              f"{statistics.median(latencies) * 1000:.0f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms "
              f"({len(latencies):,} batches); answered 503 and sent again a second later: {refused['compressed']:,} "
              f"compressed-hour batches, {refused['real']:,} real-rate batches")
        watch.phase = "steady, no ingest"
        time.sleep(35)  # a checkpoint and several analysis passes at the steady state
        rss, peak = c.memory()
        # The collector resets its own kernel peak at each upkeep pass (collector.memory) and exports the highest it
        # read; the peak is the higher of that, what the kernel holds since the last reset and the 0.2 s samples.
        budget = float(next(line.split()[-1] for line in metrics.splitlines()
                            if line.startswith("fleetscope_collector_memory_budget_bytes")))
        lines = c.client.get("/metrics").text.splitlines()
        peak = max(peak, gauge(lines, "fleetscope_collector_resident_memory_peak_bytes", 0.0), *watch.peaks.values())
        held = {line.split('"')[1]: float(line.split()[-1]) for line in lines
                if line.startswith("fleetscope_collector_hot_held_seconds{")}
        tables = {line.split('"')[1]: float(line.split()[-1]) for line in lines
                  if line.startswith("fleetscope_collector_memory_bytes{")}
        per_rank = gauge(lines, "fleetscope_collector_hot_steps_per_rank")
        hot_budget = gauge(lines, "fleetscope_collector_hot_budget_bytes")
        print(f"memory: RSS {rss / 2**20:,.0f} MiB now, {peak / 2**20:,.0f} MiB peak; budget {budget / 2**20:,.0f} MiB "
              f"(RSS/budget {rss / budget:.2f}, peak/budget {peak / budget:.2f}); hot tier holds GPU rollups for "
              f"{held.get('gpus_1m', 0) / 3600:.1f} h, raw frames {held.get('gpus', 0):.0f} s, {per_rank:.0f} steps a rank")
        print("tables held, MiB: " + ", ".join(f"{table} {size / 2**20:,.0f}" for table, size in
                                                sorted(tables.items(), key=lambda kv: -kv[1]) if size >= 2**20)
              + f"; the hot tier's budget now {hot_budget / 2**20:,.0f} MiB (a third of the budget: {budget / 3 / 2**20:,.0f})")
        watch.phase = "reads"
        node, gpu, job = "node-00001", "GPU-00008-0", "llm-16k"  # GPU 64 is one of those the history throttles
        now = time.time()
        if args.training:
            training_only(c, job, now)
            watch.stop.set()
            c.stop()
            return
        reads = [
            ("/v1/nodes", None), ("/v1/gpus", None), (f"/v1/nodes/{node}", None),
            (f"/v1/nodes/{node}/series", {"since": now - 3600}), (f"/v1/nodes/{node}/series", {"since": now - 6 * 3600}),
            (f"/v1/nodes/{node}/series", {"since": now - 86400}),
            (f"/v1/nodes/{node}/history", {"since": now - min(args.days, 30.0) * 86400}),
            ("/v1/jobs", None), (f"/v1/jobs/{job}", None), (f"/v1/jobs/{job}/steps", None), (f"/v1/jobs/{job}/matrix", None),
            (f"/v1/jobs/{job}/goodput", None),
            # no inference traffic in this fleet: what the services' reads cost when there is none
            ("/v1/services", None), ("/v1/findings", None), ("/v1/slos", None), ("/metrics", None),
        ]
        print(f"{'read endpoint':48} {'median ms':>9} {'max ms':>7} {'KiB':>7}")
        for path, params in reads:
            med, worst, size = timed(c.client, path, params)
            label = path + (f" (last {(now - params['since']) / 3600:g} h)" if params else "")
            print(f"{label:48} {med * 1000:9.0f} {worst * 1000:7.0f} {size / 1024:7.0f}")
        # At the default 500 points a month is an hour a point: the hourly tier. A shorter history asks for
        # hourly points too, so that it reads what was written for it.
        query = {"since": now - args.days * 86400, "max_points": min(500, int(args.days * 24))}
        med, worst, size = timed(c.client, f"/v1/gpus/{gpu}/history", query)
        record = c.client.get(f"/v1/gpus/{gpu}/history", params=query).json()["record"]
        print(f"{'history of one GPU over ' + format(args.days, 'g') + ' days':48} {med * 1000:9.0f} {worst * 1000:7.0f} "
              f"{size / 1024:7.0f}   (observed {record['observed_seconds'] / 86400:.1f} days, throttled "
              f"{record['throttle_seconds']['thermal_slowdown'] / 3600:.1f} h)")
        print(f"{'console page (script time on a rerun)':48} {'median ms':>9} {'max ms':>7}")
        watch.phase = "console pages"
        for page, med, worst in console_pages(c.url):
            print(f"{page:48} {med * 1000:9.0f} {worst * 1000:7.0f}")
        watch.stop.set()
        print("peak RSS by phase: " + "; ".join(f"{phase} {rss / 2**20:,.0f} MiB ({rss / budget:.2f} of the budget)"
                                                for phase, rss in watch.peaks.items()))
        governed = gauge(c.client.get("/metrics").text.splitlines(), "fleetscope_collector_resident_memory_peak_bytes", 0.0)
        whole = max(governed, c.memory()[1], *watch.peaks.values())
        print(f"peak RSS over the whole run: {whole / 2**20:,.0f} MiB ({whole / budget:.2f} of the budget; the collector's "
              f"own reading at its upkeep passes {governed / 2**20:,.0f} MiB, the 0.2 s samples "
              f"{max(watch.peaks.values()) / 2**20:,.0f} MiB)")
        c.stop(signal.SIGKILL)
        again = Collector(data, log_path)
        restart = again.wait_ready()
        rss, _ = again.memory()
        print(f"restart after SIGKILL: /healthz ready in {restart:.1f} s (first start, empty but the history: "
              f"{first_ready:.1f} s); RSS after {rss / 2**20:,.0f} MiB")
        again.stop()


if __name__ == "__main__":
    main()
