"""Collector ingest throughput and acknowledgement latency, against the floor of its own HTTP stack.

A real collector process (`python -m fleetscope collector`, WAL fsync on) receives batches of
--batch step events (batch/8 steps of an 8-rank job, four phases each) from --senders separate
processes, each its own agent (own token, own agent_id, increasing seq) and its own job, posting
over one keep-alive httpx connection, one batch in flight at a time, as the agent's shipper does.
Bodies are built from a template encoded once with fleetscope's schema; per batch only seq, step
numbers and timestamps are patched in, so a sender costs little CPU next to the server it drives.

Two modes, after --warmup seconds, for --seconds:
- saturation: each sender posts its next batch as soon as the previous one is acknowledged;
  events/s acknowledged and ack latency (send to ack) p50/p99;
- paced: the senders together offer --rate events/s on a fixed schedule; latency is measured from
  each batch's scheduled send time, so a sender that falls behind shows as latency rather than as
  a quietly lower rate (no coordinated omission); batches scheduled in the window are sent even
  if the window has passed.
The peer, measured in the same run with the same senders and bodies: a minimal FastAPI + uvicorn
app (uvicorn as collector/main.py runs it) whose handler reads the body, appends it to a file and
fsyncs under a lock in a worker thread: the WAL's work without decoding or storing. Each target
gets a fresh process and data folder per mode. At the end the bench checks that the collector
holds every event it acknowledged (its /metrics counter and GET /v1/jobs). Goal (issue #10):
at least 200,000 events/s on the 2-core machine, p99 under 50 ms at half that rate.

Each mode runs --repeats times (3 by default; collector then floor, each run), every run is printed,
and then the range and median of each figure and in how many runs the goal was met: one run says
little on a shared VM (the same tree, alternated with itself, gave a paced p99 of 50 ms in one run
and 1,574 ms in the next).

    python -m bench.ingest [--mode both|saturation|paced] [--repeats 3] [--seconds 20] [--senders 4]
                           [--batch 1000] [--rate 100000] [--profile collector.txt]

--breakdown times the same bodies through the collector's ingest path in this one process, one
batch at a time, stage by stage (decode, input bounds, frame building, WAL append with its fsync,
goodput ledger, hot tier, each observer, metrics): the milliseconds per batch of each stage, median
of --batches batches spread over --senders agents, and the events/s that one core could take if
nothing else ran (no HTTP, no GIL contention). Load-independent enough to compare commits:

    python -m bench.ingest --breakdown [--batches 300] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import uvicorn
from fastapi import FastAPI, Request

REPO = Path(__file__).resolve().parents[1]
READ_TOKEN = "bench-read"
RANKS_PER_NODE = 8
SLOW_S = 0.05  # the p99 goal: batches slower than this are counted and placed in time
PHASES = {"data": 0.02, "forward": 0.09, "backward": 0.17, "optimizer": 0.02}
# Sentinels patched per batch: step = <batch number><3-digit step in batch>, ts = <whole second>.<ms>.
_STEP_SENTINEL, _TS_SENTINEL, _SEQ_SENTINEL = 987654, 4242424242, 876543210987


def ingest_token(sender: int) -> str:
    return f"bench-ingest-{sender}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the bodies ---------------------------------------------------------------------------------
def batch_template(sender: int, batch: int) -> bytes:
    """One body with sentinels where seq, step numbers and timestamps go."""
    from fleetscope.schema import Batch, StepEvent, encode

    steps = -(-batch // RANKS_PER_NODE)
    if steps > 1000:
        raise ValueError(f"--batch {batch}: at most {1000 * RANKS_PER_NODE} events (1000 steps of {RANKS_PER_NODE} ranks)")
    node = f"bench-node-{sender}"
    events = [
        StepEvent(v=1, job=f"bench-{sender}", rank=r, world_size=RANKS_PER_NODE,
                  step=_STEP_SENTINEL * 1000 + s, ts=_TS_SENTINEL + s / 1000, duration_s=0.3, local_rank=r,
                  phases=PHASES, node=node)
        for s in range(steps) for r in range(RANKS_PER_NODE)
    ][:batch]
    return encode(Batch(v=1, agent_id=f"bench-agent-{sender}", seq=_SEQ_SENTINEL, node=node, sent_ts=_TS_SENTINEL + 0.5,
                        events=events))


class Bodies:
    """Bodies from one template: its sentinels cut out once, each body one join (~0.1 ms for 1,000 events)."""

    _SLOT = re.compile(rb'("seq":)%d|("step":)%d|(_?ts":)%d(?=\.)' % (_SEQ_SENTINEL, _STEP_SENTINEL, _TS_SENTINEL))

    def __init__(self, template: bytes) -> None:
        self._pieces: list[bytes] = []
        self._slots: dict[int, list[int]] = {1: [], 2: [], 3: []}  # seq, step prefix, whole second
        last = 0
        for m in self._SLOT.finditer(template):
            self._pieces.append(template[last:m.end(m.lastindex)])
            self._slots[m.lastindex].append(len(self._pieces))
            self._pieces.append(b"")
            last = m.end()
        self._pieces.append(template[last:])

    def make(self, seq: int, now: float) -> bytes:
        # Steps ~1 ms apart ending before `now`: inside any window, never in the future.
        pieces = self._pieces
        for slot, value in ((1, b"%d" % seq), (2, b"%d" % seq), (3, b"%d" % (int(now) - 1))):
            for i in self._slots[slot]:
                pieces[i] = value
        return b"".join(pieces)


# --- senders (separate processes) ---------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    url: str
    mode: str
    senders: int
    batch: int
    rate: float
    warmup: float
    seconds: float
    drain: float  # paced: how long past the window a late sender may go on sending its backlog


def sender(index: int, plan: Plan, barrier, start, results) -> None:
    from fleetscope.schema import decode_batch

    bodies = Bodies(batch_template(index, plan.batch))
    first = decode_batch(bodies.make(1, time.time()))  # the bodies are valid, once, before the clock
    assert len(first.events) == plan.batch and first.seq == 1
    headers = {"authorization": f"Bearer {ingest_token(index)}", "content-type": "application/json"}
    records: list[tuple[float, float, int]] = []  # (scheduled or sent, acknowledged, events); ack -1 when refused
    errors: Counter[str] = Counter()
    interval = plan.senders * plan.batch / plan.rate if plan.mode == "paced" else 0.0
    with httpx.Client(timeout=30.0) as client:
        client.get(plan.url + "/healthz")  # open the keep-alive connection before the clock
        barrier.wait()  # every sender is ready ...
        barrier.wait()  # ... and the start time is set
        t0 = start.value
        end = t0 + plan.warmup + plan.seconds
        cpu = time.process_time()
        seq = 0
        while True:
            seq += 1
            now = time.monotonic()
            if plan.mode == "paced":
                due = t0 + (index / plan.senders + seq - 1) * interval
                if due >= end:
                    break
                if now > end + plan.drain:  # the rest count as never acknowledged: infinite latency
                    late = [(t, float("inf"), plan.batch) for t in (due + k * interval for k in range(int((end - due) / interval) + 1)) if t < end]
                    errors[f"not sent: more than {plan.drain:g} s behind schedule"] += len(late)
                    records.extend(late)
                    break
                if due > now:
                    time.sleep(due - now)
            else:
                due = now
                if due >= end:
                    break
            body = bodies.make(seq, time.time())
            try:
                r = client.post(plan.url + "/v1/ingest", content=body, headers=headers)
                acked = time.monotonic()
                if r.status_code != 200:
                    errors[f"HTTP {r.status_code}: {r.text[:200]}"] += 1
                    acked = -1.0
                elif r.headers.get("content-type", "").startswith("application/json") and r.json().get("duplicate"):
                    errors["acknowledged as a duplicate"] += 1
            except httpx.HTTPError as exc:
                errors[f"{type(exc).__name__}: {exc}"] += 1
                acked = -1.0
            records.append((due, acked, plan.batch))
        cpu = (time.process_time() - cpu) / max(1, seq - 1)
    results.put((index, records, cpu, dict(errors)))


def drive(plan: Plan, watch) -> dict:
    """Run the senders; `watch(window)` runs in a thread meanwhile (the measured window, monotonic)."""
    ctx = mp.get_context("spawn")
    barrier, start, results = ctx.Barrier(plan.senders + 1), ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=sender, args=(i, plan, barrier, start, results), daemon=True) for i in range(plan.senders)]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    t0 = start.value = time.monotonic() + 0.2
    barrier.wait(timeout=10)
    watcher = threading.Thread(target=watch, args=((t0 + plan.warmup, t0 + plan.warmup + plan.seconds),))
    watcher.start()
    got = [results.get(timeout=plan.warmup + plan.seconds + plan.drain + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    watcher.join()
    window, end = t0 + plan.warmup, t0 + plan.warmup + plan.seconds
    latencies, in_window, acked_total, refused, slow = [], 0, 0, 0, []
    errors: Counter[str] = Counter()
    for _, records, _, errs in got:
        errors.update(errs)
        for due, acked, n in records:
            if acked < 0:
                refused += n
                continue
            if acked == float("inf"):
                if window <= due < end:
                    latencies.append(acked)
                continue
            acked_total += n
            if window <= acked <= end:
                in_window += n
            if window <= due < end:
                latencies.append(acked - due)
                if acked - due > SLOW_S:
                    slow.append(due - window)
    latencies.sort()
    return {"rate": in_window / plan.seconds, "p50": pct(latencies, 50), "p99": pct(latencies, 99), "max": latencies[-1] if latencies else float("nan"),
            "acked": acked_total, "refused": refused, "errors": errors, "sender_ms": 1000 * sum(g[2] for g in got) / len(got),
            "slow": bursts(sorted(slow)), "batches": len(latencies)}


def bursts(times: list[float], gap: float = 0.5) -> list[tuple[float, int]]:
    """Slow batches grouped into bursts (scheduled less than `gap` s apart): (when in the window, how many)."""
    out: list[tuple[float, int]] = []
    for t in times:
        if out and t - last <= gap:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((t, 1))
        last = t
    return out


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


# --- the floor: the same HTTP stack, appending and fsyncing the body ----------------------------
def serve_floor(host: str, port: int, log_path: str) -> None:
    app = FastAPI()
    fh = open(log_path, "ab")
    lock = threading.Lock()
    header = struct.Struct(">I")

    def append(body: bytes) -> None:
        with lock:
            fh.write(header.pack(len(body)) + body)
            fh.flush()
            os.fsync(fh.fileno())

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/ingest")
    async def ingest(request: Request) -> dict:
        body = await request.body()
        await asyncio.to_thread(append, body)
        return {"bytes": len(body)}

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)  # as collector/main.py


def floor_records(log_path: Path) -> int:
    data, offset, n = log_path.read_bytes(), 0, 0
    while offset + 4 <= len(data):
        offset += 4 + struct.unpack_from(">I", data, offset)[0]
        n += 1
    return n


# --- in-process breakdown -----------------------------------------------------------------------
def breakdown(batch: int, batches: int, senders: int, fsync: bool = True) -> dict[str, list[float]]:
    """Each stage of Store.ingest (and the route around it) timed per batch, in the order the route runs them."""
    from collector.api.app import create_app
    from collector.bounds import screen
    from collector.settings import Settings
    from collector.tables import batch_frames
    from fleetscope.schema import decode_batch

    times: dict[str, list[float]] = {}
    clock = time.perf_counter
    with tempfile.TemporaryDirectory(prefix="bench-ingest-breakdown-") as tmp:
        app = create_app(Settings(data_dir=Path(tmp), fsync=fsync, ingest_tokens=frozenset({ingest_token(0)}),
                                  read_tokens=frozenset({READ_TOKEN})))
        store, metrics = app.state.store, app.state.metrics
        store.open()
        # Bound methods by their class (SlurmLinks), the app's SLO closure by where it is defined.
        observers = [(type(o.__self__).__name__ if hasattr(o, "__self__") else o.__qualname__.replace(".<locals>", ""), o)
                     for o in store.observers]
        bodies = [Bodies(batch_template(i, batch)) for i in range(senders)]
        for n in range(batches):
            body = bodies[n % senders].make(n // senders + 1, time.time())
            stages: list[tuple[str, float]] = []
            t = clock()

            def lap(name: str) -> None:
                nonlocal t
                now = clock()
                stages.append((name, now - t))
                t = now

            b = decode_batch(body)
            lap("decode")
            screened = screen(b, time.time(), store.bounds, store.steps_seen)
            lap("bounds")
            assert not screened.refused, screened.listed[:1]
            frames = batch_frames(b)
            lap("frames")
            store.wal.ensure_open()
            store.wal.append(body)
            lap("WAL append + fsync" if fsync else "WAL append")
            frames = store._tag(frames)
            lap("goodput ledger")
            with store._gate:
                store._apply(b, frames, screened.highs)
            lap("hot tier")
            for kind, frame in frames.items():
                if kind != "steps":
                    store.goodput.observe(kind, frame)
            for name, observe in observers:
                for kind, frame in frames.items():
                    observe(kind, frame)
                lap(f"observer {name}")
            metrics.ingested(b, False, {"step": frames["steps"].height})
            lap("metrics")
            for name, dt in stages:
                times.setdefault(name, []).append(dt)
            times.setdefault("total", []).append(sum(dt for _, dt in stages))
            if n % 50 == 49:
                store.maintain_hot()  # as the analysis pass does every few seconds: merges the small frames
        store.wal.close()
    return times


def print_breakdown(args) -> None:
    import statistics

    load = os.getloadavg()[0]
    print(f"ingest breakdown: one process, {args.batches} batches of {args.batch} step events over {args.senders} agents, "
          f"WAL {'fsync on' if not args.no_fsync else 'without fsync'}; load average {load:.2f} on {os.cpu_count()} cores")
    breakdown(args.batch, min(args.batches, 20), args.senders, not args.no_fsync)  # imports and first-call costs
    times = breakdown(args.batch, args.batches, args.senders, not args.no_fsync)
    # The mean counts the cycle collector's pauses, which land on whichever stage allocates at the time.
    print(f"  {'stage':30} {'median ms':>10} {'mean ms':>8} {'p90 ms':>8}")
    for name, values in times.items():
        values = sorted(values)
        if name == "total":
            print(f"  {'':30} {'-' * 10} {'-' * 8} {'-' * 8}")
        print(f"  {name:30} {statistics.median(values) * 1000:10.3f} {statistics.fmean(values) * 1000:8.3f} "
              f"{values[int(0.9 * len(values))] * 1000:8.3f}")
    median, mean = statistics.median(times["total"]), statistics.fmean(times["total"])
    print(f"  upper bound on one core: {args.batch / median:,.0f} events/s by the median, {args.batch / mean:,.0f} by the mean "
          "(goal: 200,000 events/s through HTTP)")


# --- targets -------------------------------------------------------------------------------------
COLLECTOR_FLAGS: list[str] = []  # --collector-flag: passed to the collector's command line


def start(target: str, data_dir: Path, port: int, senders: int, tree: Path) -> subprocess.Popen:
    env = dict(os.environ, FLEETSCOPE_INGEST_TOKEN=",".join(ingest_token(i) for i in range(senders)),
               FLEETSCOPE_READ_TOKEN=READ_TOKEN)
    if target == "collector":
        argv = [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                *COLLECTOR_FLAGS]
    else:
        argv = [sys.executable, "-m", "bench.ingest", "--serve-floor", f"127.0.0.1:{port}", str(data_dir / "floor.log")]
    proc = subprocess.Popen(argv, env=env, cwd=tree if target == "collector" else REPO, stdout=subprocess.DEVNULL,
                            stderr=open(data_dir / "stderr.txt", "wb"))
    deadline = time.monotonic() + 120
    while True:  # 200 only: a collector answers 503 while it replays its log
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{target} did not become ready: {(data_dir / 'stderr.txt').read_text()[-2000:]}")
        time.sleep(0.2)


def holds(port: int) -> tuple[float, int, dict[str, float]]:
    """The collector's own count of step events applied, the step events GET /v1/jobs shows, and the batches
    decoded by its ingest workers and by itself."""
    h = {"authorization": f"Bearer {READ_TOKEN}"}
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=h, timeout=60).text
    m = re.search(r'^fleetscope_collector_events_ingested_total\{kind="step"\} (\S+)$', metrics, re.M)
    jobs = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers=h, timeout=120).json()["jobs"]
    decoded = dict(re.findall(r'^fleetscope_collector_batches_decoded_total\{where="(\w+)"\} (\S+)$', metrics, re.M))
    return ((float(m.group(1)) if m else float("nan")), sum(j.get("step_events", 0) for j in jobs if j["job"].startswith("bench-")),
            {k: float(v) for k, v in decoded.items()})


def profile(pid: int, window: tuple[float, float], out: Path, gil: bool = False) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("--profile: py-spy is not installed (pip install py-spy); no profile this run")
        return None
    time.sleep(max(0.0, window[0] - time.monotonic()))
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(window[1] - window[0])), "--rate", "100",
                             "--nonblocking", "--format", "raw", "-o", str(out), *(["--gil"] if gil else [])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(raw: Path, n: int = 12) -> list[str]:
    """Where the collector's busy threads were sampled: share of samples in each function, and including callees."""
    own, total, samples = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # per function, not per line
        if not frames:
            continue
        samples += int(count)
        own[frames[-1]] += int(count)
        for f in set(frames):
            total[f] += int(count)
    out = [f"  own   {c / samples:6.1%}  {f}" for f, c in own.most_common(n)]
    interesting = [(f, c) for f, c in total.most_common(80) if re.search(r"\((collector/(?!main\.py)|fleetscope/schema)", f)]
    return out + [f"  incl. {c / samples:6.1%}  {f}" for f, c in interesting[:n]]


def cpu_of(processes: list[psutil.Process]) -> float:
    """User+system CPU seconds of these processes (one that has ended counts as 0: the window then says less)."""
    total = 0.0
    for p in processes:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def measure(target: str, plan_args: dict, senders: int, profile_to: Path | None, tree: Path, gil: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-ingest-{target}-") as tmp:
        port = free_port()
        proc = start(target, Path(tmp), port, senders, tree)
        try:
            plan = Plan(url=f"http://127.0.0.1:{port}", senders=senders, **plan_args)
            ps = psutil.Process(proc.pid)
            box: dict = {}

            def watch(window: tuple[float, float]) -> None:  # the server's CPU (and stacks) across the window
                spy = profile(proc.pid, window, profile_to, gil) if profile_to else None
                time.sleep(max(0.0, window[0] - time.monotonic()))
                tree = [ps, *ps.children(recursive=True)]  # the collector's ingest workers (collector.decoders) too
                c0 = cpu_of(tree)
                time.sleep(max(0.0, window[1] - time.monotonic()))
                box["cpu"] = (cpu_of(tree) - c0) / plan.seconds
                if spy:
                    spy.wait(timeout=60)

            result = drive(plan, watch)
            result["server_cpu"] = box.get("cpu", float("nan"))
            if target == "collector":
                result["counter"], result["jobs"], result["decoded"] = holds(port)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        if target == "floor":
            result["records"] = floor_records(Path(tmp) / "floor.log") * plan.batch
        return result


def report(target: str, r: dict) -> None:
    print(f"  {target:9} {r['rate']:12,.0f} {r['p50'] * 1000:8.1f} {r['p99'] * 1000:8.1f} {r['max'] * 1000:8.1f} "
          f"{r['server_cpu']:10.0%} {r['sender_ms']:13.2f}")
    if r.get("slow"):
        print(f"  {target}: {sum(n for _, n in r['slow'])} of {r['batches']} batches over {SLOW_S * 1000:.0f} ms, in bursts at "
              + ", ".join(f"{t:.1f} s ({n})" for t, n in r["slow"][:12]) + (" ..." if len(r["slow"]) > 12 else ""))
    for err, count in r["errors"].items():
        print(f"  {target}: {count} batches: {err}")
    if target == "collector":
        ok = r["counter"] >= r["acked"] and r["jobs"] >= r["acked"]  # a counter renamed away reads NaN: not ok
        print(f"  collector holds: {r['counter']:,.0f} step events by its counter, {r['jobs']:,} in GET /v1/jobs, "
              f"of {r['acked']:,} acknowledged: {'all there' if ok else 'MISSING EVENTS'}")
        d = r.get("decoded") or {}
        print(f"  collector decoded {d.get('worker', 0):,.0f} batches in its ingest workers, {d.get('collector', 0):,.0f} itself")
    else:
        print(f"  floor log holds {r['records']:,} events of {r['acked']:,} acknowledged")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["both", "saturation", "paced"], default="both")
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode (collector, then floor, each run): every "
                   "run is printed, then the range, the median and in how many runs the goal was met")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode and target")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--batch", type=int, default=1000, help="step events per batch")
    p.add_argument("--rate", type=float, default=100_000.0, help="paced mode: events/s offered by all senders together")
    p.add_argument("--drain", type=float, default=30.0, help="paced mode: seconds a late sender may go on past the window")
    p.add_argument("--collector-flag", action="append", default=[], metavar="FLAG",
                   help="a flag for the collector's command line, e.g. --collector-flag=--ingest-processes=0 (repeatable)")
    p.add_argument("--no-floor", action="store_true", help="measure the collector only (comparing its settings; "
                   "the ratios and the goal need the floor)")
    p.add_argument("--gil", action="store_true", help="--profile samples only the thread holding the GIL (py-spy --gil)")
    p.add_argument("--profile", type=Path, help="py-spy the collector through the saturation window (the paced one with "
                   "--mode paced): raw stacks here, top frames printed")
    p.add_argument("--collector-tree", type=Path, default=REPO,
                   help="run the collector from this source tree (e.g. `git archive <commit>` unpacked): before/after a change")
    p.add_argument("--breakdown", action="store_true", help="time each stage of the ingest path in this process instead")
    p.add_argument("--batches", type=int, default=300, help="--breakdown: batches timed (the median is printed)")
    p.add_argument("--no-fsync", action="store_true", help="--breakdown: the WAL without its fsync")
    p.add_argument("--serve-floor", nargs=2, metavar=("HOST:PORT", "LOG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_floor:
        host, _, port = args.serve_floor[0].rpartition(":")
        serve_floor(host, int(port), args.serve_floor[1])
        return
    if args.breakdown:
        print_breakdown(args)
        return

    body = Bodies(batch_template(0, args.batch)).make(1, time.time())
    print(f"ingest: {os.cpu_count()} cores, {args.senders} senders, batches of {args.batch} step events "
          f"({len(body):,} bytes), {args.warmup:g} s warm-up + {args.seconds:g} s per mode and target")
    COLLECTOR_FLAGS[:] = args.collector_flag
    if args.collector_flag:
        print(f"collector flags: {' '.join(args.collector_flag)}")
    if args.collector_tree.resolve() != REPO:
        print(f"collector from {args.collector_tree}")
    modes = ["saturation", "paced"] if args.mode == "both" else [args.mode]
    for mode in modes:
        plan_args = dict(mode=mode, batch=args.batch, rate=args.rate, warmup=args.warmup, seconds=args.seconds, drain=args.drain)
        print(f"\n{mode}" + (f": {args.rate:,.0f} events/s offered, latency from each batch's scheduled send time" if mode == "paced"
                              else ": each sender posts again as soon as it is acknowledged"))
        print(f"  {'':9} {'events/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'server CPU':>10} {'sender ms/batch':>13}")
        spy_out = args.profile if mode == "saturation" or args.mode == "paced" else None  # --mode paced: the paced window
        runs: list[dict[str, dict]] = []
        for run in range(args.repeats):
            if args.repeats > 1:
                print(f"  run {run + 1} of {args.repeats}")
            spy = spy_out if run == 0 else None  # the first run's window only
            rows = {t: measure(t, plan_args, args.senders, spy if t == "collector" else None, args.collector_tree,
                                args.gil)
                    for t in ("collector", "floor") if t == "collector" or not args.no_floor}
            runs.append(rows)
            for target, r in rows.items():
                report(target, r)
            if not args.no_floor:
                c, f = rows["collector"], rows["floor"]
                print(f"  collector / floor: events/s x{ratio(c['rate'], f['rate'])}, p50 x{ratio(c['p50'], f['p50'])}, "
                      f"p99 x{ratio(c['p99'], f['p99'])}")
            print(f"  goal: {goal_text(mode, args.rate)}: {'met' if goal_met(mode, rows['collector'], args.rate) else 'not met'}")
        if args.repeats > 1:
            summarize(mode, runs, args.rate)
        print_profile(spy_out, mode)


def goal_text(mode: str, rate: float) -> str:
    return ">= 200,000 events/s" if mode == "saturation" else f"p99 < 50 ms at {rate:,.0f} events/s offered"


def goal_met(mode: str, c: dict, rate: float) -> bool:
    if mode == "saturation":
        return c["rate"] >= 200_000
    return c["p99"] < 0.050 and c["rate"] >= 0.98 * rate


def summarize(mode: str, runs: list[dict[str, dict]], rate: float) -> None:
    """Every run counts: the range and median of each figure, and in how many runs the goal was met."""
    print(f"  over {len(runs)} runs:")
    for target in runs[0]:
        for key, scale, unit, digits in (("rate", 1, "events/s", 0), ("p99", 1000, "ms p99", 1)):
            values = sorted(r[target][key] * scale for r in runs)
            print(f"    {target:9} {unit:9} {values[0]:12,.{digits}f} .. {values[-1]:,.{digits}f}, "
                  f"median {statistics.median(values):,.{digits}f}")
    met = sum(goal_met(mode, r["collector"], rate) for r in runs)
    print(f"    goal ({goal_text(mode, rate)}) met in {met} of {len(runs)} runs")


def print_profile(spy_out: Path | None, mode: str) -> None:
    if spy_out and spy_out.exists():
        print(f"  where the collector spent the {mode} window (py-spy, {spy_out}):")
        print("\n".join(top_frames(spy_out)))


if __name__ == "__main__":
    main()
