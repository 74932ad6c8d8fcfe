"""Total CPU of the agent against Debian's node_exporter, both running and scraped over the same wall time.

What is measured, per run: the agent and node_exporter start together, warm up, and are then
scraped by this bench at the same cadence (every 15 s, Prometheus' default, or every 1 s) for the
same window (--duration, 60 s by default). Each one's figure is the user+system CPU time of its
whole process tree (psutil) over that window, per minute: everything it did, its own sampling
(the agent's sampler at its default interval, read from agent/config.py) as well as the scrapes.
Nothing is subtracted. The scrapes ask as Prometheus does (its Accept header, gzip).
Agent configurations: no GPUs (`--gpu-backend none`), and 8 GPUs on the real NVML backend
(agent/gpu/nvml.py) driven by the tests' fake NVML (bench/fake_nvml_agent.py), not the simulator.
Each configuration and cadence runs --repeats times (interleaved), and every run prints, then
the median. Also: resident memory (RSS) at the end of the window, the size and series count of
one scrape, and, in this process, NVML calls per GPU per sample and the time per sample of
`Nvml(FakeNvml(8 GPUs)).read()`.

What a sceptic should ask:
- The fake answers NVML calls from a dict, in Python, with a counter and fault checks per call.
  A real call is an ioctl into the driver, often slower; the call count is real, the time is not.
  bench/gpu_check.sh counts and times the calls on a real GPU. The fake's Python costs about what
  pynvml's does: a plain call took ~0.4 us of pynvml's Python (before its ctypes call) and ~0.7 us in
  the fake (Python 3.11 on this VM). The sample's field values skip pynvml's wrapper (which builds a
  ctypes array and sets each id in a Python loop, ~190 us per H100 at every call): the gateway builds
  its arrays once and calls the C function through pynvml's own _nvmlGetFunctionPointer, which the
  fake answers by filling the array from Python (its "driver"); the fake's nvmlDeviceGetFieldValues,
  used where a binding lacks that handle, is pynvml's wrapper line for line. The fake was not changed
  to cut the agent's figures. The time spent inside the fake's own functions is measured in this process (each wrapped
  with a timer) and printed, per sample and per
  minute on a warm CPU: it is part of the 8-GPU agent's figure, never subtracted from it.
- CPU time comes in 10 ms ticks (/proc/<pid>/stat), so a 60 s window is good to about ±10 ms/min
  per reading; a --quick run's short windows are much coarser. At 15 s scrapes both use a few tens
  of ms a minute, so each run also prints the threads' time on a CPU in nanoseconds
  (/proc/<pid>/task/<tid>/schedstat, summed over the tree's threads; a thread that ends inside the
  window takes its time with it, and the line says so) and its ratio: same window, same processes.
- Both processes see this machine: its core count, interfaces and filesystems (node_exporter's
  cost grows with them; the agent's InfiniBand and hwmon sources find nothing on a VM), and
  whatever else runs on it. They run at the same time, so load hits both, but CPU time per unit of
  work still rises on a busy machine; figures from a busy machine are indicative only. The
  bench's own scraping is charged to neither.
- Every run starts a fresh agent, which imports the agent's source anew: the bench warns when that
  source changed on disk during the run, and prints the commit and uncommitted files it measured.
- `--no-gpm` exists for a gateway that cannot yet read the fake's GPM answers; its figures leave
  out the GPM calls a Hopper GPU gets.
- node_exporter runs with its defaults and collects on every scrape; the agent samples on its
  own clock whether scraped or not, so at long scrape intervals its sampling dominates.
- The agent builds its GPU series (~1,600 for 8 GPUs) only when a scrape finds a new snapshot
  (agent/sources/base.py, Deferred): at 15 s scrapes two samples in three build none, at 1 s every
  sample is built. The agent here ships nowhere (no collector URL, as before): the shipper, when
  there is one, reads the snapshot's typed fields and builds no series, but its own work is not
  in these figures.
- Each run also splits the agent's schedstat time by thread, by the names the agent gives its threads in the
  kernel (agent/threads.py): the sampler's lanes (sources-N; the GPU source runs in a lane of its own), the
  /metrics handlers (metrics-handler, the series built and rendered there), the request reader, the listener.
  A thread that ended inside the window is missing from it, as from the total.
- `--cold N` (8 by default) times, in the bench's own process, the host sources' lane and the GPU source on a warm
  CPU and after each of N sleeps of the agent's interval: on a VM most of what a sample costs the agent is the
  first touch, after 5 s of sleep, of the code and data it runs on, not the work itself.
- RSS is read once, at the end; the fake NVML module and its imports add to the 8-GPU agent's.

- `--against DIR` runs each row also with the agent from another source tree (e.g. `git archive` of the commit
  before a change, unpacked), alternated run by run with this tree's, so both are measured in the same hour on
  the same machine; its runs print beside this tree's and get their own medians. The machine's speed drifts
  from hour to hour on a shared VM: compare a change with the commit before it only this way.

    python -m bench.agent_overhead [--duration 60] [--repeats 3] [--quick] [--no-gpm] [--gpus 8] [--cadence 15]
                                   [--against DIR]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, fields

import psutil

from agent.config import AgentConfig

AGENT_INTERVAL_S = next(f.default for f in fields(AgentConfig) if f.name == "interval_s")
# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
CADENCES_S = (15.0, 1.0)
GPUS = 8


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(ps: psutil.Process) -> list[psutil.Process]:
    try:
        return [ps, *ps.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(ps: psutil.Process) -> float:
    total = 0.0
    for p in tree(ps):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass  # a child that exited takes its time with it; neither process forks in steady state
    return total


def tree_rss(ps: psutil.Process) -> int:
    total = 0
    for p in tree(ps):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_threads(ps: psutil.Process, name: str) -> dict[int, str]:
    """The text of /proc/<pid>/task/<tid>/`name` for each thread of the process tree, by thread id (a thread that
    ends while it is read is left out)."""
    out: dict[int, str] = {}
    for p in tree(ps):
        try:
            tids = os.listdir(f"/proc/{p.pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p.pid}/task/{tid}/{name}") as fh:
                    out[int(tid)] = fh.read()
            except (OSError, ValueError):
                pass
    return out


def tree_runtime_ns(ps: psutil.Process) -> dict[int, int] | None:
    """Each thread's time on a CPU in nanoseconds (/proc/<pid>/task/<tid>/schedstat), by thread id, for the process
    tree; None where the kernel does not give it. /proc/<pid>/stat's user+system comes in 10 ms ticks: at 15 s
    scrapes both processes use a few tens of ms a minute, so the ticks alone leave their ratio ±50% uncertain."""
    if not os.path.exists("/proc/self/schedstat"):
        return None
    out: dict[int, int] = {}
    for tid, text in tree_threads(ps, "schedstat").items():
        try:
            out[tid] = int(text.split()[0])
        except (ValueError, IndexError):
            pass
    return out


def thread_names(ps: psutil.Process) -> dict[int, str]:
    """Each thread's name as the kernel knows it (comm), by thread id. The agent names its threads there
    (agent/threads.py: sources-1, metrics-handler, ...); an agent from before that shows "python"."""
    return {tid: text.strip() for tid, text in tree_threads(ps, "comm").items()}


def by_thread_ms_min(before: dict[int, int] | None, after: dict[int, int] | None, names: dict[int, str],
                     window: float) -> dict[str, float]:
    """CPU ms/min over the window by thread name (threads of one name summed: the /metrics handlers), largest first."""
    if before is None or after is None:
        return {}
    out: dict[str, float] = {}
    for tid, t in after.items():
        name = names.get(tid, "?")
        out[name] = out.get(name, 0.0) + (t - before.get(tid, 0)) / 1e6 / window * 60
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def runtime_ms_min(before: dict[int, int] | None, after: dict[int, int] | None, window: float) -> tuple[float | None, int]:
    """CPU ms/min of the threads over the window (a thread born in it counts from 0), and how many threads ended in
    it (their time is missing: the figure is then low, and says so)."""
    if before is None or after is None:
        return None, 0
    ns = sum(t - before.get(tid, 0) for tid, t in after.items())
    return ns / 1e6 / window * 60, len(set(before) - set(after))


def scrape(url: str, like_prometheus: bool = True) -> tuple[bytes, int]:
    """The exposition text and the bytes that crossed the wire."""
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"} if like_prometheus else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        wire = resp.read()
        text = gzip.decompress(wire) if resp.headers.get("Content-Encoding") == "gzip" else wire
    return text, len(wire)


def series(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


@dataclass
class Target:
    name: str
    argv: list[str]
    url: str
    cwd: str | None = None  # the source tree the agent runs from (`python -m` imports from the working folder)
    log: str = ""
    proc: subprocess.Popen | None = None
    ps: psutil.Process | None = None

    def start(self, logdir: str) -> None:
        stem = re.sub(r"\W+", "-", self.name)
        self.log = os.path.join(logdir, f"{stem}-{time.monotonic_ns()}.log")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, cwd=self.cwd)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                scrape(self.url, like_prometheus=False)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer on {self.url}; its log:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self, lines: int = 12) -> str:
        with open(self.log, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_target(gpus: int, gpm: bool, tree: str | None = None) -> Target:
    port = free_port()
    common = ["agent", "--interval", str(AGENT_INTERVAL_S), "--metrics-address", f"127.0.0.1:{port}",
              "--events-address", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "--spool-dir", ""]
    if gpus == 0:
        argv = [sys.executable, "-m", "fleetscope", *common, "--gpu-backend", "none"]
    else:
        fake = ["--fake-gpus", str(gpus)] + ([] if gpm else ["--no-gpm"])
        argv = [sys.executable, "-m", "bench.fake_nvml_agent", *fake, *common, "--gpu-backend", "nvml"]
    return Target(agent_name(gpus, gpm), argv, f"http://127.0.0.1:{port}/metrics", cwd=tree)


def agent_name(gpus: int, gpm: bool) -> str:
    return "agent, no GPU" if gpus == 0 else f"agent, {gpus} fake-NVML GPUs" + ("" if gpm else " (no GPM)")


def exporter_target(binary: str) -> Target:
    port = free_port()
    return Target("node_exporter", [binary, f"--web.listen-address=127.0.0.1:{port}"], f"http://127.0.0.1:{port}/metrics")


def probe_ms() -> float:
    """CPU milliseconds for a fixed piece of work in this process: how fast the machine is just now.
    On a shared VM it varies from run to run, and the figures of the two processes with it."""
    t = time.process_time()
    total = 0
    for i in range(1_000_000):
        total += i
    return (time.process_time() - t) * 1000


def gpu_source_problem(text: bytes, gpus: int) -> str | None:
    """Why an agent that should read `gpus` GPUs is not measuring them, or None when it is."""
    if gpus == 0:
        return None
    if b'fleetscope_agent_source_up{source="gpu"} 1.0' not in text:
        return "its gpu source is down (fleetscope_agent_source_up{source=\"gpu\"} is not 1)"
    up = sum(1 for line in text.splitlines() if line.startswith(b"fleetscope_gpu_up{") and line.endswith(b" 1.0"))
    return None if up == gpus else f"{up} of {gpus} GPUs are up"


def run_once(agent: Target, exporter: Target, gpus: int, cadence: float, duration: float, warmup: float,
             logdir: str) -> dict:
    both = (agent, exporter)
    try:
        for t in both:
            t.start(logdir)
        deadline = time.monotonic() + 60
        for t in both:
            t.wait_ready(deadline)
        time.sleep(warmup)  # past start-up: imports, the first samples, GPM's first pair
        scrapes, failed, wire = 0, 0, {t.name: 0 for t in both}
        cpu0 = {t.name: tree_cpu_s(t.ps) for t in both}
        ns0 = {t.name: tree_runtime_ns(t.ps) for t in both}
        t0 = time.monotonic()
        for k in range(max(1, int(duration // cadence))):
            time.sleep(max(0.0, t0 + k * cadence - time.monotonic()))
            for t in (both if k % 2 == 0 else both[::-1]):  # neither always goes first
                try:
                    wire[t.name] = scrape(t.url)[1]
                except OSError:
                    failed += 1
            scrapes += 1
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        cpu1 = {t.name: tree_cpu_s(t.ps) for t in both}
        ns1 = {t.name: tree_runtime_ns(t.ps) for t in both}
        window = time.monotonic() - t0
        out = {"window_s": window, "scrapes": scrapes, "failed": failed, "probe_ms": probe_ms()}
        for t in both:  # after the window: not counted
            names = thread_names(t.ps)
            text = scrape(t.url, like_prometheus=False)[0]
            ns_ms_min, ended = runtime_ms_min(ns0[t.name], ns1[t.name], window)
            out[t.name] = {"cpu_ms_min": (cpu1[t.name] - cpu0[t.name]) / window * 60_000, "rss_mib": tree_rss(t.ps) / 2**20,
                           "ns_ms_min": ns_ms_min, "threads_ended": ended,
                           "threads": by_thread_ms_min(ns0[t.name], ns1[t.name], names, window),
                           "kib": len(text) / 1024, "wire_kib": wire[t.name] / 1024, "series": series(text)}
        problem = gpu_source_problem(scrape(agent.url, like_prometheus=False)[0], gpus)
        if problem:
            out["invalid"] = f"{agent.name}: {problem}; its log:\n{agent.log_tail()}"
        return out
    finally:
        for t in both:
            t.stop()


def nvml_cost(gpus: int, samples: int, warmup: int, gpm: bool) -> dict:
    """NVML calls per GPU per sample and seconds per sample of the real gateway on the fake."""
    from agent.gpu.nvml import Nvml
    from bench.gpu_check_nvml import SampleClock
    from tests.agent.fake_pynvml import FakeNvml, NotSupported, device

    fake = FakeNvml([device(i, **({} if gpm else {"gpm": NotSupported})) for i in range(gpus)])
    clock = SampleClock(AGENT_INTERVAL_S)  # the reads' schedule (limits, health counters) as at the agent's interval
    nvml = Nvml(fake, clock=clock)
    inside = [0.0]  # seconds spent inside the fake's functions (its Python, which a real driver does not run)

    def timed(function):
        def call(*args):
            t = time.perf_counter()
            try:
                return function(*args)
            finally:
                inside[0] += time.perf_counter() - t
        return call

    try:
        for _ in range(warmup):  # the first read initialises; GPM needs two samples before it reads metrics
            clock.tick()
            nvml.read()
        fake.counts.clear()
        times = []
        for _ in range(samples):
            clock.tick()
            t = time.perf_counter()
            nvml.read()
            times.append(time.perf_counter() - t)
        # The fake also counts bookkeeping keys (e.g. "process_utilization_since:..."); only nvml* are calls.
        calls = {name: n for name, n in fake.counts.items() if name.startswith("nvml")}
        for name in [n for n in vars(fake) if n.startswith("nvml") and callable(getattr(fake, n))]:
            setattr(fake, name, timed(getattr(fake, name)))
        pointer = fake._nvmlGetFunctionPointer  # the C functions the gateway calls directly (field values)
        fake._nvmlGetFunctionPointer = lambda name: timed(pointer(name))
        t = time.perf_counter()
        for _ in range(samples):
            clock.tick()
            nvml.read()
        timed_total = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - the gateway and the fake disagree: say how, measure nothing
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        nvml.shutdown()
    return {"calls_per_gpu": sum(calls.values()) / (samples * gpus), "median_ms": statistics.median(times) * 1000,
            "mean_ms": statistics.fmean(times) * 1000,
            "max_ms": max(times) * 1000, "top": sorted(calls.items(), key=lambda kv: -kv[1])[:6], "samples": samples,
            "fake_ms": inside[0] / samples * 1000, "fake_share": inside[0] / timed_total if timed_total else 0.0}


def cold_cost(gpus: int, samples: int, gpm: bool, pause_s: float = AGENT_INTERVAL_S) -> dict:
    """CPU per sample of the same work on a warm CPU and after `pause_s` of sleep, in this process: the host sources'
    lane (a Sampler of the agent's host sources, built as the agent builds them, whose lane thread's schedstat is
    read) and the GPU source on the fake NVML (thread CPU around each collect()). Warm: the lane at a 10 ms
    interval, the GPU source back to back. This process runs with pymalloc on small pages, unlike the agent
    (agent/hugepages.py): the figures show the shape, the agent's own are the runs'."""
    from agent.config import AgentConfig
    from agent.gpu.nvml import Nvml
    from agent.sampler import Sampler
    from agent.sources import build_sources
    from agent.sources.gpu import GpuSource
    from bench.gpu_check_nvml import SampleClock
    from tests.agent.fake_pynvml import FakeNvml, NotSupported, device

    me = psutil.Process()

    def lane_ns() -> int:  # the lane's thread, by the name the agent gives it in the kernel
        ns = tree_runtime_ns(me) or {}
        lanes = [ns[tid] for tid, name in thread_names(me).items() if name == "sources-1" and tid in ns]
        if not lanes:
            raise RuntimeError("no sources-1 thread with a schedstat")
        return lanes[0]

    def host_lane(interval: float, n: int) -> float:
        sources = [src for src in build_sources(AgentConfig(gpu_backend="none", collector_url="")) if src.name != "gpu"]
        sampler = Sampler(sources, interval_s=interval)
        sampler.start()
        try:
            time.sleep(interval * 2 + 0.2)  # past the first samples (start-up)
            a = lane_ns()
            time.sleep(interval * n)
            return (lane_ns() - a) / 1e6 / n
        finally:
            sampler.stop()

    out: dict = {"pause_s": pause_s, "samples": samples}
    try:
        out["host_warm_ms"], out["host_cold_ms"] = host_lane(0.01, 300), host_lane(pause_s, samples)
        fake = FakeNvml([device(i, **({} if gpm else {"gpm": NotSupported})) for i in range(gpus)])
        clock = SampleClock(AGENT_INTERVAL_S)
        nvml = Nvml(fake, clock=clock)
        source = GpuSource(backend=nvml, clock=clock)

        def collect() -> float:
            clock.tick()
            t = time.thread_time_ns()
            source.collect()
            return (time.thread_time_ns() - t) / 1e6

        try:
            for _ in range(5):
                collect()
            out["gpu_warm_ms"] = statistics.median(collect() for _ in range(120))
            cold = []
            for _ in range(samples):
                time.sleep(pause_s)
                cold.append(collect())
            out["gpu_cold_ms"] = statistics.median(cold)
        finally:
            nvml.shutdown()
    except Exception as exc:  # noqa: BLE001 - measure nothing rather than something else
        return {"error": f"{type(exc).__name__}: {exc}"}
    return out


def median_of(runs: list[dict], side: str) -> dict[str, float]:
    return {key: statistics.median(r[side][key] for r in runs) for key in ("cpu_ms_min", "rss_mib")}


def agent_code_digest() -> str:
    """A digest of the agent's source as it is on disk: every run starts a fresh agent, which imports it anew."""
    h = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("agent", "tests/agent"):
        for path in sorted(glob.glob(os.path.join(root, folder, "**", "*.py"), recursive=True)):
            with open(path, "rb") as fh:
                h.update(path.encode() + fh.read())
    return h.hexdigest()[:12]


def code_state() -> str:
    """The commit measured, and whether the agent's code differs from it (figures belong to a code state)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], check=False, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
    head = git("rev-parse", "--short", "HEAD").strip() or "(not a git checkout)"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "agent", "tests/agent/fake_pynvml.py").splitlines()]
    return head + (f", with uncommitted changes in {', '.join(dirty)}" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, help="seconds of each measured window (default 60; --quick: 30)")
    p.add_argument("--repeats", type=int, help="runs of each configuration and cadence (default 3; --quick: 1)")
    p.add_argument("--warmup", type=float, help="seconds after start-up before the window opens (default 10; --quick: 3)")
    p.add_argument("--samples", type=int, help="in-process NVML reads timed (default 240; --quick: 24; samples as the agent's, 5 s apart on the reader's clock)")
    p.add_argument("--cold", type=int, metavar="N",
                   help="also time, in this process, the host sources' lane and the GPU source warm and after each of N "
                        "sleeps of the agent's interval (about 2N x 5 s); 0: not (default 8; --quick: 0)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short windows, one run each")
    p.add_argument("--no-gpm", action="store_true",
                   help="fake GPUs without GPU performance monitoring (as pre-Hopper GPUs answer)")
    p.add_argument("--gpus", type=int, choices=(0, GPUS), action="append",
                   help=f"only the rows with this many GPUs (0 or {GPUS}; repeatable; default both)")
    p.add_argument("--cadence", type=float, choices=CADENCES_S, action="append",
                   help="only the rows scraped at this interval in seconds (repeatable; default both)")
    p.add_argument("--against", metavar="DIR",
                   help="also run the agent from this source tree (e.g. the commit before, unpacked with git archive), "
                        "alternated run by run with this one's")
    args = p.parse_args(argv)
    if args.against and not os.path.isfile(os.path.join(args.against, "agent", "main.py")):
        raise SystemExit(f"agent_overhead: --against {args.against}: no agent/main.py there; give the root of a fleetscope "
                         "source tree")
    duration = args.duration or (30.0 if args.quick else 60.0)
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    samples = args.samples or (24 if args.quick else 240)
    args.cold = args.cold if args.cold is not None else (0 if args.quick else 8)
    gpm = not args.no_gpm

    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        raise SystemExit("agent_overhead: node_exporter is not installed (apt-get install prometheus-node-exporter); "
                         "this bench measures the agent against it and has nothing to compare without it")
    version = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True).stdout.split("\n")[0]
    print(f"fleetscope {code_state()}")
    digest = agent_code_digest()
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {version}; "
          f"agent sampling every {AGENT_INTERVAL_S:g} s; windows of {duration:g} s after {warmup:g} s warm-up; "
          f"{repeats} run(s) each")

    cost = nvml_cost(GPUS, samples, 3, gpm)
    if "error" in cost:
        print(f"NVML in-process ({GPUS} fake GPUs{'' if gpm else ', no GPM'}): FAILED: {cost['error']}")
    else:
        print(f"NVML in-process ({GPUS} fake GPUs{'' if gpm else ', no GPM'}, {cost['samples']} samples): "
              f"{cost['calls_per_gpu']:.1f} calls per GPU per sample; {cost['median_ms']:.2f} ms per sample median, "
              f"{cost['mean_ms']:.2f} mean, {cost['max_ms']:.2f} max (the fake's Python, not a driver's ioctls)")
        print("  most called: " + ", ".join(f"{name} {n / (cost['samples'] * GPUS):g}" for name, n in cost["top"]))
        print(f"  of which inside the fake's own functions: {cost['fake_ms']:.2f} ms per sample ({cost['fake_share']:.0%} of a "
              f"read), about {cost['fake_ms'] * 60 / AGENT_INTERVAL_S:.0f} ms/min at the default interval on a warm CPU; it is "
              "counted in the 8-GPU agent's figures below (a real driver's calls cost their own time instead)")

    if args.cold:
        cold = cold_cost(GPUS, args.cold, gpm)
        if "error" in cold:
            print(f"warm against cold, in-process: FAILED: {cold['error']}")
        else:
            print(f"warm against cold, in-process (CPU per sample; cold: after {cold['pause_s']:g} s of sleep, median of "
                  f"{cold['samples']}): the host sources' lane {cold['host_warm_ms']:.2f} ms warm, {cold['host_cold_ms']:.2f} "
                  f"cold (x{cold['host_cold_ms'] / cold['host_warm_ms']:.1f}); the GPU source's collect() on {GPUS} fake GPUs "
                  f"{cold['gpu_warm_ms']:.2f} ms warm, {cold['gpu_cold_ms']:.2f} cold (x{cold['gpu_cold_ms'] / cold['gpu_warm_ms']:.1f})")

    rows = [(gpus, cadence) for gpus in (0, GPUS) if not args.gpus or gpus in args.gpus
            for cadence in CADENCES_S if not args.cadence or cadence in args.cadence]
    trees: list[tuple[str, str | None]] = [("", None)]
    if args.against:
        against = os.path.abspath(args.against)
        trees.append((f" [{os.path.basename(against.rstrip('/'))}]", against))
        print(f"alternated with the agent from {against}")
    results: dict[tuple[str, int, float], list[dict]] = {(tag, *row): [] for tag, _ in trees for row in rows}
    with tempfile.TemporaryDirectory(prefix="agent-overhead-") as logdir:
        print(f"\n{'run':56} {'agent ms/min':>12} {'node_exp ms/min':>15} {'ratio':>6} {'agent MiB':>9} {'node_exp MiB':>12}"
              f" {'probe ms':>8} {'load':>5}")
        for r in range(repeats):
            for gpus, cadence in rows:
                for tag, tree in (trees if r % 2 == 0 else trees[::-1]):  # neither tree always goes first
                    agent = agent_target(gpus, gpm, tree)
                    label = f"{agent.name}{tag}, scraped every {cadence:g} s #{r + 1}"
                    load = os.getloadavg()[0]
                    res = run_once(agent, exporter_target(binary), gpus, cadence, duration, warmup, logdir)
                    res["agent"], res["exporter"] = res.pop(agent.name), res.pop("node_exporter")
                    a, n = res["agent"], res["exporter"]
                    ratio = a["cpu_ms_min"] / n["cpu_ms_min"] if n["cpu_ms_min"] else float("inf")
                    res["ratio"] = ratio
                    flag = "  INVALID" if "invalid" in res else (f"  ({res['failed']} scrapes failed)" if res["failed"] else "")
                    print(f"{label:56} {a['cpu_ms_min']:12.0f} {n['cpu_ms_min']:15.0f} {ratio:6.2f} {a['rss_mib']:9.1f} "
                          f"{n['rss_mib']:12.1f} {res['probe_ms']:8.0f} {load:5.2f}{flag}", flush=True)
                    if a["ns_ms_min"] is not None and n["ns_ms_min"]:
                        ended = a["threads_ended"] + n["threads_ended"]
                        print(f"  {'threads on CPU, ns (schedstat)':54} {a['ns_ms_min']:12.1f} {n['ns_ms_min']:15.1f} "
                              f"{a['ns_ms_min'] / n['ns_ms_min']:6.2f}" + (f"  ({ended} threads ended: low)" if ended else ""))
                    if a["threads"]:
                        print("  the agent's threads, ms/min (schedstat): "
                              + ", ".join(f"{name} {ms:.1f}" for name, ms in a["threads"].items() if ms >= 0.05))
                    if "invalid" in res:
                        print(f"  not counted: {res['invalid']}")
                    else:
                        results[(tag, gpus, cadence)].append(res)

    print(f"\nmedians{'':49} {'agent ms/min':>12} {'node_exp ms/min':>15} {'ratio':>6} {'agent MiB':>9} {'node_exp MiB':>12}"
          f" {'KiB (gzip)':>14} {'series':>6} {'n_e KiB (gzip)':>16} {'n_e series':>10}")
    for gpus, cadence in rows:
        for tag, _ in trees:
            runs = results[(tag, gpus, cadence)]
            label = f"{agent_name(gpus, gpm)}{tag}, every {cadence:g} s"
            if not runs:
                print(f"{label:56} no valid run")
                continue
            a, n, last = median_of(runs, "agent"), median_of(runs, "exporter"), runs[-1]
            print(f"{label:56} {a['cpu_ms_min']:12.0f} {n['cpu_ms_min']:15.0f} {statistics.median(r['ratio'] for r in runs):6.2f} "
                  f"{a['rss_mib']:9.1f} {n['rss_mib']:12.1f} {last['agent']['kib']:7.1f} ({last['agent']['wire_kib']:4.1f}) "
                  f"{last['agent']['series']:6d} {last['exporter']['kib']:8.1f} ({last['exporter']['wire_kib']:4.1f}) "
                  f"{last['exporter']['series']:10d}")
            precise = [r for r in runs if r["agent"]["ns_ms_min"] is not None and r["exporter"]["ns_ms_min"]]
            if precise:
                a_ns = statistics.median(r["agent"]["ns_ms_min"] for r in precise)
                n_ns = statistics.median(r["exporter"]["ns_ms_min"] for r in precise)
                ratio_ns = statistics.median(r["agent"]["ns_ms_min"] / r["exporter"]["ns_ms_min"] for r in precise)
                print(f"  {'threads on CPU, ns (schedstat)':54} {a_ns:12.1f} {n_ns:15.1f} {ratio_ns:6.2f}")
                medians = {name: statistics.median(r["agent"]["threads"].get(name, 0.0) for r in precise)
                           for name in {name for r in precise for name in r["agent"]["threads"]}}
                medians = dict(sorted(medians.items(), key=lambda kv: -kv[1]))
                if medians:
                    print("  the agent's threads, ms/min (median of runs): "
                          + ", ".join(f"{name} {ms:.1f}" for name, ms in medians.items() if ms >= 0.05))
    print(f"\nload average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}; ratio = agent / node_exporter, "
          "median of the runs' ratios; CPU is user+system of each process tree over the same window; probe: CPU ms "
          f"of a fixed loop after each window (machine speed; {probe_ms():.0f} now)")
    if agent_code_digest() != digest:
        print("WARNING: the agent's source changed on disk during this run; its runs measured different code")


if __name__ == "__main__":
    main()
