"""Ships workload events and host frames to the collector in numbered batches, retrying with backoff.

Every batch carries the agent id and a sequence number; a batch that failed is resent with the
same number, and batches go out in sequence order, so the collector applies each once. When a
send fails the batch moves to the disk spool (agent/spool.py), and while the spool holds anything
every new batch joins it and the oldest goes first: events produced while the collector is down
wait on disk (bounded; drops are counted) and survive an agent restart. Without a spool folder,
one failed batch waits in memory and events queue in memory up to a bound.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx

from agent.frames import host_frame
from agent.sampler import Snapshot
from agent.sources.base import Family, Reading
from agent.spool import Spool, Spooled
from fleetscope.schema import Batch, Event, HostFrame, ServerFrame, encode

log = logging.getLogger("fleetscope.agent.shipper")


@dataclass
class Outgoing:
    body: bytes
    seq: int | None
    events: int
    frames: int
    spooled: Spooled | None = None


class Shipper:
    families = (
        Family("fleetscope_agent_shipper_batches_sent_total", "counter", "Batches the collector acknowledged."),
        Family("fleetscope_agent_shipper_events_sent_total", "counter", "Events the collector acknowledged."),
        Family("fleetscope_agent_shipper_send_failures_total", "counter", "Attempts to send a batch that failed (each is retried)."),
        Family("fleetscope_agent_shipper_dropped_total", "counter", "Events or frames dropped and never shipped, by reason.", ("reason",)),
        Family("fleetscope_agent_shipper_queue_events", "gauge", "Events waiting in memory to be shipped."),
        Family("fleetscope_agent_shipper_spool_batches", "gauge", "Batches waiting in the disk spool."),
        Family("fleetscope_agent_shipper_spool_events", "gauge", "Events waiting in the disk spool."),
        Family("fleetscope_agent_shipper_spool_bytes", "gauge", "Size of the disk spool."),
        Family("fleetscope_agent_shipper_last_success_timestamp_seconds", "gauge", "Unix time of the last acknowledged batch."),
    )

    def __init__(
        self,
        url: str,
        token: str,
        *,
        agent_id: str,
        node: str,
        batch_events: int = 2000,
        flush_interval_s: float = 1.0,
        max_queue_events: int = 200_000,
        max_queue_frames: int = 720,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        labels: dict[str, str] | None = None,
        spool_dir: str | Path | None = None,
        spool_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.labels = dict(labels or {})
        self.url = url.rstrip("/") + "/v1/ingest"
        self.agent_id = agent_id
        self.node = node
        self.batch_events = batch_events
        self.flush_interval_s = flush_interval_s
        self.max_queue_events = max_queue_events
        self.events: deque[Event] = deque()
        self.frames: deque[HostFrame] = deque(maxlen=max_queue_frames)
        self.servers: deque[ServerFrame] = deque(maxlen=max_queue_frames * 16)
        self.seq = 0
        self.pending: Outgoing | None = None  # the batch being sent, when it is not in the spool
        self.spool = Spool(Path(spool_dir), spool_bytes) if spool_dir is not None else None
        self.sent_batches = 0
        self.sent_events = 0
        self.failures = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "frames_queue_full": 0, "rejected": 0}
        self.last_success: float | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client = httpx.Client(
            timeout=timeout_s, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, transport=transport
        )

    # Producers (listener thread, sampler thread).
    def enqueue_event(self, event: Event) -> None:
        with self._lock:
            if len(self.events) >= self.max_queue_events:
                self.events.popleft()
                self.dropped["queue_full"] += 1
            self.events.append(event)
            full = len(self.events) >= self.batch_events
        if full:
            self._wake.set()

    def enqueue_snapshot(self, snapshot: Snapshot) -> None:
        frame = host_frame(snapshot, self.node, self.labels)
        with self._lock:
            if len(self.frames) == self.frames.maxlen:
                self.dropped["frames_queue_full"] += 1
            self.frames.append(frame)

    def enqueue_server_frame(self, frame: ServerFrame) -> None:
        with self._lock:
            if len(self.servers) == self.servers.maxlen:
                self.dropped["frames_queue_full"] += 1
            self.servers.append(frame)

    def readings(self):
        with self._lock:
            queued = len(self.events) + (self.pending.events if self.pending else 0)
            dropped = dict(self.dropped)
            if self.spool is not None:
                dropped["spool_full"] = self.spool.dropped_events + self.spool.dropped_frames
                spool = (len(self.spool), self.spool.events, self.spool.bytes)
            else:
                spool = None
        yield Reading("fleetscope_agent_shipper_batches_sent_total", float(self.sent_batches))
        yield Reading("fleetscope_agent_shipper_events_sent_total", float(self.sent_events))
        yield Reading("fleetscope_agent_shipper_send_failures_total", float(self.failures))
        for reason, n in dropped.items():
            yield Reading("fleetscope_agent_shipper_dropped_total", float(n), (("reason", reason),))
        yield Reading("fleetscope_agent_shipper_queue_events", float(queued))
        if spool is not None:
            yield Reading("fleetscope_agent_shipper_spool_batches", float(spool[0]))
            yield Reading("fleetscope_agent_shipper_spool_events", float(spool[1]))
            yield Reading("fleetscope_agent_shipper_spool_bytes", float(spool[2]))
        if self.last_success is not None:
            yield Reading("fleetscope_agent_shipper_last_success_timestamp_seconds", self.last_success)

    def _form_batch_locked(self) -> Outgoing | None:
        """Cut the next numbered batch from what is queued in memory."""
        n = min(len(self.events), self.batch_events)
        if n == 0 and not self.frames and not self.servers:
            return None
        events = [self.events.popleft() for _ in range(n)]
        frames, servers = list(self.frames), list(self.servers)
        self.frames.clear()
        self.servers.clear()
        batch = Batch(v=1, agent_id=self.agent_id, seq=self.seq, node=self.node, sent_ts=time.time(), events=events,
                      frames=frames, servers=servers)
        self.seq += 1
        return Outgoing(encode(batch), batch.seq, len(events), len(frames) + len(servers))

    def _next(self) -> Outgoing | None:
        with self._lock:
            if self.pending is not None:
                return self.pending
            if self.spool is not None and len(self.spool):
                head = self.spool.head()
                return Outgoing(head.read(), None, head.events, head.frames, spooled=head)
            self.pending = self._form_batch_locked()
            return self.pending

    def _done(self, item: Outgoing) -> None:
        with self._lock:
            if item.spooled is not None:
                self.spool.remove(item.spooled)
            else:
                self.pending = None

    def _spill_locked(self) -> None:
        """The collector is failing: put the pending batch and everything queued on disk, in order."""
        if self.spool is None:
            return
        if self.pending is not None:
            self.spool.append(self.pending.body, self.pending.events, self.pending.frames)
            self.pending = None
        while (item := self._form_batch_locked()) is not None:
            self.spool.append(item.body, item.events, item.frames)

    def send_once(self) -> bool:
        """Send the next batch; True when it was acknowledged (or there was none), False to back off."""
        item = self._next()
        if item is None:
            return True
        try:
            resp = self.client.post(self.url, content=item.body)
        except httpx.HTTPError as exc:
            return self._failed(item, f"collector unreachable ({exc})")
        if resp.status_code < 300:
            self._done(item)
            with self._lock:
                self.sent_batches += 1
                self.sent_events += item.events
                self.last_success = time.time()
            return True
        if resp.status_code in (400, 413, 422):
            # The collector will never accept this batch; keeping it would block every later one.
            log.error("collector refused a batch for good (%d): %s; %d events and %d frames dropped",
                      resp.status_code, resp.text[:500], item.events, item.frames)
            self._done(item)
            with self._lock:
                self.dropped["rejected"] += item.events + item.frames
            return True
        return self._failed(item, f"collector answered {resp.status_code}: {resp.text[:300]}")

    def _failed(self, item: Outgoing, why: str) -> bool:
        self.failures += 1
        with self._lock:
            self._spill_locked()
            where = f"{len(self.spool)} batches spooled" if self.spool is not None else "kept in memory"
        if self.failures == 1 or self.failures % 20 == 0:
            log.warning("%s; %s, will retry", why, where)
        return False

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            ok = self.send_once()
            if ok:
                backoff = 0.5
                with self._lock:
                    more = len(self.events) >= self.batch_events or self.pending is not None or bool(self.spool and len(self.spool))
                if not more:
                    self._wake.wait(self.flush_interval_s)
                    self._wake.clear()
            else:
                # Exponential backoff with full jitter, so a fleet does not retry in lockstep.
                self._stop.wait(random.uniform(0, backoff))
                backoff = min(backoff * 2, 30.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop: try for up to `drain_s` to ship what is queued, then spool what is left."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            with self._lock:
                empty = self.pending is None and not self.events and not self.frames and not (self.spool and len(self.spool))
            if empty or not self.send_once():
                break
        with self._lock:
            self._spill_locked()
            left = len(self.events) + (self.pending.events if self.pending else 0)
            spooled = self.spool.events if self.spool is not None else 0
        if left:
            log.warning("stopping with %d events not shipped", left)
        if spooled:
            log.info("stopping with %d events in the spool; they are sent after the next start", spooled)
        self.client.close()
