"""Receives workload events over UDP, validates them, adds node and GPU, and hands them to the shipper.

Each sender (source address and port) gets a token bucket of events and bytes per second, so one
runaway or hostile process cannot fill the agent's bounded queue with its own events; what a
bucket refuses is counted (`reason="rate_limited"`) without being decoded. A datagram that cannot
be decoded (not JSON, the wrong schema, nested too deeply for the decoder) is refused and counted
with one log line per ten seconds, never a traceback per datagram.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Callable

import msgspec

from agent.sources.base import Family, Reading
from fleetscope.schema import Event, SchemaError, TooDeep, UnsupportedVersion, decode_event
from fleetscope.vocabulary import UDP_MAX_BYTES

log = logging.getLogger("fleetscope.agent.listener")

MAX_DATAGRAM = UDP_MAX_BYTES
# The client never sends more than this; anything larger is refused as a whole.
MAX_EVENT_BYTES = 60_000
REJECT_REASONS = ("invalid", "version", "too_large", "too_deep", "rate_limited", "error")


class SenderLimits:
    """Token buckets of events and bytes per sender, each holding `burst_s` seconds of its rate.

    At most `max_senders` buckets are kept; past that the oldest is forgotten (a sender that comes back
    starts with a full bucket, which costs nothing but a burst). A rate of 0 turns that limit off."""

    def __init__(self, events_per_s: float = 5000, bytes_per_s: float = 4 * 1024 * 1024, burst_s: float = 2.0,
                 max_senders: int = 4096) -> None:
        self.events_per_s, self.bytes_per_s = events_per_s, bytes_per_s
        self.max_events, self.max_bytes = events_per_s * burst_s, bytes_per_s * burst_s
        self.max_senders = max_senders
        self.buckets: dict[object, list[float]] = {}  # sender -> [events left, bytes left, when]

    def allow(self, sender: object, size: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(sender)
        if bucket is None:
            while len(self.buckets) >= self.max_senders:
                del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[sender] = [self.max_events, self.max_bytes, now]
        else:
            elapsed = max(0.0, now - bucket[2])
            bucket[0] = min(self.max_events, bucket[0] + elapsed * self.events_per_s)
            bucket[1] = min(self.max_bytes, bucket[1] + elapsed * self.bytes_per_s)
            bucket[2] = now
        if (self.events_per_s and bucket[0] < 1) or (self.bytes_per_s and bucket[1] < size):
            return False
        bucket[0] -= 1
        bucket[1] -= size
        return True


class Listener:
    families = (
        Family("fleetscope_agent_events_received_total", "counter", "Workload events accepted from the client.", ("kind",)),
        Family("fleetscope_agent_events_rejected_total", "counter", "Workload datagrams refused, by reason.", ("reason",)),
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        node: str,
        deliver: Callable[[Event], None],
        gpu_lookup: Callable[[int, int], str | None] = lambda pid, local_rank: None,
        limits: SenderLimits | None = None,
    ) -> None:
        self.node = node
        self.limits = limits if limits is not None else SenderLimits()
        self.deliver = deliver
        self.gpu_lookup = gpu_lookup
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        # pid -> (training job, rank), so the GPU source can name the job a GPU process belongs to
        self.workloads: dict[int, tuple[str, str]] = {}
        self._last_log = 0.0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A burst of steps from 8 ranks must not overflow the kernel buffer while we enrich.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((host, port))
        # Blocking, no timeout: an idle agent never wakes up for nothing; stop() wakes it with a datagram.
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, data: bytes, sender: object = None) -> Event | None:
        """Validate and enrich one datagram from `sender` (its address); returns the event delivered, or None if refused."""
        if not self.limits.allow(sender, len(data)):
            self._reject("rate_limited", f"sender {sender} is over {self.limits.events_per_s:g} events or "
                                         f"{self.limits.bytes_per_s:g} bytes a second")
            return None
        if len(data) > MAX_EVENT_BYTES:
            self._reject("too_large", f"datagram of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
            return None
        try:
            event = decode_event(data)
        except UnsupportedVersion as exc:
            self._reject("version", str(exc))
            return None
        except (TooDeep, RecursionError) as exc:
            # msgspec gives up on deep nesting (even in a field it would skip) with RecursionError; the schema
            # names it TooDeep.
            self._reject("too_deep", f"datagram of {len(data)} bytes from {sender}: {exc}")
            return None
        except SchemaError as exc:
            self._reject("invalid", str(exc))
            return None
        if event.node is not None or event.gpu_uuid is not None:
            # Those fields are the agent's to set; a client that sets them is confused or lying.
            event = msgspec.structs.replace(event, node=None, gpu_uuid=None)
        local_rank = getattr(event, "local_rank", -1)
        event = msgspec.structs.replace(event, node=self.node, gpu_uuid=self.gpu_lookup(event.pid, local_rank))
        self.received[type(event).__struct_config__.tag] += 1
        if event.pid and hasattr(event, "job"):
            self.workloads[event.pid] = (event.job, str(event.rank))
            if len(self.workloads) > 65536:  # bounded: drop the oldest pids
                del self.workloads[next(iter(self.workloads))]
        self.deliver(event)
        return event

    def _reject(self, reason: str, message: str, exc_info: bool = False) -> None:
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_log > 10:  # one line per 10 s, the counter has the rest
            self._last_log = now
            log.warning("refused a workload event (%s): %s", reason, message, exc_info=exc_info)

    def readings(self):
        for kind in ("step", "request", "pause"):
            yield Reading("fleetscope_agent_events_received_total", float(self.received[kind]), (("kind", kind),))
        for reason in REJECT_REASONS:
            yield Reading("fleetscope_agent_events_rejected_total", float(self.rejected[reason]), (("reason", reason),))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("event socket failed")
                time.sleep(0.5)
                continue
            if self._stop.is_set():
                return
            try:
                self.handle(data, sender)
            except Exception as exc:  # a bug, not the sender's fault: counted, and its traceback at most every 10 s
                self._reject("error", f"unexpected error handling a datagram from {sender}: {exc!r}", exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            host, port = self.address[:2]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wake:
                wake.sendto(b"", ("127.0.0.1" if host in ("0.0.0.0", "") else host, port))
            self._thread.join(timeout=5)
        self.sock.close()
