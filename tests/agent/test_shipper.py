"""The shipper numbers batches, keeps a failed one for retry with the same number, splits what is too large,
bounds its memory in bytes, puts what it holds on disk within a second while the collector fails, and
survives a failing disk."""

from __future__ import annotations

import errno
import threading
import time

import httpx
import pytest

from agent.sampler import Snapshot
from agent.shipper import SEQ_STRIDE, Shipper, split_batch
from fleetscope.schema import StepEvent, decode_batch
from tests.agent.test_spool import full_filesystem, read_only_folder
from tests.conftest import wait_until


def step(n: int, job: str = "j", pad: int = 0) -> StepEvent:
    return StepEvent(v=1, job=job, rank=0, world_size=1, step=n, ts=1.0, duration_s=0.1, node="n1",
                     metrics={"pad": float(n)} if not pad else {f"m{i:05d}": 0.0 for i in range(pad)})


class Collector:
    """Answers like the collector would: a batch at or below its agent's watermark is a duplicate, a body over
    `limit` bytes is refused with 413; `script` is a list of status codes (or exceptions) to give first."""

    def __init__(self, script=(), limit: int | None = None):
        self.script = list(script)
        self.limit = limit
        self.bodies = []  # every batch received, in order
        self.applied = []  # batches applied, in order
        self.watermarks: dict[str, int] = {}
        self.auth = []
        self.down = False
        self.hold: threading.Event | None = None  # set: answer; clear: the request hangs until it is set

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        if self.hold is not None:
            self.hold.wait()
        if self.down:
            raise httpx.ConnectError("refused")
        if self.limit is not None and len(request.content) > self.limit:
            return httpx.Response(413, json={"detail": "too large"})
        batch = decode_batch(request.content)
        self.bodies.append(batch)
        outcome = self.script.pop(0) if self.script else 200
        if isinstance(outcome, Exception):
            raise outcome
        if outcome != 200:
            return httpx.Response(outcome, json={"detail": "scripted"})
        duplicate = batch.seq <= self.watermarks.get(batch.agent_id, -1)
        if not duplicate:
            self.watermarks[batch.agent_id] = batch.seq
            self.applied.append(batch)
        return httpx.Response(200, json={"duplicate": duplicate})

    def steps(self) -> list[tuple[str, int]]:
        return sorted((e.job, e.step) for b in self.applied for e in b.events)


def shipper(script=(), limit=None, **kw):
    collector = Collector(script, limit)
    s = Shipper("http://collector:9837", "tok", agent_id="a1", node="n1", transport=httpx.MockTransport(collector), **kw)
    return s, collector


def drain(s: Shipper) -> None:
    for _ in range(10_000):
        s.send_once()
        if not (s.events or s.outbox or s.frames or (s.spool and len(s.spool))):
            return
    raise AssertionError("the shipper never emptied")


def values(s: Shipper) -> dict:
    return {(r.name, r.labels): r.value for r in s.readings()}


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
    assert collector.bodies[3].seq == SEQ_STRIDE and [e.step for e in collector.bodies[3].events] == [3]
    assert s.sent_events == 4 and s.failures == 2
    assert collector.auth[0] == "Bearer tok"


def test_a_batch_the_collector_refuses_for_good_is_dropped_and_counted():
    s, _ = shipper([422, 200])
    s.enqueue_event(step(0))
    assert s.send_once() is True
    assert s.dropped["rejected"] == 1 and not s.outbox
    s.enqueue_event(step(1))
    assert s.send_once() is True and s.sent_events == 1


def test_the_memory_queue_is_bounded_in_bytes_and_drops_the_oldest():
    one = len(__import__("fleetscope.schema", fromlist=["encode"]).encode(step(0))) + 96
    s, collector = shipper(max_queue_bytes=5 * one + 10, batch_events=100)
    for n in range(8):
        s.enqueue_event(step(n))
    assert s.dropped["queue_full"] == 3
    assert values(s)[("fleetscope_agent_shipper_queue_bytes", ())] <= 5 * one + 10
    s.send_once()
    assert [e.step for e in collector.bodies[0].events] == [3, 4, 5, 6, 7]


def test_large_events_cannot_hold_more_memory_than_the_bound():
    s, _ = shipper(max_queue_bytes=1024 * 1024)
    for n in range(200):  # 26 KB each: 5 MB offered
        s.enqueue_event(step(n, pad=2000))
    assert s.event_bytes <= 1024 * 1024 and s.dropped["queue_full"] > 150


def test_batches_are_cut_at_the_count_and_byte_limits():
    s, collector = shipper(batch_events=2)
    for n in range(5):
        s.enqueue_event(step(n))
    drain(s)
    assert [len(b.events) for b in collector.bodies] == [2, 2, 1]
    assert [b.seq for b in collector.bodies] == [0, SEQ_STRIDE, 2 * SEQ_STRIDE]
    s, collector = shipper(max_batch_bytes=100_000)
    for n in range(40):  # 26 KB each
        s.enqueue_event(step(n, pad=2000))
    sizes = []
    s.client._transport = httpx.MockTransport(lambda r: (sizes.append(len(r.content)), collector(r))[1])
    drain(s)
    assert max(sizes) <= 100_000 and len(sizes) >= 10
    assert collector.steps() == [("j", n) for n in range(40)]


def test_a_batch_the_collector_finds_too_large_is_split_not_dropped_and_every_event_lands_once():
    # 2,000 events of 8 KB: a 16 MB batch, as in the review; this collector takes at most 1 MB.
    s, collector = shipper(limit=1024 * 1024, max_batch_bytes=64 * 1024 * 1024)
    for n in range(2000):
        s.enqueue_event(step(n, job="big" if n % 2 else "other-user", pad=600))
    drain(s)
    assert s.splits > 0 and s.dropped["too_large"] == 0 and s.dropped["rejected"] == 0
    assert collector.steps() == sorted(("big" if n % 2 else "other-user", n) for n in range(2000))
    seqs = [b.seq for b in collector.applied]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert s.sent_events == 2000


def test_a_split_interrupted_by_an_outage_is_resent_whole_and_lands_once():
    s, collector = shipper(limit=5_000, max_batch_bytes=10 * 1024 * 1024)
    for n in range(20):  # 1.4 KB each: halved three times before the parts pass
        s.enqueue_event(step(n, pad=100))
    real = collector.__call__
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        if calls["n"] == 6:  # some parts applied, then the network fails
            raise httpx.ConnectError("refused")
        return real(request)

    s.client._transport = httpx.MockTransport(flaky)
    assert s.send_once() is False
    assert 0 < len(collector.applied) < 8  # some parts are in
    drain(s)
    assert collector.steps() == [("j", n) for n in range(20)]  # the rest, and none twice


def test_a_single_record_over_the_limit_is_dropped_and_counted_and_the_rest_go():
    s, collector = shipper(limit=20_000)
    s.enqueue_event(step(0))
    s.enqueue_event(step(1, pad=2000))  # 26 KB: can never pass
    s.enqueue_event(step(2))
    drain(s)
    assert s.dropped["too_large"] == 1
    assert collector.steps() == [("j", 0), ("j", 2)]


def test_split_halves_keep_order_and_number_inside_their_batch():
    s, _ = shipper()
    for n in range(5):
        s.enqueue_event(step(n))
    item = s._next()
    parts = split_batch(item.body, SEQ_STRIDE)
    batches = [decode_batch(body) for body, *_ in parts]
    assert [b.seq for b in batches] == [0, SEQ_STRIDE // 2]
    assert [e.step for b in batches for e in b.events] == [0, 1, 2, 3, 4]
    assert [p[1:] for p in parts] == [(SEQ_STRIDE // 2, len(batches[0].events), 0), (SEQ_STRIDE // 2, len(batches[1].events), 0)]


def test_snapshots_become_host_frames():
    s, collector = shipper()
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
    v = values(s)
    assert v[("fleetscope_agent_shipper_send_failures_total", ())] == 1
    assert v[("fleetscope_agent_shipper_queue_events", ())] == 1
    assert v[("fleetscope_agent_shipper_up", ())] == 1
    assert ("fleetscope_agent_shipper_last_success_timestamp_seconds", ()) not in v


def spooling_shipper(tmp_path, script=(), spool_dir=None, **kw):
    collector = Collector(script)
    s = Shipper("http://collector:9837", "tok", agent_id="a1", node="n1", transport=httpx.MockTransport(collector),
                spool_dir=spool_dir or tmp_path / "spool", **kw)
    return s, collector


def test_while_the_collector_is_down_batches_wait_on_disk_and_go_out_in_order(tmp_path):
    down = [httpx.ConnectError("refused")] * 3
    s, collector = spooling_shipper(tmp_path, down, batch_events=2)
    for n in range(3):
        s.enqueue_event(step(n))
    assert s.send_once() is False  # batch 0 fails
    s.keep_once()  # the keeper puts it and the rest of the queue on disk
    assert not s.outbox and not s.events and len(s.spool) == 2
    s.enqueue_event(step(3))
    s.keep_once()  # within a flush interval, even before the next try
    assert len(s.spool) == 3 and s.spool.events == 4
    assert s.send_once() is False and s.send_once() is False  # still down
    assert values(s)[("fleetscope_agent_shipper_spool_events", ())] == 4
    drain(s)
    sent = [(b.seq // SEQ_STRIDE, [e.step for e in b.events]) for b in collector.applied]
    assert sent == [(0, [0, 1]), (1, [2]), (2, [3])]
    assert s.sent_events == 4 and not list((tmp_path / "spool").glob("*.batch"))


def test_a_restarted_agent_sends_what_its_predecessor_spooled_first(tmp_path):
    first, _ = spooling_shipper(tmp_path, [httpx.ConnectError("refused")] * 10)
    for n in range(3):
        first.enqueue_event(step(n))
    first.send_once()
    first.stop(drain_s=0)
    second, collector = spooling_shipper(tmp_path)
    second.agent_id = "a2"
    second.enqueue_event(step(99))
    drain(second)
    assert [(b.agent_id, [e.step for e in b.events]) for b in collector.applied] == [("a1", [0, 1, 2]), ("a2", [99])]


def test_a_spooled_batch_over_the_limit_known_up_front_is_split_before_it_is_sent(tmp_path):
    first, _ = spooling_shipper(tmp_path, [httpx.ConnectError("refused")] * 10)  # an agent that made large batches
    for n in range(50):
        first.enqueue_event(step(n, pad=100))
    first.send_once()
    first.stop(drain_s=0)
    second, collector = spooling_shipper(tmp_path, max_batch_bytes=30_000)
    sizes = []
    second.client._transport = httpx.MockTransport(lambda r: (sizes.append(len(r.content)), collector(r))[1])
    drain(second)
    assert max(sizes) <= 30_000 and collector.steps() == [("j", n) for n in range(50)]


def test_the_spool_is_bounded_and_counts_what_it_drops(tmp_path):
    s, _ = spooling_shipper(tmp_path, [httpx.ConnectError("refused")] * 100, batch_events=1, spool_bytes=600)
    for n in range(10):
        s.enqueue_event(step(n))
        s.send_once()
        s.keep_once()
    assert s.spool.bytes <= 600
    kept = s.spool.events
    assert kept < 10 and s.spool.dropped_events == 10 - kept
    assert values(s)[("fleetscope_agent_shipper_dropped_total", (("reason", "spool_full"),))] == 10 - kept


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_while_the_collector_is_down_what_arrives_is_on_disk_within_a_second(tmp_path):
    s, collector = spooling_shipper(tmp_path)
    collector.down = True
    s.start()
    try:
        s.enqueue_event(step(0))
        wait_until(lambda: s.failures, timeout=5, what="a failed send")
        time.sleep(1.2)  # the backoff grows; the keeper does not wait for it
        for n in range(1, 4):
            s.enqueue_event(step(n))
            t0 = time.monotonic()
            wait_until(lambda: s.spool.events == n + 1, timeout=3, interval=0.02, what=f"event {n} on disk")
            assert time.monotonic() - t0 < 1.2
            time.sleep(0.4)
    finally:
        collector.down = False
        s.stop(drain_s=5)
    assert collector.steps() == [("j", n) for n in range(4)]


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_a_send_that_hangs_does_not_keep_its_batch_only_in_memory(tmp_path):
    s, collector = spooling_shipper(tmp_path, timeout_s=30)
    collector.hold = threading.Event()
    s.start()
    try:
        s.enqueue_event(step(0))
        wait_until(lambda: len(s.spool) == 1, timeout=10, what="the hanging batch on disk")
        s.enqueue_event(step(1))
        wait_until(lambda: s.spool.events == 2, timeout=10, what="what came after it on disk too")
        collector.hold.set()
        wait_until(lambda: collector.steps() == [("j", 0), ("j", 1)] and not len(s.spool), timeout=10, what="both delivered")
        assert len(collector.applied) == 2
    finally:
        collector.hold.set()
        s.stop(drain_s=1)


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_a_full_disk_is_counted_exported_and_survived_and_nothing_is_lost(tmp_path, monkeypatch):
    with full_filesystem(tmp_path, monkeypatch) as (folder, free):
        s, collector = spooling_shipper(tmp_path, spool_dir=folder)
        collector.down = True
        s.start()
        try:
            for n in range(20):
                s.enqueue_event(step(n))
            wait_until(lambda: s.spool_errors["enospc"] >= 2, timeout=5, what="the spool to fail twice")
            v = values(s)
            assert v[("fleetscope_agent_shipper_up", ())] == 0
            assert v[("fleetscope_agent_shipper_queue_events", ())] == 20  # held in memory meanwhile
            assert all(t.is_alive() for t in s._threads)
            free()
            wait_until(lambda: s.spool.events == 20, timeout=5, what="the events on disk once there is room")
            assert values(s)[("fleetscope_agent_shipper_up", ())] == 1
            collector.down = False
            wait_until(lambda: collector.steps() == [("j", n) for n in range(20)], timeout=40, what="all 20 delivered")
        finally:
            s.stop(drain_s=1)


def test_a_full_disk_while_the_collector_is_up_clears_once_the_disk_has_room(tmp_path, monkeypatch):
    with full_filesystem(tmp_path, monkeypatch) as (folder, free):
        s, _ = spooling_shipper(tmp_path, spool_dir=folder)
        s._spool_fault("write", OSError(errno.ENOSPC, "No space left on device"))
        s.keep_once()  # the probe fails
        assert s.spool_problem is not None
        free()
        s._last_probe = 0.0
        s.keep_once()
        assert s.spool_problem is None and values(s)[("fleetscope_agent_shipper_up", ())] == 1


def test_a_read_only_spool_is_counted_and_events_still_flow_when_the_collector_is_up(tmp_path):
    with read_only_folder(tmp_path) as folder:
        s, collector = spooling_shipper(tmp_path, [httpx.ConnectError("refused")], spool_dir=folder)
        s.enqueue_event(step(0))
        assert s.send_once() is False
        s.keep_once()
        assert set(s.spool_errors) & {"erofs", "eacces"} and s.problem()
        assert values(s)[("fleetscope_agent_shipper_up", ())] == 0
        drain(s)  # the collector is back: the batch held in memory goes
        assert collector.steps() == [("j", 0)]


def test_an_unexpected_error_does_not_kill_the_shipper_thread(tmp_path, monkeypatch):
    s, collector = spooling_shipper(tmp_path)
    real = s._post
    calls = {"n": 0}

    def broken(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return real(*args)

    monkeypatch.setattr(s, "_post", broken)
    s.start()
    try:
        s.enqueue_event(step(0))
        wait_until(lambda: collector.steps() == [("j", 0)], timeout=10, what="the event after the error")
        assert s.errors == 1 and all(t.is_alive() for t in s._threads)
    finally:
        s.stop(drain_s=1)


def test_a_dead_thread_reads_as_down(tmp_path):
    s, _ = spooling_shipper(tmp_path)
    s._threads = [threading.Thread(target=lambda: None)]
    s._threads[0].start()
    s._threads[0].join()
    assert values(s)[("fleetscope_agent_shipper_up", ())] == 0


@pytest.mark.parametrize("op", ["read", "remove"])
def test_a_spooled_batch_that_cannot_be_read_or_removed_does_not_block_the_rest(tmp_path, monkeypatch, op):
    s, collector = spooling_shipper(tmp_path, [httpx.ConnectError("refused")])
    for n in range(2):
        s.enqueue_event(step(n))
        s.send_once() if n == 0 else None
        s.keep_once()
    assert len(s.spool) == 2
    head = s.spool.head()
    if op == "read":
        monkeypatch.setattr(type(head), "read", lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))
                            if self is head else self.path.read_bytes())
    else:
        monkeypatch.setattr(type(head.path), "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")))
    drain(s)
    assert s.spool_errors["eio" if op == "read" else "erofs"] >= 1
    assert collector.steps() == ([("j", 1)] if op == "read" else [("j", 0), ("j", 1)])
    if op == "read":
        assert s.dropped["spool_unreadable"] == 1
