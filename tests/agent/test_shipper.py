"""The shipper numbers batches, keeps a failed one for retry with the same number, and counts drops."""

from __future__ import annotations

import httpx

from agent.sampler import Snapshot
from agent.shipper import Shipper
from agent.sources.base import Reading
from fleetscope.schema import StepEvent, decode_batch


def step(n: int) -> StepEvent:
    return StepEvent(v=1, job="j", rank=0, world_size=1, step=n, ts=1.0, duration_s=0.1, node="n1")


class Collector:
    """Answers like the collector would; `script` is a list of status codes (or exceptions) to give."""

    def __init__(self, script):
        self.script = list(script)
        self.bodies = []
        self.auth = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        self.bodies.append(decode_batch(request.content))
        outcome = self.script.pop(0) if self.script else 200
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome, json={"detail": "scripted"})


def shipper(script, **kw):
    collector = Collector(script)
    s = Shipper("http://collector:9837", "tok", agent_id="a1", node="n1", transport=httpx.MockTransport(collector), **kw)
    return s, collector


def test_a_failed_batch_is_resent_with_the_same_sequence_number():
    s, collector = shipper([httpx.ConnectError("refused"), 503, 200, 200])
    for n in range(3):
        s.enqueue_event(step(n))
    assert s.send_once() is False and s.send_once() is False  # down, then overloaded
    s.enqueue_event(step(3))  # arrives while the first batch waits
    assert s.send_once() is True
    assert [b.seq for b in collector.bodies] == [0, 0, 0]
    assert [e.step for e in collector.bodies[2].events] == [0, 1, 2]
    assert s.send_once() is True
    assert collector.bodies[3].seq == 1 and [e.step for e in collector.bodies[3].events] == [3]
    assert s.sent_events == 4 and s.failures == 2
    assert collector.auth[0] == "Bearer tok"


def test_a_batch_the_collector_refuses_for_good_is_dropped_and_counted():
    s, _ = shipper([422, 200])
    s.enqueue_event(step(0))
    assert s.send_once() is True
    assert s.dropped["rejected"] == 1 and s.pending is None
    s.enqueue_event(step(1))
    assert s.send_once() is True and s.sent_events == 1


def test_the_queue_is_bounded_and_drops_the_oldest():
    s, collector = shipper([], max_queue_events=5, batch_events=100)
    for n in range(8):
        s.enqueue_event(step(n))
    assert s.dropped["queue_full"] == 3
    s.send_once()
    assert [e.step for e in collector.bodies[0].events] == [3, 4, 5, 6, 7]


def test_batches_are_cut_at_the_size_limit():
    s, collector = shipper([], batch_events=2)
    for n in range(5):
        s.enqueue_event(step(n))
    while s.events:
        s.send_once()
    assert [len(b.events) for b in collector.bodies] == [2, 2, 1]
    assert [b.seq for b in collector.bodies] == [0, 1, 2]


def test_snapshots_become_host_frames():
    s, collector = shipper([])
    snap = Snapshot(ts=5.0, readings=(), status={},
                    host={"memory_total_bytes": 100.0, "memory_available_bytes": 40.0, "cpu_utilization_ratio": 0.25})
    s.enqueue_snapshot(snap)
    s.send_once()
    (frame,) = collector.bodies[0].frames
    assert (frame.node, frame.ts, frame.memory_used_bytes, frame.cpu_utilization_ratio) == ("n1", 5.0, 60, 0.25)


def test_shipper_state_is_in_the_agent_metrics():
    s, _ = shipper([httpx.ConnectError("refused")])
    s.enqueue_event(step(0))
    s.send_once()
    values = {(r.name, r.labels): r.value for r in s.readings()}
    assert values[("fleetscope_agent_shipper_send_failures_total", ())] == 1
    assert values[("fleetscope_agent_shipper_queue_events", ())] == 1
    assert ("fleetscope_agent_shipper_last_success_timestamp_seconds", ()) not in values


def spooling_shipper(tmp_path, script, **kw):
    collector = Collector(script)
    s = Shipper("http://collector:9837", "tok", agent_id="a1", node="n1", transport=httpx.MockTransport(collector),
                spool_dir=tmp_path / "spool", **kw)
    return s, collector


def test_while_the_collector_is_down_batches_wait_on_disk_and_go_out_in_order(tmp_path):
    down = [httpx.ConnectError("refused")] * 3
    s, collector = spooling_shipper(tmp_path, down, batch_events=2)
    for n in range(3):
        s.enqueue_event(step(n))
    assert s.send_once() is False  # batch 0 fails: it and the rest of the queue go to disk
    assert s.pending is None and not s.events and len(s.spool) == 2
    s.enqueue_event(step(3))
    assert s.send_once() is False and s.send_once() is False  # still down; step 3 is spilled too
    assert len(s.spool) == 3 and s.spool.events == 4
    values = {(r.name, r.labels): r.value for r in s.readings()}
    assert values[("fleetscope_agent_shipper_spool_events", ())] == 4
    while s.spool and len(s.spool):
        assert s.send_once() is True
    sent = [(b.seq, [e.step for e in b.events]) for b in collector.bodies[3:]]  # after the three failed tries
    assert sent == [(0, [0, 1]), (1, [2]), (2, [3])]
    assert s.sent_events == 4 and not list((tmp_path / "spool").glob("*.batch"))


def test_a_restarted_agent_sends_what_its_predecessor_spooled_first(tmp_path):
    first, _ = spooling_shipper(tmp_path, [httpx.ConnectError("refused")] * 10)
    for n in range(3):
        first.enqueue_event(step(n))
    first.send_once()
    first.stop(drain_s=0)
    second, collector = spooling_shipper(tmp_path, [])
    second.agent_id = "a2"
    second.enqueue_event(step(99))
    while second.send_once() and (len(second.spool) or second.events or second.pending):
        pass
    assert [(b.agent_id, [e.step for e in b.events]) for b in collector.bodies] == [("a1", [0, 1, 2]), ("a2", [99])]


def test_the_spool_is_bounded_and_counts_what_it_drops(tmp_path):
    s, _ = spooling_shipper(tmp_path, [httpx.ConnectError("refused")] * 100, batch_events=1, spool_bytes=600)
    for n in range(10):
        s.enqueue_event(step(n))
        s.send_once()
    assert s.spool.bytes <= 600
    kept = s.spool.events
    assert kept < 10 and s.spool.dropped_events == 10 - kept
    values = {(r.name, r.labels): r.value for r in s.readings()}
    assert values[("fleetscope_agent_shipper_dropped_total", (("reason", "spool_full"),))] == 10 - kept
