"""The listener validates client datagrams and adds the node and GPU."""

from __future__ import annotations

import json
import socket

import pytest

import fleetscope
from agent.listener import MAX_EVENT_BYTES, Listener
from fleetscope.client import Emitter
from tests.conftest import wait_until

STEP = {"v": 1, "kind": "step", "job": "j", "rank": 0, "local_rank": 2, "world_size": 4, "step": 0, "ts": 1.0, "duration_s": 0.5, "pid": 77}


@pytest.fixture
def listener():
    got = []
    lst = Listener("127.0.0.1", 0, node="gpu-007", deliver=got.append,
                   gpu_lookup=lambda pid, local_rank: f"GPU-of-pid-{pid}" if pid == 77 else None)
    lst.delivered = got
    yield lst
    lst.stop()


def test_events_are_enriched_with_node_and_gpu(listener):
    event = listener.handle(json.dumps(STEP).encode())
    assert event.node == "gpu-007" and event.gpu_uuid == "GPU-of-pid-77"
    assert listener.delivered == [event]
    assert listener.received["step"] == 1


def test_a_client_cannot_claim_another_node(listener):
    event = listener.handle(json.dumps({**STEP, "node": "elsewhere", "gpu_uuid": "GPU-x", "pid": 5}).encode())
    assert event.node == "gpu-007" and event.gpu_uuid is None


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"not json", "invalid"),
        (json.dumps({**STEP, "duration_s": "slow"}).encode(), "invalid"),
        (json.dumps({**STEP, "v": 9}).encode(), "version"),
        (b"{" + b" " * MAX_EVENT_BYTES + b"}", "too_large"),
    ],
)
def test_bad_datagrams_are_refused_counted_and_not_delivered(listener, data, reason):
    assert listener.handle(data) is None
    assert listener.rejected[reason] == 1 and listener.delivered == []


def test_over_a_real_socket_from_the_client(listener):
    listener.start()
    run = fleetscope.training(job="sock", rank=1, world_size=2, local_rank=0, emitter=Emitter(listener.address))
    for _ in range(20):
        with run.step(tokens=1):
            pass
    wait_until(lambda: len(listener.delivered) == 20, timeout=5, what="20 events")
    assert [e.step for e in listener.delivered] == list(range(20))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(b"garbage", listener.address)
    sock.close()
    wait_until(lambda: listener.rejected["invalid"] == 1, timeout=5, what="the garbage to be refused")
