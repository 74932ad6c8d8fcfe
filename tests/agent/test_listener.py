"""The listener validates client datagrams and adds the node and GPU."""

from __future__ import annotations

import json
import socket

import pytest

import fleetscope
from agent.listener import MAX_EVENT_BYTES, Listener, SenderLimits
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


def nested(depth: int) -> bytes:
    return json.dumps({**STEP, "metrics": {}}).encode()[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("data, reason", [
    (nested(20_000), "too_deep"),  # in a field the decoder would skip
    (b'{"a":' * 9000 + b"1" + b"}" * 9000, "too_deep"),
    (b"[" * 59_000, "invalid"),  # an outer array is plainly not an event
])
def test_deeply_nested_datagrams_are_refused_and_counted_without_a_traceback(listener, data, reason, caplog):
    for _ in range(50):
        assert listener.handle(data, ("127.0.0.1", 5000)) is None
    assert listener.rejected == {reason: 50} and listener.delivered == []
    assert len(caplog.records) == 1 and not caplog.records[0].exc_info


def test_a_deeply_nested_flood_over_the_socket_leaves_the_listener_serving(listener, caplog):
    listener.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(1, 41):  # 40 KB each, paced so the kernel's socket buffer does not drop them first
        sock.sendto(nested(20_000), listener.address)
        wait_until(lambda: listener.rejected["too_deep"] == n, timeout=5, interval=0.005, what=f"datagram {n} refused")
    sock.sendto(json.dumps(STEP).encode(), listener.address)
    sock.close()
    wait_until(lambda: len(listener.delivered) == 1, timeout=5, what="the good event after the flood")
    assert not any(r.exc_info for r in caplog.records)
    values = {r.labels: r.value for r in listener.readings() if r.name == "fleetscope_agent_events_rejected_total"}
    assert values[(("reason", "too_deep"),)] == listener.rejected["too_deep"] > 0


def test_each_sender_is_held_to_its_rate_and_others_are_not():
    clock = [0.0]
    limits = SenderLimits(events_per_s=100, bytes_per_s=1_000_000, burst_s=1.0)
    got = []
    lst = Listener("127.0.0.1", 0, node="n", deliver=got.append, limits=limits)
    try:
        flood, quiet = ("127.0.0.1", 40000), ("127.0.0.1", 40001)
        data = json.dumps(STEP).encode()
        real_allow = limits.allow
        limits.allow = lambda sender, size, now=None: real_allow(sender, size, clock[0])
        accepted = sum(lst.handle(data, flood) is not None for _ in range(1000))
        assert accepted == 100  # its burst, then nothing
        assert lst.handle(data, quiet) is not None  # another process on the node is unaffected
        clock[0] = 0.5  # half a second later: half the rate again
        assert 40 <= sum(lst.handle(data, flood) is not None for _ in range(1000)) <= 60
        values = {r.labels: r.value for r in lst.readings() if r.name == "fleetscope_agent_events_rejected_total"}
        assert values[(("reason", "rate_limited"),)] == lst.rejected["rate_limited"] > 1000
    finally:
        lst.stop()


def test_large_datagrams_are_held_to_the_byte_rate():
    limits = SenderLimits(events_per_s=10_000, bytes_per_s=100_000, burst_s=1.0)
    big = b"x" * 50_000
    assert [limits.allow("s", len(big), now=0.0) for _ in range(3)] == [True, True, False]
    assert limits.allow("s", len(big), now=0.5) is True


def test_the_sender_table_is_bounded():
    limits = SenderLimits(max_senders=10)
    for port in range(1000):
        limits.allow(("127.0.0.1", port), 100)
    assert len(limits.buckets) == 10


def test_an_unexpected_error_is_counted_and_logged_once_not_per_datagram(listener, caplog):
    listener.gpu_lookup = lambda pid, local_rank: 1 / 0
    listener.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(30):
        sock.sendto(json.dumps(STEP).encode(), listener.address)
    sock.close()
    wait_until(lambda: listener.rejected["error"] == 30, timeout=5, what="30 errors counted")
    assert sum(1 for r in caplog.records if r.exc_info) == 1
