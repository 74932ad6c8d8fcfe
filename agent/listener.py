"""Receives workload events over UDP, validates them, adds node and GPU, and hands them to the shipper."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Callable

import msgspec

from agent.sources.base import Family, Reading
from fleetscope.schema import Event, SchemaError, UnsupportedVersion, decode_event
from fleetscope.vocabulary import UDP_MAX_BYTES

log = logging.getLogger("fleetscope.agent.listener")

MAX_DATAGRAM = UDP_MAX_BYTES
# The client never sends more than this; anything larger is refused as a whole.
MAX_EVENT_BYTES = 60_000


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
    ) -> None:
        self.node = node
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

    def handle(self, data: bytes) -> Event | None:
        """Validate and enrich one datagram; returns the event delivered, or None if refused."""
        if len(data) > MAX_EVENT_BYTES:
            self._reject("too_large", f"datagram of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
            return None
        try:
            event = decode_event(data)
        except UnsupportedVersion as exc:
            self._reject("version", str(exc))
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

    def _reject(self, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_log > 10:  # one line per 10 s, the counter has the rest
            self._last_log = now
            log.warning("refused a workload event (%s): %s", reason, message)

    def readings(self):
        for kind in ("step", "request", "pause"):
            yield Reading("fleetscope_agent_events_received_total", float(self.received[kind]), (("kind", kind),))
        for reason in ("invalid", "version", "too_large"):
            yield Reading("fleetscope_agent_events_rejected_total", float(self.rejected[reason]), (("reason", reason),))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("event socket failed")
                time.sleep(0.5)
                continue
            if self._stop.is_set():
                return
            try:
                self.handle(data)
            except Exception:
                log.exception("unexpected error handling a workload event")

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
