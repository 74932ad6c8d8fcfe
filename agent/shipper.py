"""Ships workload events and host frames to the collector in numbered batches, retrying with backoff.

Every batch carries the agent id, the boot epoch (new at each start of the process) and a sequence
number; a batch that failed is resent with the same number, and batches go out in sequence order,
so the collector applies each once (it keeps the highest number it applied per agent and epoch).
Batches spooled before a restart keep the epoch they were written with (the spool holds the bodies as
sent), so they are still deduplicated against their own epoch, and the new epoch's numbers, from 0
again, never look like duplicates. Before a number would pass EPOCH_SEQ_LIMIT a new epoch begins, so
no number comes near the collector's bound on jumps (2**32 above its watermark). Numbers advance by SEQ_STRIDE: a batch over the
collector's body limit (known up front as `max_batch_bytes`, or learnt from a 413) is split into
halves numbered inside its own range, still in order and still once-only, so no batch is ever
dropped whole for its size.

What waits in memory is bounded in bytes: events and the batches cut from them by
`max_queue_bytes`, host and server frames by `max_frame_bytes`; past a bound the oldest go and are
counted. While the collector fails, a send hangs, or the spool holds anything, a keeper thread
writes what arrived to the disk spool (agent/spool.py) every flush interval, so a kill -9 loses at
most that last interval; the oldest batch always goes first. A spool that cannot be written (disk
full, read-only) is logged, counted and exported (`fleetscope_agent_shipper_up 0`) and tried again;
its batches wait in memory meanwhile. Neither thread dies of an error.
"""

from __future__ import annotations

import errno
import logging
import random
import secrets
import ssl
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from agent.frames import ServerFrames, host_frame
from agent.sampler import Snapshot
from agent.sources.base import Family, Reading
from agent.spool import Spool, Spooled
from agent.threads import Thread
from fleetscope.schema import Batch, Event, ServerFrame, encode

log = logging.getLogger("fleetscope.agent.shipper")

SEQ_STRIDE = 1024  # numbers a batch owns: room to halve it ten times
EPOCH_SEQ_LIMIT = 2**31  # a new epoch, numbered from 0, before a batch would be numbered past this


def new_epoch() -> str:
    """A boot epoch: the start time, for people, and random digits, so two starts in one second differ."""
    return f"{int(time.time())}-{secrets.token_hex(6)}"


def client_tls(ca_file: str | None = None, tls_cert: str | None = None, tls_key: str | None = None) -> ssl.SSLContext | bool:
    """What httpx verifies an https collector with: the system's CAs (True), or ca_file's; and the client
    certificate a mutual-TLS collector knows this agent by."""
    if not ca_file and not tls_cert:
        return True
    context = ssl.create_default_context(cafile=ca_file)
    if tls_cert:
        context.load_cert_chain(tls_cert, tls_key)
    return context
_OVERHEAD = 96  # bytes a queued record costs beyond its JSON (the Raw, its bytes object, a deque slot)
_ENVELOPE = 256  # a batch's own fields, beyond its records and names
_RECORDS = ("events", "frames", "servers")


@dataclass(eq=False)
class Outgoing:
    body: bytes  # the batch as sent, its sequence number inside
    events: int
    frames: int
    spooled: Spooled | None = None  # its file, once it is on disk


def split_batch(body: bytes, room: int) -> list[tuple[bytes, int, int, int]] | None:
    """Halve a batch body by size: [(body, room, events, frames)] for each half, numbered at the start of
    each half of its number range; None when it holds one record or has no room left to number halves."""
    fields = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    seq = msgspec.json.decode(fields["seq"], type=int)
    records = [(kind, raw) for kind in _RECORDS if kind in fields
               for raw in msgspec.json.decode(fields[kind], type=list[msgspec.Raw])]
    if len(records) < 2 or room < 2:
        return None
    total, cut, size = sum(len(r) for _, r in records), 0, 0
    while cut < len(records) - 1 and (cut == 0 or size + len(records[cut][1]) <= total / 2):
        size += len(records[cut][1])
        cut += 1
    parts = []
    for chunk, number in ((records[:cut], seq), (records[cut:], seq + room // 2)):
        out = {k: v for k, v in fields.items() if k not in _RECORDS}
        out["seq"] = msgspec.Raw(str(number).encode())
        for kind in _RECORDS:
            if any(k == kind for k, _ in chunk):
                out[kind] = [raw for k, raw in chunk if k == kind]
        events = sum(1 for k, _ in chunk if k == "events")
        parts.append((msgspec.json.encode(out), room // 2, events, len(chunk) - events))
    return parts


class Shipper:
    families = (
        Family("fleetscope_agent_shipper_up", "gauge",
               "1 while the shipper runs and its spool takes what it is given; 0 when its thread died or hangs, or "
               "the spool fails (batches then wait in memory only)."),
        Family("fleetscope_agent_shipper_batches_sent_total", "counter", "Batches the collector acknowledged."),
        Family("fleetscope_agent_shipper_events_sent_total", "counter", "Events the collector acknowledged."),
        Family("fleetscope_agent_shipper_send_failures_total", "counter", "Attempts to send a batch that failed (each is retried)."),
        Family("fleetscope_agent_shipper_batches_split_total", "counter",
               "Batches halved because they were over the collector's body limit."),
        Family("fleetscope_agent_shipper_dropped_total", "counter", "Events or frames dropped and never shipped, by reason.", ("reason",)),
        Family("fleetscope_agent_shipper_spool_errors_total", "counter",
               "Spool operations that failed, by error (enospc, erofs, eacces, eio, ...); each is retried.", ("reason",)),
        Family("fleetscope_agent_shipper_errors_total", "counter",
               "Unexpected errors in the shipper's threads (logged with a traceback; the thread carries on)."),
        Family("fleetscope_agent_shipper_queue_events", "gauge", "Events waiting in memory to be shipped."),
        Family("fleetscope_agent_shipper_queue_bytes", "gauge", "Memory held by events, frames and batches waiting to be shipped."),
        Family("fleetscope_agent_shipper_spool_batches", "gauge", "Batches waiting in the disk spool."),
        Family("fleetscope_agent_shipper_spool_events", "gauge", "Events waiting in the disk spool."),
        Family("fleetscope_agent_shipper_spool_bytes", "gauge", "Size of the disk spool."),
        Family("fleetscope_agent_shipper_last_success_timestamp_seconds", "gauge", "Unix time of the last acknowledged batch."),
    )

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        agent_id: str,
        node: str,
        batch_events: int = 2000,
        max_batch_bytes: int = 4 * 1024 * 1024,
        flush_interval_s: float = 1.0,
        max_queue_bytes: int = 64 * 1024 * 1024,
        max_frame_bytes: int = 8 * 1024 * 1024,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        labels: dict[str, str] | None = None,
        spool_dir: str | Path | None = None,
        spool_bytes: int = 512 * 1024 * 1024,
        ca_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.labels = dict(labels or {})
        self.url = url.rstrip("/") + "/v1/ingest"
        self.agent_id = agent_id
        self.node = node
        self._server_frames = ServerFrames()  # only the sampler's thread calls enqueue_snapshot
        self.batch_events = batch_events
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval_s = flush_interval_s
        self.max_queue_bytes = max_queue_bytes
        self.max_frame_bytes = max_frame_bytes
        self.stuck_after_s = max(60.0, 4 * timeout_s)
        self.events: deque[msgspec.Raw] = deque()
        self.frames: deque[tuple[bool, msgspec.Raw]] = deque()  # (is a server frame, its JSON)
        self.event_bytes = self.frame_bytes = self.outbox_bytes = 0
        self.outbox: deque[Outgoing] = deque()  # numbered batches in memory, oldest first, not (yet) on disk
        self.seq = 0
        self.epoch = new_epoch()
        self.spool = Spool(Path(spool_dir), spool_bytes) if spool_dir is not None else None
        self.sent_batches = self.sent_events = self.failures = self.splits = self.errors = 0
        self.dropped: Counter[str] = Counter({"queue_full": 0, "frames_queue_full": 0, "rejected": 0, "too_large": 0})
        self.spool_errors: Counter[str] = Counter()
        self.spool_problem: str | None = None
        self.failing = False  # the last send failed: what arrives goes to disk every flush interval
        self.inflight_since: float | None = None
        self.last_success: float | None = None
        self._logged: dict[str, float] = {}
        self._last_probe = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._keeper_wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        headers = {"Content-Type": "application/json"}
        if token:  # none when a client certificate is this agent's identity
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport,
                                   verify=client_tls(ca_file, tls_cert, tls_key))
        if self.spool is not None and self.spool.open_error is not None:
            self._spool_fault("open", self.spool.open_error)

    # Producers (listener thread, sampler thread).
    def enqueue_event(self, event: Event) -> None:
        raw = msgspec.Raw(encode(event))
        with self._lock:
            self.events.append(raw)
            self.event_bytes += len(raw) + _OVERHEAD
            while self.event_bytes + self.outbox_bytes > self.max_queue_bytes and self.events:
                self.event_bytes -= len(self.events.popleft()) + _OVERHEAD
                self.dropped["queue_full"] += 1
            full = len(self.events) >= self.batch_events or self.event_bytes >= self.max_batch_bytes
        if full:
            self._wake.set()

    def enqueue_snapshot(self, snapshot: Snapshot) -> None:
        self._enqueue_frame(False, encode(host_frame(snapshot, self.node, self.labels)))
        for frame in self._server_frames.frames(snapshot.servers, self.node):
            self.enqueue_server_frame(frame)

    def enqueue_server_frame(self, frame: ServerFrame) -> None:
        self._enqueue_frame(True, encode(frame))

    def _enqueue_frame(self, server: bool, body: bytes) -> None:
        with self._lock:
            self.frames.append((server, msgspec.Raw(body)))
            self.frame_bytes += len(body) + _OVERHEAD
            while self.frame_bytes > self.max_frame_bytes and len(self.frames) > 1:
                self.frame_bytes -= len(self.frames.popleft()[1]) + _OVERHEAD
                self.dropped["frames_queue_full"] += 1

    def problem(self) -> str | None:
        """Why the shipper cannot do its job now, or None."""
        if any(not t.is_alive() for t in self._threads) and not self._stop.is_set():
            return "a shipper thread died"
        since = self.inflight_since
        if since is not None and time.monotonic() - since > self.stuck_after_s:
            return f"a send has hung for {time.monotonic() - since:.0f} s"
        return self.spool_problem

    def readings(self):
        with self._lock:
            queued = len(self.events) + sum(item.events for item in self.outbox)
            held = self.event_bytes + self.outbox_bytes + self.frame_bytes
            dropped = dict(self.dropped)
            spool_errors = dict(self.spool_errors)
            if self.spool is not None:
                dropped["spool_full"] = self.spool.dropped_events + self.spool.dropped_frames
                spool = (len(self.spool), self.spool.events, self.spool.bytes)
            else:
                spool = None
        yield Reading("fleetscope_agent_shipper_up", 0.0 if self.problem() else 1.0)
        yield Reading("fleetscope_agent_shipper_batches_sent_total", float(self.sent_batches))
        yield Reading("fleetscope_agent_shipper_events_sent_total", float(self.sent_events))
        yield Reading("fleetscope_agent_shipper_send_failures_total", float(self.failures))
        yield Reading("fleetscope_agent_shipper_batches_split_total", float(self.splits))
        for reason, n in dropped.items():
            yield Reading("fleetscope_agent_shipper_dropped_total", float(n), (("reason", reason),))
        for reason, n in spool_errors.items():
            yield Reading("fleetscope_agent_shipper_spool_errors_total", float(n), (("reason", reason),))
        yield Reading("fleetscope_agent_shipper_errors_total", float(self.errors))
        yield Reading("fleetscope_agent_shipper_queue_events", float(queued))
        yield Reading("fleetscope_agent_shipper_queue_bytes", float(held))
        if spool is not None:
            yield Reading("fleetscope_agent_shipper_spool_batches", float(spool[0]))
            yield Reading("fleetscope_agent_shipper_spool_events", float(spool[1]))
            yield Reading("fleetscope_agent_shipper_spool_bytes", float(spool[2]))
        if self.last_success is not None:
            yield Reading("fleetscope_agent_shipper_last_success_timestamp_seconds", self.last_success)

    def _log(self, key: str, level: int, message: str, *args, every_s: float = 60.0, exc_info: bool = False) -> None:
        """One line per `key` per `every_s`: the counters carry the rest."""
        now = time.monotonic()
        if key not in self._logged or now - self._logged[key] >= every_s:
            self._logged[key] = now
            log.log(level, message, *args, exc_info=exc_info)

    # Batches.
    def _form_batch_locked(self) -> Outgoing | None:
        """Cut the next numbered batch from what is queued in memory, under `max_batch_bytes`."""
        if not self.events and not self.frames:
            return None
        budget = self.max_batch_bytes - _ENVELOPE - len(self.agent_id) - len(self.node) - len(self.epoch)
        used, events, host, servers = 0, [], [], []

        def take_frames(limit: int) -> None:
            nonlocal used
            while self.frames and (used == 0 or used + len(self.frames[0][1]) + 1 <= limit):
                server, raw = self.frames.popleft()
                self.frame_bytes -= len(raw) + _OVERHEAD
                used += len(raw) + 1
                (servers if server else host).append(raw)

        take_frames(budget // 2)  # frames first, so a flood of events never starves the node's own samples
        while self.events and len(events) < self.batch_events and (used == 0 or used + len(self.events[0]) + 1 <= budget):
            raw = self.events.popleft()
            self.event_bytes -= len(raw) + _OVERHEAD
            used += len(raw) + 1
            events.append(raw)
        take_frames(budget)
        if self.seq + SEQ_STRIDE > EPOCH_SEQ_LIMIT:
            self.epoch, self.seq = new_epoch(), 0
        batch = Batch(v=1, agent_id=self.agent_id, seq=self.seq, node=self.node, sent_ts=time.time(), events=events,
                      frames=host, servers=servers, epoch=self.epoch)
        self.seq += SEQ_STRIDE
        return Outgoing(encode(batch), len(events), len(host) + len(servers))

    def _hold_locked(self, item: Outgoing) -> None:
        self.outbox.append(item)
        self.outbox_bytes += len(item.body)

    def _next(self) -> Outgoing | None:
        """The oldest batch: the spool's head, else the oldest in memory, else a new one."""
        with self._lock:
            head = self.spool.head() if self.spool is not None else None
            if head is None:
                if not self.outbox:
                    item = self._form_batch_locked()
                    if item is None:
                        return None
                    self._hold_locked(item)
                return self.outbox[0]
        try:
            return Outgoing(head.read(), head.events, head.frames, spooled=head)
        except OSError as exc:
            # Unreadable (gone, an I/O error): it would block every later batch; its loss is counted.
            self._spool_fault("read", exc)
            with self._lock:
                if self.spool.forget(head):
                    self.dropped["spool_unreadable"] += head.events + head.frames
            return None

    def _done(self, item: Outgoing) -> None:
        with self._lock:
            if item in self.outbox:
                self.outbox.remove(item)
                self.outbox_bytes -= len(item.body)
            try:
                if item.spooled is not None:
                    self.spool.remove(item.spooled)
                fault = None
            except OSError as exc:
                fault = exc
        if fault is not None:
            self._spool_fault("remove", fault)

    # Sending (the sender thread).
    def send_once(self) -> bool:
        """Send the next batch; True when it is done with (or there was none), False to back off."""
        item = self._next()
        if item is None:
            return True
        with self._lock:
            self.inflight_since = time.monotonic()
        try:
            why = self._post(item.body, SEQ_STRIDE, item.events, item.frames)
        finally:
            with self._lock:
                self.inflight_since = None
        if why is None:
            self._done(item)
            self.failing = False
            return True
        self.failures += 1
        self.failing = True
        self._keeper_wake.set()  # what is in memory goes to disk now
        where = f"{len(self.spool)} batches spooled" if self.spool is not None else "kept in memory"
        if self.failures == 1 or self.failures % 20 == 0:
            log.warning("%s; %s, will retry", why, where)
        return False

    def _post(self, body: bytes, room: int, events: int, frames: int) -> str | None:
        """Deliver one body, split if it is too large; None when it is done with (acknowledged, or refused
        for good and counted), else why it failed (it is then sent again, whole, later)."""
        if len(body) > self.max_batch_bytes and (parts := self._split(body, room)):
            return self._post_parts(parts)
        try:
            resp = self.client.post(self.url, content=body)
        except httpx.HTTPError as exc:
            return f"collector unreachable ({exc})"
        if resp.status_code < 300:
            try:
                duplicate = resp.json().get("duplicate") is True  # a part applied before the last failure
            except (ValueError, AttributeError):
                duplicate = False
            with self._lock:
                self.sent_batches += 1
                self.sent_events += 0 if duplicate else events
                self.last_success = time.time()
            return None
        if resp.status_code == 413:
            if parts := self._split(body, room):
                return self._post_parts(parts)
            self._log("too_large", logging.ERROR, "collector refused a batch of one record (%d bytes) as too large: %s; dropped",
                      len(body), resp.text[:300])
            with self._lock:
                self.dropped["too_large"] += events + frames
            return None
        if resp.status_code in (400, 422):
            # The collector will never accept this batch; keeping it would block every later one.
            self._log("rejected", logging.ERROR, "collector refused a batch for good (%d): %s; %d events and %d frames dropped",
                      resp.status_code, resp.text[:500], events, frames)
            with self._lock:
                self.dropped["rejected"] += events + frames
            return None
        return f"collector answered {resp.status_code}: {resp.text[:300]}"

    def _split(self, body: bytes, room: int):
        try:
            parts = split_batch(body, room)
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
            parts = None
        if parts:
            self.splits += 1
            self._log("split", logging.WARNING, "a batch of %d bytes is over the collector's body limit: sent in parts", len(body))
        return parts

    def _post_parts(self, parts) -> str | None:
        for body, room, events, frames in parts:
            if (why := self._post(body, room, events, frames)) is not None:
                return why
        return None

    # Spooling (the keeper thread).
    def _spool_fault(self, op: str, exc: OSError) -> None:
        reason = errno.errorcode.get(exc.errno, "other").lower() if exc.errno else "other"
        with self._lock:
            self.spool_errors[reason] += 1
            first = self.spool_problem is None
            self.spool_problem = f"spool {op} failed: {exc}"
        if first:
            self._logged.pop("spool", None)
        self._log("spool", logging.ERROR, "spool %s failed (%s); batches wait in memory (up to %d bytes) and the spool is "
                  "tried again every %.0f s", op, exc, self.max_queue_bytes, self.flush_interval_s)

    def _spool_ok(self) -> None:
        if self.spool_problem is not None:
            log.warning("the spool works again (after: %s)", self.spool_problem)
            self.spool_problem = None

    def _must_spill(self) -> bool:
        with self._lock:
            since = self.inflight_since
            return (self.failing or bool(len(self.spool))
                    or (since is not None and time.monotonic() - since >= self.flush_interval_s))

    def keep_once(self) -> None:
        """The keeper's round: spill to disk when events would otherwise wait in memory; after a spool fault,
        probe the disk now and then so the fault clears once it is over."""
        if self.spool is None:
            return
        if self._must_spill():
            self.spill()
        elif self.spool_problem is not None and time.monotonic() - self._last_probe >= 5:
            self._last_probe = time.monotonic()
            try:
                self.spool.probe()
            except OSError as exc:
                self._spool_fault("probe", exc)
            else:
                self._spool_ok()

    def spill(self) -> None:
        """Write every batch held in memory, then everything queued, to the spool, in order; stop at the first
        disk error (what is left waits in memory, bounded, and is tried again next round)."""
        if self.spool is None:
            return
        while True:
            with self._lock:
                if not self.outbox:
                    item = self._form_batch_locked()
                    if item is None:
                        return
                    self._hold_locked(item)
                item = self.outbox[0]
            try:
                written = self.spool.write(item.body, item.events, item.frames)
            except OSError as exc:
                self._spool_fault("write", exc)
                return
            with self._lock:
                still_held = bool(self.outbox) and self.outbox[0] is item
                if still_held:
                    # If it is being sent right now, the sender removes this file once it is acknowledged.
                    self.outbox.popleft()
                    self.outbox_bytes -= len(item.body)
                    item.spooled = written
                    self.spool.add(written)
            if not still_held:  # acknowledged while it was being written
                try:
                    written.path.unlink(missing_ok=True)
                except OSError:
                    pass
            self._spool_ok()

    # Threads.
    def _unexpected(self) -> None:
        self.errors += 1
        self._log("error", logging.ERROR, "unexpected error in the shipper; it carries on", exc_info=True)
        self._stop.wait(1.0)

    def _send_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                ok = self.send_once()
            except Exception:
                self._unexpected()
                ok = False
            if ok:
                backoff = 0.5
                with self._lock:
                    more = (len(self.events) >= self.batch_events or self.event_bytes >= self.max_batch_bytes
                            or bool(self.outbox) or bool(self.spool and len(self.spool)))
                if not more:
                    self._wake.wait(self.flush_interval_s)
                    self._wake.clear()
            else:
                # Exponential backoff with full jitter, so a fleet does not retry in lockstep.
                self._stop.wait(random.uniform(0, backoff))
                backoff = min(backoff * 2, 30.0)

    def _keep_loop(self) -> None:
        while not self._stop.is_set():
            self._keeper_wake.wait(self.flush_interval_s)
            self._keeper_wake.clear()
            if self._stop.is_set():
                return
            try:
                self.keep_once()
            except Exception:
                self._unexpected()

    def start(self) -> None:
        self._threads = [Thread(target=self._send_loop, name="shipper", daemon=True),
                         Thread(target=self._keep_loop, name="shipper-spool", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop: try for up to `drain_s` to ship what is queued, then spool what is left."""
        self._stop.set()
        self._wake.set()
        self._keeper_wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            with self._lock:
                empty = not self.outbox and not self.events and not self.frames and not (self.spool and len(self.spool))
            if empty or not self.send_once():
                break
        self.spill()
        with self._lock:
            left = len(self.events) + sum(item.events for item in self.outbox)
            spooled = self.spool.events if self.spool is not None else 0
        if left:
            log.warning("stopping with %d events not shipped", left)
        if spooled:
            log.info("stopping with %d events in the spool; they are sent after the next start", spooled)
        self.client.close()
