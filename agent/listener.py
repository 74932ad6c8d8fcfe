"""Receives workload events, validates them, adds node and GPU, and hands them to the shipper.

Two transports, one or both (`events_address = "unix:/run/fleetscope/events.sock,127.0.0.1:9836"`):
- a Unix datagram socket with SO_PASSCRED: the kernel tells the agent each sender's pid and uid, so the
  event's pid is the kernel's (a different claim is counted and corrected) and the event is verified;
- UDP on loopback, the fallback: any local process can send, and the pid is only what the event says.
Each sender gets a token bucket of events and bytes per second (a Unix sender: its uid, however many
sockets it opens; a UDP sender: its address and port), so one runaway or hostile process cannot fill
the agent's bounded queue with its own events; what a bucket refuses is counted
(`reason="rate_limited"`) without being decoded. A datagram that cannot be decoded (not JSON, the
wrong schema, nested too deeply for the decoder) is refused and counted with one log line per ten
seconds, never a traceback per datagram.
"""

from __future__ import annotations

import grp
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter
from typing import Callable, NamedTuple

import msgspec

from agent.sources.base import Family, Reading
from agent.config import split_address
from agent.threads import Thread
from fleetscope.schema import Event, PodIds, SchemaError, SlurmIds, TooDeep, UnsupportedVersion, decode_client_event
from fleetscope.vocabulary import MAX_DATAGRAM_BYTES, UDP_MAX_BYTES

log = logging.getLogger("fleetscope.agent.listener")

MAX_DATAGRAM = UDP_MAX_BYTES
# The client never sends more than this; anything larger is refused as a whole.
MAX_EVENT_BYTES = MAX_DATAGRAM_BYTES
REJECT_REASONS = ("invalid", "version", "too_large", "too_deep", "rate_limited", "error")
# struct ucred: pid, uid, gid, as SCM_CREDENTIALS carries it
_UCRED = struct.Struct("iII")
_CMSG_SPACE = socket.CMSG_SPACE(_UCRED.size)
_DRAIN = 256  # datagrams read from one socket before the others get a turn


class Endpoint(NamedTuple):
    """One socket the listener binds: `unix` (path, and the group allowed to send, or everyone) or `udp` (host, port)."""

    transport: str
    host: str = ""
    port: int = 0
    path: str = ""
    group: str | None = None


def parse_events_address(spec: str, default_host: str = "127.0.0.1") -> list[Endpoint]:
    """`unix:/path[?group=NAME]` and `host:port`, comma-separated; at most one of each transport."""
    endpoints = []
    for part in (p.strip() for p in spec.split(",")):
        if part.startswith("unix:"):
            path, _, query = part[len("unix:"):].partition("?")
            group = None
            for option in filter(None, query.split("&")):
                key, _, value = option.partition("=")
                if key != "group" or not value:
                    raise ValueError(f"events_address {part!r}: the only option is ?group=NAME, got {option!r}")
                group = value
            if not os.path.isabs(path):
                raise ValueError(f"events_address {part!r}: the socket path must be absolute (unix:/run/fleetscope/events.sock)")
            endpoints.append(Endpoint("unix", path=path, group=group))
        else:
            try:
                host, port = split_address(part, default_host)
                endpoints.append(Endpoint("udp", host=host, port=port))
            except ValueError:
                raise ValueError(f"events_address {part!r} is neither host:port nor unix:/path") from None
    if not endpoints or len({e.transport for e in endpoints}) != len(endpoints):
        raise ValueError(f"events_address {spec!r}: give one unix:/path, one host:port, or one of each")
    return endpoints


def bind_unix(path: str, group: str | None) -> socket.socket:
    """A Unix datagram socket at `path` that receives its senders' credentials, writable by all (or by `group`).

    A socket file left by an agent that died is removed; one a live process still reads is not, nor a file
    that is not a socket."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"events socket {path} exists and is not a socket; remove it or choose another path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale: nobody reads it
            else:
                raise OSError(f"events socket {path} is in use by another process (another agent?)")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder)
        os.chmod(folder, 0o755)  # every workload user must reach the socket; the umask (0077 in the unit) would not let them
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
        if group is None:
            os.chmod(path, 0o666)
        else:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
    except BaseException:
        sock.close()
        if os.path.lexists(path):
            os.unlink(path)
        raise
    return sock


def credentials(ancdata) -> tuple[int, int, int] | None:
    """(pid, uid, gid) from recvmsg's ancillary data, or None when the kernel sent none."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            return _UCRED.unpack_from(data)
    return None


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


class _StructsByPid:
    """What a lookup (the agent's Slurm or pod attribution) reads for a process, as the schema's struct, made once
    per answer: the lookup caches per process, so a new answer object means the process's ids changed. Something
    /proc held that the schema refuses gives None, and the client's own claim stays."""

    def __init__(self, lookup: Callable[[int], dict | None] | None, struct: type) -> None:
        self.lookup = lookup
        self.struct = struct
        self._made: dict[int, tuple[dict, object]] = {}

    def __call__(self, pid: int):
        ids = self.lookup(pid)
        if ids is None:
            return None
        made = self._made.get(pid)
        if made is None or made[0] is not ids:
            try:
                struct = msgspec.convert(ids, self.struct)
            except msgspec.ValidationError:
                struct = None
            made = self._made[pid] = (ids, struct)
            if len(self._made) > 65536:
                del self._made[next(iter(self._made))]
        return made[1]


class Listener:
    families = (
        Family("fleetscope_agent_events_received_total", "counter", "Workload events accepted from the client.", ("kind",)),
        Family("fleetscope_agent_events_verified_total", "counter",
               "Workload events accepted over the Unix socket, their sender's pid and uid vouched for by the kernel "
               "(the rest of received_total came over UDP, unverified).", ("kind",)),
        Family("fleetscope_agent_events_pid_mismatch_total", "counter",
               "Events over the Unix socket that claimed a pid other than their sender's, recorded with the sender's."),
        Family("fleetscope_agent_events_rejected_total", "counter", "Workload datagrams refused, by reason.", ("reason",)),
        Family("fleetscope_agent_events_unknown_fields_total", "counter",
               "Events accepted without fields this agent does not know (from a newer client: upgrade the agent)."),
    )

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        node: str,
        deliver: Callable[[Event], None],
        gpu_lookup: Callable[[int, int], str | None] = lambda pid, local_rank: None,
        limits: SenderLimits | None = None,
        slurm_lookup: Callable[[int], dict | None] | None = None,
        pod_lookup: Callable[[int], dict | None] | None = None,
    ) -> None:
        """`host`, `port`: the UDP socket; or `host` alone, the whole `events_address` (see `parse_events_address`).

        `split_address` of "unix:/p,127.0.0.1:9836" gives ("unix:/p,127.0.0.1", 9836), which is joined again here."""
        self.node = node
        self.limits = limits if limits is not None else SenderLimits()
        self.deliver = deliver
        self.gpu_lookup = gpu_lookup
        # pid -> the Slurm job's ids (agent/slurm.py, cached per process): set on the events of a Unix sender,
        # whose pid the kernel vouches for; a UDP event keeps what its client sent.
        self.slurm_lookup = slurm_lookup
        self._slurm_structs = _StructsByPid(slurm_lookup, SlurmIds)
        # pid -> the Kubernetes pod the agent reads for it (agent/kubernetes.py PodAttribution), likewise for a Unix
        # sender, `verified`; a pod the client names itself (UDP, or a sender the agent finds in no pod) is kept
        # as its claim, never verified.
        self.pod_lookup = pod_lookup
        self._pod_structs = _StructsByPid(pod_lookup, PodIds)
        self.received: Counter[str] = Counter()
        self.verified: Counter[str] = Counter()
        self.pid_mismatch = 0
        self.rejected: Counter[str] = Counter()
        self.unknown_fields = 0
        self._unknown_logged: set[str] = set()
        # pid -> (training job, rank), so the GPU source can name the job a GPU process belongs to
        self.workloads: dict[int, tuple[str, str]] = {}
        self._verified_pids: dict[int, None] = {}  # pids a Unix sender proved: a UDP claim cannot rename them
        self._last_log = 0.0
        self.endpoints = parse_events_address(host if port is None else f"{host}:{port}")
        self.sock: socket.socket | None = None  # UDP
        self.unix_sock: socket.socket | None = None
        self.unix_path: str | None = None
        self._unix_inode = 0
        try:
            for endpoint in self.endpoints:
                if endpoint.transport == "udp":
                    self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    # A burst of steps from 8 ranks must not overflow the kernel buffer while we enrich.
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
                    self.sock.bind((endpoint.host, endpoint.port))
                else:
                    self.unix_sock = bind_unix(endpoint.path, endpoint.group)
                    self.unix_path = endpoint.path
                    self._unix_inode = os.stat(endpoint.path).st_ino
        except BaseException:
            self._close()
            raise
        # What a client is given: the UDP (host, port) where there is one, for compatibility, else the path.
        self.address = self.sock.getsockname() if self.sock is not None else self.unix_path
        self.addresses = ([f"unix:{self.unix_path}"] if self.unix_sock is not None else []) + \
            ([f"udp:{self.address[0]}:{self.address[1]}"] if self.sock is not None else [])
        # The thread sleeps in select() until a datagram comes; stop() wakes it through this pair.
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, data: bytes, sender: object = None, creds: tuple[int, int, int] | None = None) -> Event | None:
        """Validate and enrich one datagram; returns the event delivered, or None if refused.

        `sender`: a UDP sender's address. `creds`: a Unix sender's (pid, uid, gid) from the kernel, which then
        decide the bucket (the uid) and the event's pid."""
        key = sender if creds is None else ("uid", creds[1])
        if not self.limits.allow(key, len(data)):
            self._reject("rate_limited", f"sender {self._name(sender, creds)} is over {self.limits.events_per_s:g} "
                                         f"events or {self.limits.bytes_per_s:g} bytes a second")
            return None
        if len(data) > MAX_EVENT_BYTES:
            self._reject("too_large", f"datagram of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
            return None
        try:
            event, unknown = decode_client_event(data)
        except UnsupportedVersion as exc:
            self._reject("version", str(exc))
            return None
        except (TooDeep, RecursionError) as exc:
            # msgspec gives up on deep nesting (even in a field it would skip) with RecursionError; the schema
            # names it TooDeep.
            self._reject("too_deep", f"datagram of {len(data)} bytes from {self._name(sender, creds)}: {exc}")
            return None
        except SchemaError as exc:
            self._reject("invalid", str(exc))
            return None
        kind = type(event).__struct_config__.tag
        if unknown:
            self._unknown_fields(unknown)
        pid = event.pid
        if creds is not None and pid != creds[0]:
            # The kernel's pid, in the agent's pid namespace (0 when the sender is not visible from it). A workload
            # in a container with its own pid namespace claims its inner pid: counted here too, and corrected.
            if pid:
                self.pid_mismatch += 1
            pid = creds[0]
        # node and gpu_uuid are the agent's to set; a client that sets them is confused or lying.
        slurm = self._slurm_structs(pid) if creds is not None and pid and self.slurm_lookup is not None else None
        pod = self._pod_structs(pid) if creds is not None and pid and self.pod_lookup is not None else None
        if pod is None and event.pod is not None and event.pod.verified:
            pod = msgspec.structs.replace(event.pod, verified=False)  # only the agent verifies
        event = msgspec.structs.replace(event, node=self.node, pid=pid,
                                        gpu_uuid=self.gpu_lookup(pid, getattr(event, "local_rank", -1)),
                                        slurm=slurm or event.slurm, pod=pod or event.pod)
        self.received[kind] += 1
        if creds is not None:
            self.verified[kind] += 1
        if pid and hasattr(event, "job") and (creds is not None or pid not in self._verified_pids):
            self.workloads[pid] = (event.job, str(event.rank))
            if len(self.workloads) > 65536:  # bounded: drop the oldest pids
                del self.workloads[next(iter(self.workloads))]
            if creds is not None:
                self._verified_pids[pid] = None
                if len(self._verified_pids) > 65536:
                    del self._verified_pids[next(iter(self._verified_pids))]
        self.deliver(event)
        return event

    @staticmethod
    def _name(sender: object, creds: tuple[int, int, int] | None) -> str:
        return str(sender) if creds is None else f"uid {creds[1]} (pid {creds[0]})"

    def _reject(self, reason: str, message: str, exc_info: bool = False) -> None:
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_log > 10:  # one line per 10 s, the counter has the rest
            self._last_log = now
            log.warning("refused a workload event (%s): %s", reason, message, exc_info=exc_info)

    def _unknown_fields(self, paths: list[str]) -> None:
        self.unknown_fields += 1
        new = [p for p in paths if p not in self._unknown_logged]
        if new and len(self._unknown_logged) < 64:  # once per field, a bounded number of fields
            self._unknown_logged.update(new)
            log.warning("a workload sent fields this agent does not know, dropped from its events: %s (a client newer "
                        "than the agent: upgrade the agent)", ", ".join(new))

    def readings(self):
        for kind in ("step", "request", "pause"):
            yield Reading("fleetscope_agent_events_received_total", float(self.received[kind]), (("kind", kind),))
        for kind in ("step", "request", "pause"):
            yield Reading("fleetscope_agent_events_verified_total", float(self.verified[kind]), (("kind", kind),))
        yield Reading("fleetscope_agent_events_pid_mismatch_total", float(self.pid_mismatch), ())
        yield Reading("fleetscope_agent_events_unknown_fields_total", float(self.unknown_fields), ())
        for reason in REJECT_REASONS:
            yield Reading("fleetscope_agent_events_rejected_total", float(self.rejected[reason]), (("reason", reason),))

    def _drain_udp(self, sock: socket.socket) -> None:
        for _ in range(_DRAIN):
            try:
                data, sender = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            self._handle_safely(data, sender, None)

    def _drain_unix(self, sock: socket.socket) -> None:
        for _ in range(_DRAIN):
            try:
                data, ancdata, flags, _ = sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except BlockingIOError:
                return
            creds = credentials(ancdata)
            if creds is None:  # SO_PASSCRED is set, so the kernel always sends them; never trust a sender without
                self._reject("error", "a datagram on the Unix socket came without its sender's credentials")
            elif flags & socket.MSG_TRUNC:
                self._reject("too_large", f"datagram from uid {creds[1]} over {MAX_DATAGRAM} bytes")
            else:
                self._handle_safely(data, None, creds)

    def _handle_safely(self, data: bytes, sender: object, creds: tuple[int, int, int] | None) -> None:
        try:
            self.handle(data, sender, creds)
        except Exception as exc:  # a bug, not the sender's fault: counted, and its traceback at most every 10 s
            self._reject("error", f"unexpected error handling a datagram from {self._name(sender, creds)}: {exc!r}",
                         exc_info=True)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            for sock, drain in ((self.sock, self._drain_udp), (self.unix_sock, self._drain_unix)):
                if sock is not None:
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ, drain)
            while not self._stop.is_set():
                try:
                    ready = selector.select()
                    for key, _ in ready:
                        if key.data is None or self._stop.is_set():
                            return
                        key.data(key.fileobj)
                except OSError:
                    if self._stop.is_set():
                        return
                    log.exception("event socket failed")
                    time.sleep(0.5)

    def start(self) -> None:
        self._thread = Thread(target=self._run, name="listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
        self._close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def _close(self) -> None:
        for sock in (self.sock, self.unix_sock):
            if sock is not None:
                sock.close()
        if self.unix_path is not None:
            try:  # only the file this agent bound: a newer agent's socket at the same path stays
                if os.stat(self.unix_path).st_ino == self._unix_inode:
                    os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
