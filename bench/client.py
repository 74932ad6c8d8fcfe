"""What the workload client costs the training or serving thread, per event, against its peers.

Measured in the caller's thread, per event, with one timer (`time.perf_counter_ns`) around each:
- one training step as the README writes it (`with run.step(tokens=...) as step:` around three
  `run.phase(...)` blocks with empty bodies), which sends one datagram;
- one inference request (`with svc.request(...) as r: r.first_token(); r.finish(output_tokens=n)`).
The same two with `sendto` stubbed out show the client's own code apart from the kernel's send.
Peers, timed the same way in the same process and rounds (interleaved, so drift hits all alike):
- the floor: a bare `socket.sendto` of the very datagram the client sends, encoding excluded;
- prometheus_client, as an in-process instrumentation of the same event would use it: a Histogram
  `observe` of the duration and a Counter `inc` of the tokens, and the full equivalent (the step
  and its three phases in histograms via `.time()`; e2e, TTFT and TPOT histograms for a request);
- the `statsd` package's UDP client, the same figures in one pipelined datagram, when installed.
The datagrams go to a real UDP socket on loopback that another process drains, so the kernel
buffer never fills; the output says whether any datagram was lost. Two regimes, every subject in both:
- paced: one event every PERIOD us (spinning, untimed, in between), so the receiver is asleep when
  a datagram arrives, as an agent is between a job's steps; waking it is part of what `sendto` costs
  the sender (on a VM, several us). Every subject, in-process ones too, also runs slower here than
  back to back: as in a workload, other code runs between two events;
- back to back: the next event at once. The receiver is kept busy by the fastest senders, so a bare
  `sendto` is at its cheapest; slower subjects still wake it now and then.
CPU per event is the thread's CPU time (`time.thread_time_ns`) around each event, averaged. Goal
(issue #10): under 10 us median per event.

    python -m bench.client [--events 20000] [--rounds 5] [--period-us 100]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import socket
import statistics
import time
from typing import Callable

import fleetscope
from fleetscope.client import Emitter

TOKENS, INPUT_TOKENS, OUTPUT_TOKENS = 4096, 512, 128
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's number; Python names it on few builds
PHASES = ("data", "forward", "backward")


def drain(conn) -> None:
    """Receiver process: count datagrams; answer the count once the socket has been idle a while."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Room for a whole back-to-back round (20,000 datagrams of about 1 KiB each in kernel memory), so
    # that none is dropped while this process catches up; past net.core.rmem_max only as root.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 26)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 26)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    conn.send((sock.getsockname(), sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)))
    buffer = bytearray(65535)
    count = 0
    while True:
        try:
            sock.recv_into(buffer)
            count += 1
        except socket.timeout:
            if conn.poll():
                if conn.recv() == "stop":
                    conn.send(count)
                    return
                conn.send(count)


class NoSend:
    """A socket that sends nothing: what remains of an event's cost is the client's own code."""

    def sendto(self, data: bytes, address) -> int:
        return len(data)


def stubbed_emitter(address) -> Emitter:
    emitter = Emitter(address)
    emitter._sock, emitter._pid = NoSend(), os.getpid()  # the socket a live emitter has made for this process
    return emitter


def capture(make_event: Callable[[Emitter], Callable[[], None]]) -> bytes:
    """The datagram one event of the client sends, for the floor to send the same bytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    with sock:
        make_event(Emitter(sock.getsockname()))()
        return sock.recv(65535)


def fleetscope_step(emitter: Emitter) -> Callable[[], None]:
    run = fleetscope.training(job="llama3-70b", rank=3, world_size=64, local_rank=3, emitter=emitter)

    def event() -> None:
        with run.step(tokens=TOKENS) as step:  # noqa: F841 (as the README writes it)
            with run.phase("data"):
                pass
            with run.phase("forward"):
                pass
            with run.phase("backward"):
                pass
    return event


def fleetscope_request(emitter: Emitter) -> Callable[[], None]:
    svc = fleetscope.inference(service="chat", model="llama3-8b", emitter=emitter)

    def event() -> None:
        with svc.request(input_tokens=INPUT_TOKENS) as r:
            r.first_token()
            r.finish(output_tokens=OUTPUT_TOKENS)
    return event


def bare_sendto(address, datagram: bytes) -> Callable[[], None]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)

    def event() -> None:
        sock.sendto(datagram, address)
    return event


def prometheus_events() -> dict[str, Callable[[], None]]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    step_seconds = Histogram("train_step_duration_seconds", "step", registry=registry)
    phase_seconds = Histogram("train_phase_duration_seconds", "phase", ["phase"], registry=registry)
    phases = [phase_seconds.labels(name) for name in PHASES]
    tokens = Counter("train_tokens", "tokens", registry=registry)
    e2e = Histogram("request_duration_seconds", "e2e", registry=registry)
    ttft = Histogram("request_ttft_seconds", "ttft", registry=registry)
    tpot = Histogram("request_tpot_seconds", "tpot", registry=registry)
    output_tokens = Counter("request_output_tokens", "tokens", registry=registry)
    clock = time.perf_counter

    def step_minimal() -> None:
        t0 = clock()
        step_seconds.observe(clock() - t0)
        tokens.inc(TOKENS)

    def step_full() -> None:
        with step_seconds.time():
            with phases[0].time():
                pass
            with phases[1].time():
                pass
            with phases[2].time():
                pass
        tokens.inc(TOKENS)

    def request_minimal() -> None:
        t0 = clock()
        e2e.observe(clock() - t0)
        output_tokens.inc(OUTPUT_TOKENS)

    def request_full() -> None:
        t0 = clock()
        first = clock()
        end = clock()
        e2e.observe(end - t0)
        ttft.observe(first - t0)
        tpot.observe((end - first) / (OUTPUT_TOKENS - 1))
        output_tokens.inc(OUTPUT_TOKENS)

    return {"step_minimal": step_minimal, "step_full": step_full,
            "request_minimal": request_minimal, "request_full": request_full}


def statsd_events(address) -> dict[str, Callable[[], None]] | None:
    try:
        import statsd
    except ImportError:
        return None
    client = statsd.StatsClient(address[0], address[1], prefix="train")
    clock = time.perf_counter

    def step() -> None:
        with client.pipeline() as pipe:  # one datagram, as the client sends one
            t0 = clock()
            for name in PHASES:
                p0 = clock()
                pipe.timing(f"phase.{name}", (clock() - p0) * 1000)
            pipe.timing("step", (clock() - t0) * 1000)
            pipe.incr("tokens", TOKENS)

    def request() -> None:
        with client.pipeline() as pipe:
            t0 = clock()
            first = clock()
            end = clock()
            pipe.timing("e2e", (end - t0) * 1000)
            pipe.timing("ttft", (first - t0) * 1000)
            pipe.timing("tpot", (end - first) * 1000 / (OUTPUT_TOKENS - 1))
            pipe.incr("output_tokens", OUTPUT_TOKENS)

    return {"step": step, "request": request}


def measure(event: Callable[[], None], n: int, period_ns: int = 0) -> tuple[list[int], int]:
    """Wall time of each of `n` calls (ns), one call every `period_ns` at most, and their CPU time (ns)."""
    wall = [0] * n
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    cpu = 0
    for i in range(n):
        c = cpu_clock()
        t = clock()
        event()
        end = clock()
        cpu += cpu_clock() - c
        wall[i] = end - t
        while clock() < t + period_ns:  # spin, so that the wait is not a sleep the scheduler sees
            pass
    return wall, cpu


def quantile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_regime(subjects: dict[str, Callable[[], None]], events: int, rounds: int, period_ns: int) -> dict:
    """Each subject `rounds` times, interleaved: {name: (median us, p99 us, CPU us, [round medians])}."""
    walls: dict[str, list[int]] = {name: [] for name in subjects}
    cpus = dict.fromkeys(subjects, 0)
    round_medians: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(rounds):
        for name, event in subjects.items():
            wall, cpu = measure(event, events, period_ns)
            walls[name] += wall
            cpus[name] += cpu
            round_medians[name].append(statistics.median(wall) / 1000)
        gc.collect()
    rows = {}
    for name, wall in walls.items():
        wall.sort()
        rows[name] = (quantile(wall, 0.5) / 1000, quantile(wall, 0.99) / 1000, cpus[name] / len(wall) / 1000,
                      round_medians[name])
    return rows


def report(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"  {'subject':46} {'median us':>9} {'p99 us':>8} {'CPU us':>7}  round medians us")
    for name, (median, p99, cpu, spread) in rows.items():
        print(f"  {name:46} {median:9.2f} {p99:8.2f} {cpu:7.2f}  {' '.join(f'{m:.2f}' for m in spread)}")
    print("  ratios of medians (fleetscope / peer; below 1: fleetscope costs less):")
    for kind, ours_name in (("step", STEP), ("request", REQUEST)):
        for peer in rows:
            if peer.startswith(("bare", "prometheus", "statsd")) and kind in peer:
                print(f"    {ours_name:28} / {peer:44} {rows[ours_name][0] / rows[peer][0]:5.2f}")


STEP, REQUEST = "fleetscope step (3 phases)", "fleetscope request"
STUBBED_STEP, STUBBED_REQUEST = "fleetscope step, sendto stubbed", "fleetscope request, sendto stubbed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per subject per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--period-us", type=float, default=100.0, help="one event every this many us when paced")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    receiver = ctx.Process(target=drain, args=(theirs,), daemon=True)
    receiver.start()
    theirs.close()  # so that a receiver that dies is an EOFError here, not a wait for ever
    address, receive_buffer = ours.recv()
    address = tuple(address)

    emitter = Emitter(address)
    subjects: dict[str, Callable[[], None]] = {
        "nothing (timer and call overhead)": lambda: None,
        STEP: fleetscope_step(emitter),
        REQUEST: fleetscope_request(emitter),
        STUBBED_STEP: fleetscope_step(stubbed_emitter(address)),
        STUBBED_REQUEST: fleetscope_request(stubbed_emitter(address)),
        "bare sendto, step datagram": bare_sendto(address, capture(fleetscope_step)),
        "bare sendto, request datagram": bare_sendto(address, capture(fleetscope_request)),
    }
    prom = prometheus_events()
    subjects["prometheus step: observe + inc"] = prom["step_minimal"]
    subjects["prometheus step: 4 histograms + inc"] = prom["step_full"]
    subjects["prometheus request: observe + inc"] = prom["request_minimal"]
    subjects["prometheus request: 3 histograms + inc"] = prom["request_full"]
    statsd = statsd_events(address)
    if statsd is not None:
        subjects["statsd step: 4 timings + incr, 1 datagram"] = statsd["step"]
        subjects["statsd request: 3 timings + incr, 1 datagram"] = statsd["request"]
    # One datagram an event from each of these.
    senders = [name for name in subjects if name.startswith(("fleetscope", "bare", "statsd")) and "stubbed" not in name]

    warmup = min(2000, args.events)
    for event in subjects.values():  # caches, first sockets, lazily built objects
        measure(event, warmup)
    period_ns = int(args.period_us * 1000)
    paced = run_regime(subjects, args.events, args.rounds, period_ns)
    back_to_back = run_regime(subjects, args.events, args.rounds, 0)

    ours.send("stop")
    received = ours.recv()
    receiver.join(timeout=10)
    expected = (warmup + 2 * args.rounds * args.events) * len(senders)

    print(f"client cost per event, in the caller's thread: {args.rounds} rounds x {args.events:,} events"
          f" per subject and regime")
    report(f"paced: one event every {args.period_us:g} us, the receiver asleep between events (as between steps)",
           paced)
    report("back to back: the next event at once", back_to_back)
    if statsd is None:
        print("statsd: not installed (pip install statsd to add it as a peer)")

    print(f"\ndatagrams: {expected:,} sent to the receiver, {received:,} received, {expected - received:,} lost"
          f" (receive buffer {receive_buffer / 2**20:.0f} MiB; client send failures counted: {emitter.dropped})")
    for title, rows in (("paced", paced), ("back to back", back_to_back)):
        worst = max(rows[STEP][0], rows[REQUEST][0])
        print(f"goal (issue #10), under 10 us median per event, {title}: {'met' if worst < 10 else 'NOT met'}"
              f" ({worst:.2f} us)")


if __name__ == "__main__":
    main()
