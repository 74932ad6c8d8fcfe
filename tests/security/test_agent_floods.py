"""Floods and malformed input against a real agent's event socket, as the security review (issue 12) ran them.

The review: the agent's queue was bounded by count (200,000 events of up to 60 KB) under
MemoryMax=256M; 2,000 large events made a 16 MiB batch that the collector refused with 413 and the
agent dropped whole, with other users' events in it; deeply nested JSON cost a traceback per datagram.
Each test asserts that the attack fails and that another user's events around it arrive exactly once.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import fleetscope
from fleetscope.client import Emitter
from tests.conftest import free_port, http_get, wait_until
from tests.e2e.conftest import api, wait_until_agent_holds_nothing
from tests.security.conftest import INGEST, agent_metrics

MEMORY_MAX = 256 * 1024 * 1024  # the systemd unit's MemoryMax


def start_agent(procs, collector_url: str, spool: Path):
    metrics_port, events_port = free_port(), free_port(socket.SOCK_DGRAM)
    proc = procs("agent", [sys.executable, "-m", "fleetscope", "agent", "--node", "flood-node", "--gpu-backend", "simulated",
                           "--gpus", "1", "--interval", "1", "--metrics-address", f"127.0.0.1:{metrics_port}",
                           "--events-address", f"127.0.0.1:{events_port}", "--collector-url", collector_url,
                           "--spool-dir", str(spool)], {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    proc.events = ("127.0.0.1", events_port)
    wait_until(lambda: http_get(proc.metrics_url)[0] == 200, what="the agent's /metrics", timeout=30)
    return proc


def peak_rss(agent) -> int:
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def step_count(collector, job: str) -> int:
    jobs = {j["job"] for j in api(collector, "/v1/jobs")["jobs"]}
    return api(collector, f"/v1/jobs/{job}")["job"]["step_events"] if job in jobs else 0


def steps_once(collector, job: str, n: int) -> list[int]:
    series = api(collector, f"/v1/jobs/{job}/steps?last={n + 10}&max_points=10000")["steps"]
    assert {s["ranks"] for s in series} <= {1}, f"a step of {job} arrived twice"
    return [s["step"] for s in series]


def other_user(events, n: int, seconds: float, done: list) -> threading.Thread:
    """Another user's training job on the same node: n steps over `seconds`, from its own socket."""

    def run():
        job = fleetscope.training(job="bystander", rank=0, world_size=1, emitter=Emitter(events))
        for i in range(n):
            with job.step(number=i):
                pass
            time.sleep(seconds / n)
        done.append(True)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def big_step(i: int) -> dict:
    # ~8 KB: 600 custom metrics, as a job that reports per-layer figures might
    return {"v": 1, "kind": "step", "job": "big", "rank": 0, "world_size": 1, "step": i, "ts": time.time(),
            "duration_s": 0.1, "metrics": {f"layer{k:04d}_grad_norm": 1.0 for k in range(600)}}


def test_large_events_make_batches_the_collector_can_take_and_none_is_lost(procs, collector_with, tmp_path):
    # The review's 2,000 large events, against a collector whose body limit (1 MiB) is far below the agent's
    # batch size (4 MiB): the 413s are answered by halving, never by dropping another user's events.
    collector = collector_with('[collector]\nmax_body_bytes = "1MiB"\n')
    agent = start_agent(procs, collector.url, tmp_path / "spool")
    done: list = []
    bystander = other_user(agent.events, 200, 6.0, done)
    big = Emitter(agent.events)
    for i in range(2000):
        assert big.emit(big_step(i))
        time.sleep(0.003)  # 2.7 MB/s: under the per-sender byte rate, and the kernel buffer never overflows
    bystander.join()
    assert len(json.dumps(big_step(0))) > 8000 and big.dropped == 0

    wait_until(lambda: step_count(collector, "big") >= 2000 and step_count(collector, "bystander") >= 200, timeout=90,
               interval=0.5, what="every step of both jobs")
    wait_until_agent_holds_nothing(agent.metrics_url)  # a duplicate would have arrived by now
    assert steps_once(collector, "big", 2000) == list(range(2000))
    assert steps_once(collector, "bystander", 200) == list(range(200))
    m = agent_metrics(agent)
    assert m["fleetscope_agent_shipper_batches_split_total"] > 0
    assert m['fleetscope_agent_shipper_dropped_total{reason="rejected"}'] == 0
    assert m['fleetscope_agent_shipper_dropped_total{reason="too_large"}'] == 0
    assert "Traceback" not in agent.output()


def test_a_flooding_sender_is_held_to_its_rate_and_another_users_events_all_arrive(procs, collector, tmp_path, capsys):
    agent = start_agent(procs, collector.url, tmp_path / "spool")
    done: list = []
    bystander = other_user(agent.events, 200, 4.0, done)
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagram = json.dumps({"v": 1, "kind": "step", "job": "flood", "rank": 0, "world_size": 1, "step": 1,
                           "ts": time.time(), "duration_s": 0.1, "metrics": {"pad": 1.0}}).encode()
    sent, start = 0, time.monotonic()
    while not done:  # about 20,000 a second, four times the per-sender limit, for as long as the bystander runs
        for _ in range(200):
            flood.sendto(datagram, agent.events)
        sent += 200
        time.sleep(max(0.0, start + sent / 20_000 - time.monotonic()))
    elapsed = time.monotonic() - start
    flood.close()
    bystander.join()

    wait_until(lambda: step_count(collector, "bystander") >= 200, timeout=60, interval=0.5, what="the bystander's 200 steps")
    assert steps_once(collector, "bystander", 200) == list(range(200))
    m = agent_metrics(agent)
    limited = m['fleetscope_agent_events_rejected_total{reason="rate_limited"}']
    accepted = m['fleetscope_agent_events_received_total{kind="step"}'] - 200
    assert limited > 0.5 * sent, f"{limited:.0f} of {sent} flooded datagrams rate-limited"
    assert accepted <= 10_000 + 5_000 * elapsed * 1.2, f"the flooder got {accepted:.0f} events in {elapsed:.1f} s"
    peak = peak_rss(agent)
    assert peak < MEMORY_MAX / 2
    assert "Traceback" not in agent.output()
    with capsys.disabled():
        print(f"\nflood of {sent} datagrams in {elapsed:.1f} s from one sender: {accepted:.0f} accepted, {limited:.0f} "
              f"rate-limited; the other user's 200 steps all arrived; agent peak RSS {peak / 2**20:.0f} MiB")


def test_deeply_nested_datagrams_are_counted_with_one_log_line_not_a_traceback_each(procs, collector, tmp_path):
    agent = start_agent(procs, collector.url, tmp_path / "spool")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    nested = b'{"v":1,"kind":"step","job":"j","rank":0,"world_size":1,"step":0,"ts":1,"duration_s":1,"x":' + \
        b"[" * 25_000 + b"]" * 25_000 + b"}"
    for i in range(100):  # 5 MB: within one sender's burst, so the nesting itself is what refuses them
        sock.sendto(nested, agent.events)
        if i % 20 == 19:
            time.sleep(0.05)
    sock.close()
    key = 'fleetscope_agent_events_rejected_total{reason="too_deep"}'
    wait_until(lambda: agent_metrics(agent)[key] == 100, timeout=30, what="100 nested datagrams refused")
    job = fleetscope.training(job="after", rank=0, world_size=1, emitter=Emitter(agent.events))
    with job.step(number=0):
        pass
    wait_until(lambda: step_count(collector, "after") == 1, timeout=30, what="a good event after the nested ones")
    log = agent.output()
    assert "Traceback" not in log and "RecursionError" not in log
    assert log.count("refused a workload event") <= 2
