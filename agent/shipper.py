"""Ships workload events and host frames to the collector in numbered batches, retrying with backoff.

Every batch carries the agent id and a sequence number; a batch that failed is resent with the
same number, so the collector applies it once. While the collector is unreachable, events queue
in memory up to a bound; past it the oldest are dropped and counted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque

import httpx

from agent.sampler import Snapshot
from agent.sources.base import Family, Reading
from fleetscope.schema import Batch, Event, GpuFrame, HostFrame, encode

log = logging.getLogger("fleetscope.agent.shipper")


def host_frame(snapshot: Snapshot, node: str, labels: dict[str, str] | None = None) -> HostFrame:
    """The collector's view of one snapshot: a few host figures and every GPU's state."""

    def opt(name: str) -> float | None:
        return snapshot.value(name)

    total = opt("fleetscope_memory_total_bytes")
    avail = opt("fleetscope_memory_available_bytes")
    cpu = opt("fleetscope_cpu_utilization_ratio")
    load1 = opt("fleetscope_cpu_load1")
    gpus = [
        GpuFrame(
            index=g.index,
            uuid=g.uuid,
            name=g.name,
            up=g.up,
            utilization_ratio=g.utilization_ratio,
            memory_used_bytes=g.memory_used_bytes,
            memory_total_bytes=g.memory_total_bytes,
            temperature_celsius=g.temperature_celsius,
            power_watts=g.power_watts,
            power_limit_watts=g.power_limit_watts,
            sm_clock_hertz=g.sm_clock_hertz,
        )
        for g in snapshot.gpus
    ]
    return HostFrame(
        v=1,
        node=node,
        ts=snapshot.ts,
        cpu_utilization_ratio=min(1.0, max(0.0, cpu)) if cpu is not None else None,
        memory_used_bytes=int(total - avail) if total is not None and avail is not None else None,
        memory_total_bytes=int(total) if total is not None else None,
        load1=load1,
        gpus=gpus,
        sources_down=sorted(name for name, st in snapshot.status.items() if not st.up),
        labels=dict(labels or {}),
    )


class Shipper:
    families = (
        Family("fleetscope_agent_shipper_batches_sent_total", "counter", "Batches the collector acknowledged."),
        Family("fleetscope_agent_shipper_events_sent_total", "counter", "Events the collector acknowledged."),
        Family("fleetscope_agent_shipper_send_failures_total", "counter", "Attempts to send a batch that failed (each is retried)."),
        Family("fleetscope_agent_shipper_dropped_total", "counter", "Events or frames dropped and never shipped, by reason.", ("reason",)),
        Family("fleetscope_agent_shipper_queue_events", "gauge", "Events waiting to be shipped."),
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
        self.seq = 0
        self.pending: tuple[Batch, bytes, int, int] | None = None  # batch, body, events, frames
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

    def readings(self):
        with self._lock:
            queued = len(self.events) + (self.pending[2] if self.pending else 0)
            dropped = dict(self.dropped)
        yield Reading("fleetscope_agent_shipper_batches_sent_total", float(self.sent_batches))
        yield Reading("fleetscope_agent_shipper_events_sent_total", float(self.sent_events))
        yield Reading("fleetscope_agent_shipper_send_failures_total", float(self.failures))
        for reason, n in dropped.items():
            yield Reading("fleetscope_agent_shipper_dropped_total", float(n), (("reason", reason),))
        yield Reading("fleetscope_agent_shipper_queue_events", float(queued))
        if self.last_success is not None:
            yield Reading("fleetscope_agent_shipper_last_success_timestamp_seconds", self.last_success)

    def _next_batch(self) -> tuple[Batch, bytes, int, int] | None:
        with self._lock:
            if self.pending is not None:
                return self.pending
            n = min(len(self.events), self.batch_events)
            if n == 0 and not self.frames:
                return None
            events = [self.events.popleft() for _ in range(n)]
            frames = list(self.frames)
            self.frames.clear()
            batch = Batch(v=1, agent_id=self.agent_id, seq=self.seq, node=self.node, sent_ts=time.time(), events=events, frames=frames)
            self.seq += 1
            self.pending = (batch, encode(batch), len(events), len(frames))
            return self.pending

    def send_once(self) -> bool:
        """Send the pending batch (or the next one); True when nothing is left unacknowledged."""
        item = self._next_batch()
        if item is None:
            return True
        batch, body, n_events, n_frames = item
        try:
            resp = self.client.post(self.url, content=body)
        except httpx.HTTPError as exc:
            self.failures += 1
            log.warning("collector unreachable (%s); batch %d kept for retry", exc, batch.seq)
            return False
        if resp.status_code < 300:
            with self._lock:
                self.pending = None
                self.sent_batches += 1
                self.sent_events += n_events
                self.last_success = time.time()
            return True
        self.failures += 1
        if resp.status_code in (400, 413, 422):
            # The collector will never accept this batch; keeping it would block every later one.
            log.error("collector refused batch %d for good (%d): %s; %d events and %d frames dropped",
                      batch.seq, resp.status_code, resp.text[:500], n_events, n_frames)
            with self._lock:
                self.pending = None
                self.dropped["rejected"] += n_events + n_frames
            return True
        log.warning("collector answered %d to batch %d: %s; will retry", resp.status_code, batch.seq, resp.text[:300])
        return False

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            ok = self.send_once()
            if ok:
                backoff = 0.5
                with self._lock:
                    more = len(self.events) >= self.batch_events
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
        """Stop, first trying for up to `drain_s` to ship what is queued."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            with self._lock:
                empty = self.pending is None and not self.events and not self.frames
            if empty or not self.send_once():
                break
        with self._lock:
            left = len(self.events) + (self.pending[2] if self.pending else 0)
        if left:
            log.warning("stopping with %d events not shipped", left)
        self.client.close()
