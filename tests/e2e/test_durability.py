"""What the collector acknowledges survives kill -9; what agents produce during an outage arrives once."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

import httpx

import fleetscope
from fleetscope.client import Emitter
from tests.conftest import free_port, http_get, wait_until
from tests.e2e.conftest import INGEST, READ, gauge, api, wait_until_agent_holds_nothing

EVENTS_PER_BATCH = 10


def start_collector(procs, port: int, data_dir, name: str):
    proc = procs(name, [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                        "--data-dir", str(data_dir)],
                 {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ})
    proc.url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_get(proc.url + "/healthz")[0] == 200, what=f"{name}", timeout=30)
    return proc


def body(seq: int) -> bytes:
    events = [{"v": 1, "kind": "step", "job": "durable", "rank": seq, "world_size": 100_000, "step": i,
               "ts": time.time(), "duration_s": 0.1} for i in range(EVENTS_PER_BATCH)]
    return json.dumps({"v": 1, "agent_id": "poster", "seq": seq, "node": "n", "sent_ts": time.time(), "events": events}).encode()


def steps_per_batch(collector) -> dict[int, int]:
    ranks = api(collector, "/v1/jobs/durable?top=100000")["ranks"]  # every rank, not the 1,000 slowest
    return {r["rank"]: r["steps"] for r in ranks}


def test_acknowledged_batches_survive_kill_9_and_none_is_applied_twice(procs, tmp_path):
    port = free_port()
    collector = start_collector(procs, port, tmp_path / "data", "collector")
    acked: set[int] = set()
    sent: list[int] = []
    stop = threading.Event()

    def post_forever():
        with httpx.Client(timeout=2, headers={"Authorization": f"Bearer {INGEST}"}) as client:
            seq = 0
            while not stop.is_set():
                sent.append(seq)
                try:
                    if client.post(collector.url + "/v1/ingest", content=body(seq)).status_code == 200:
                        acked.add(seq)
                    else:
                        time.sleep(0.01)
                except httpx.HTTPError:
                    # As an agent, wait a little after a failure: refused at once by a dead collector, a tight loop
                    # made thousands of batches in half a second, each posted again one by one below.
                    time.sleep(0.01)
                seq += 1

    poster = threading.Thread(target=post_forever)
    poster.start()
    wait_until(lambda: len(acked) >= 50, timeout=30, what="50 acknowledged batches")
    collector.stop(signal.SIGKILL)  # mid-stream, without warning
    time.sleep(0.5)
    stop.set()
    poster.join()
    assert len(sent) > len(acked)  # some batches were in flight or refused while it was dead

    restarted = start_collector(procs, port, tmp_path / "data", "restarted")
    counts = steps_per_batch(restarted)
    missing = sorted(seq for seq in acked if counts.get(seq) != EVENTS_PER_BATCH)
    assert not missing, f"acknowledged batches lost or damaged by kill -9: {missing[:10]}"
    assert all(n == EVENTS_PER_BATCH for n in counts.values()), "a batch was applied partly or twice"

    # The agent would now resend what was not acknowledged, and may resend what was: each lands once.
    with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {INGEST}"}) as client:
        for seq in sent:
            assert client.post(restarted.url + "/v1/ingest", content=body(seq)).status_code == 200
    counts = steps_per_batch(restarted)
    assert sorted(counts) == sorted(sent) and set(counts.values()) == {EVENTS_PER_BATCH}


def test_events_produced_while_the_collector_is_down_arrive_exactly_once(procs, tmp_path):
    """The collector is down for 8 s: several sends fail, the shipper's backoff grows and what the workload
    produces meanwhile goes to the agent's spool; after the restart every step arrives, each once."""
    port = free_port()
    collector = start_collector(procs, port, tmp_path / "data", "collector")
    metrics_port, events_port = free_port(), free_port(socket.SOCK_DGRAM)
    procs("agent", [sys.executable, "-m", "fleetscope", "agent", "--node", "steady", "--gpu-backend", "simulated",
                    "--gpus", "2", "--interval", "1", "--metrics-address", f"127.0.0.1:{metrics_port}",
                    "--events-address", f"127.0.0.1:{events_port}", "--collector-url", collector.url,
                    "--spool-dir", str(tmp_path / "spool")], {"FLEETSCOPE_INGEST_TOKEN": INGEST})
    agent = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_until(lambda: http_get(agent)[0] == 200, what="the agent")

    run = fleetscope.training(job="steady", rank=0, world_size=1, emitter=Emitter(("127.0.0.1", events_port)))
    produced = 0

    def produce(seconds: float) -> None:
        nonlocal produced
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with run.step(number=produced):
                time.sleep(0.05)
            produced += 1

    produce(3)
    collector.stop(signal.SIGTERM)
    produce(8)  # the collector is down; the workload carries on, the agent spools and backs off
    assert (gauge(agent, "fleetscope_agent_shipper_spool_events") or 0) > 0, "events should wait in the agent's spool"
    assert (gauge(agent, "fleetscope_agent_shipper_send_failures_total") or 0) >= 3, "sends should have failed and been retried"
    restarted = start_collector(procs, port, tmp_path / "data", "restarted")
    produce(3)

    def all_arrived():
        detail = api(restarted, "/v1/jobs/steady")
        return detail if detail["job"]["step_events"] >= produced else None

    wait_until(lambda: all_arrived(), timeout=90, what=f"all {produced} steps at the collector")
    wait_until_agent_holds_nothing(agent)  # a duplicate would have arrived by now
    series = api(restarted, f"/v1/jobs/steady/steps?last={produced + 10}&max_points=10000")["steps"]
    assert [s["step"] for s in series] == list(range(produced))
    assert {s["ranks"] for s in series} == {1}  # each step exactly once
