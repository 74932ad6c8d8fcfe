"""The /metrics endpoint: the latest snapshot rendered once, in the Prometheus text format, then cached.

prometheus_client's generate_latest spends most of a scrape building objects; with a thousand
GPU series that is several milliseconds. This renderer writes the same bytes (a test holds it
to generate_latest's output) straight from the readings, and the server keeps the rendered text
(and its gzip) until a new snapshot arrives, so ten scrapers cost what one does.

The server gives no client a thread until its request has arrived in full: one reader thread accepts every
connection and collects request heads from all of them (a connection has CONNECTION_TIMEOUT_S to send one, or is
closed), and at most MAX_HANDLERS threads answer complete requests. No thread waits in accept(): a scrape wakes
the reader and the handler that answers, nothing else. Idle or trickling connections (slowloris) thus cost a
socket each, never a thread, and a scrape is answered while they wait.

A handler parses the request head itself (parse_head: strict, a few lines of Python; http.server's parsing runs the
email package's feed parser), and writes the whole answer with one sendall; every connection is closed after one
answer, as http.server's HTTP/1.0 did.

With TLS (a Prometheus web config's tls_server_config, fleetscope/webconfig.py) the reader thread also does each
connection's handshake, without blocking and under the same deadline, so a client that stalls its handshake costs
a socket too. With basic_auth_users, a handler answers 401 to a request without the right password.
"""

from __future__ import annotations

import gzip
import logging
import math
import queue
import selectors
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from itertools import repeat
from math import copysign
from operator import itemgetter
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from prometheus_client.utils import floatToGoString

from agent.sources.base import Family, Reading, by_family
from agent.threads import Thread

if TYPE_CHECKING:
    from fleetscope.webconfig import BasicAuth

log = logging.getLogger("fleetscope.agent.exposition")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TYPES = {"gauge": "gauge", "counter": "counter", "untyped": "untyped"}

CONNECTION_TIMEOUT_S = 10.0  # to send a request, and again to take the answer; then the connection is closed
MAX_HANDLERS = 16  # threads answering requests at once; further complete requests wait their turn
MAX_CONNECTIONS = 256  # connections still sending their request; a new one pushes out the oldest
_MAX_HEAD = 16 * 1024  # a scrape's request head is a few hundred bytes


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# The text before each series' value, `\nname{labels} `, by family (its name and label names) and then by labels: a
# node's series keep their labels from one sample to the next, so each is escaped and joined once, not at every
# render. The label names are part of the family's key: a family declared with other names (pod labels on
# Kubernetes only) must not reuse the text of the old ones. Bounded: cleared when full. Each text starts with the
# newline that ends the line before it, so that a render joins prefixes and values without building each line.
_PREFIXES: dict[tuple[str, tuple[str, ...]], dict[tuple, str]] = {}
_PREFIXES_MAX = 200_000
_prefix_count = 0

# Each value as floatToGoString spells it, by value: a node's values repeat (0.0 alone is half of an 8-GPU node's
# series), and a dict lookup costs a tenth of the spelling. Only what floatToGoString wrote is kept, so the text is
# the same; -0.0 equals 0.0 as a key, so a family with any negative value (or sign bit) is spelled value by value.
# NaN is never kept (it equals no key). Bounded: cleared when full (counters that grow add a few hundred a sample).
_VALUES: dict[float, str] = {}
_VALUES_MAX = 20_000
_LABELS, _VALUE = itemgetter(2), itemgetter(1)  # Reading's fields by position: map() runs them in C
_ONES = repeat(1.0)


def _prefixes(name: str, wanted: tuple[str, ...]) -> dict[tuple, str]:
    global _prefix_count
    if _prefix_count >= _PREFIXES_MAX:
        _PREFIXES.clear()
        _prefix_count = 0
    cache = _PREFIXES.get((name, wanted))
    if cache is None:
        cache = _PREFIXES[(name, wanted)] = {}
    return cache


def _prefix(cache: dict[tuple, str], name: str, wanted: tuple[str, ...], labels: tuple) -> str:
    global _prefix_count
    have = dict(labels)
    text = cache[labels] = "\n" + name + "{" + ",".join(f'{k}="{_escape_value(have.get(k, ""))}"' for k in wanted) + "} "
    _prefix_count += 1
    return text


def _spell(value: float) -> str:
    """floatToGoString(value), kept for the next time the value comes (NaN is not kept). Called only for a family
    without a negative value (render), so a zero here is 0.0, never -0.0."""
    text = floatToGoString(value)
    if value == value:
        if len(_VALUES) >= _VALUES_MAX:
            _VALUES.clear()
        _VALUES[value] = text
    return text


def _fill(texts: list, keys: list, make: Callable) -> None:
    """texts[i] = make(keys[i]) wherever texts[i] is None (a cache miss); list.index finds them in C."""
    i = -1
    try:
        while True:
            i = texts.index(None, i + 1)
            texts[i] = make(keys[i])
    except ValueError:
        pass


def render(families: Sequence[Family], readings: Iterable[Reading]) -> bytes:
    """Families in the given order, each with its readings; a family without readings is left out.

    The text is built as one list of pieces: each family's header, then for each series its cached prefix (which
    starts with the newline ending the line before) and its value's text, looked up with map() rather than a loop
    of Python per series; what generate_latest writes, byte for byte."""
    out: list[str] = []
    for fam, rows in by_family(families, readings):
        name = fam.name
        out.append(f"\n# HELP {name} {_escape_help(fam.help)}\n# TYPE {name} {_TYPES[fam.kind]}")
        wanted = tuple(sorted(fam.labels))
        if wanted:
            cache = _prefixes(name, wanted)
            labels = list(map(_LABELS, rows))
            prefixes = list(map(cache.get, labels))
            if None in prefixes:
                _fill(prefixes, labels, lambda lab: _prefix(cache, name, wanted, lab))
        else:
            prefixes = [f"\n{name} "] * len(rows)
        values = list(map(_VALUE, rows))
        if fam.value_format:
            texts = list(map(_formatted(fam.value_format), values))
        else:
            texts = list(map(_VALUES.get, values))
            if min(map(copysign, _ONES, values)) < 0:  # a negative value, perhaps -0.0: no cached text for any
                texts = list(map(floatToGoString, values))
            elif None in texts:
                _fill(texts, values, _spell)
        pieces = [None] * (2 * len(rows))
        pieces[0::2] = prefixes
        pieces[1::2] = texts
        out += pieces
    if not out:
        return b""
    out[0] = out[0][1:]  # the first header has no line before it to end
    out.append("\n")
    return "".join(out).encode()


def _formatted(fmt: str) -> Callable[[float], str]:
    """Values as `fmt` spells them (dcgm-exporter writes "%d" for DCGM's integer fields and "%f" for its
    doubles); NaN and infinities keep Prometheus' spelling, which "%d" cannot write.
    generate_latest always writes Go's shortest float, so for such a family it is not byte-for-byte equal."""
    return lambda value: fmt % value if math.isfinite(value) else floatToGoString(value)


class MetricsServer:
    """Serves GET /metrics from `render_latest()`, re-rendering only when `generation()` changes."""

    def __init__(self, host: str, port: int, render_latest: Callable[[], bytes], generation: Callable[[], object], *,
                 connection_timeout_s: float = CONNECTION_TIMEOUT_S, max_handlers: int = MAX_HANDLERS,
                 max_connections: int = MAX_CONNECTIONS, ssl_context: ssl.SSLContext | None = None,
                 basic_auth: BasicAuth | None = None) -> None:
        self.render_latest = render_latest
        self.ssl_context = ssl_context
        self.basic_auth = basic_auth
        self.generation = generation
        self.connection_timeout_s = connection_timeout_s
        self.max_handlers = max_handlers
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._cached_for: object = object()
        self._plain = b""
        self._gzipped: bytes | None = None
        self.httpd = _ListeningServer((host, port))  # binds and listens; the reader thread accepts
        self.httpd.socket.setblocking(False)
        self.address = self.httpd.server_address
        # A byte on _wake_w wakes the reader thread (to stop).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = False
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # complete requests, for the handler threads
        self._handlers: list[threading.Thread] = []
        self._idle_handlers = 0
        self._handlers_lock = threading.Lock()
        self._reader = Thread(target=self._read_requests, name="metrics-requests", daemon=True)

    def answer(self, head: bytes) -> bytes:
        """The whole response (status line, headers, body) to a request head; the connection is closed after it."""
        try:
            method, target, headers = parse_head(head)
        except BadRequest as exc:
            return _response(exc.status, f"{exc.reason}\n".encode(), "text/plain; charset=utf-8")
        if method != "GET":
            return _response(501, f"{method} is not served here: only GET\n".encode(), "text/plain; charset=utf-8",
                             "Allow: GET\r\n")
        if self.basic_auth is not None and not self.basic_auth.check(headers.get("authorization")):
            return _response(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                             'WWW-Authenticate: Basic realm="fleetscope agent"\r\n')
        path = target.split("?", 1)[0]
        if path == "/metrics":
            body, encoding = self.body("gzip" in headers.get("accept-encoding", ""))
            return _response(200, body, CONTENT_TYPE, f"Content-Encoding: {encoding}\r\n" if encoding else "")
        if path == "/":
            return _response(200, b'<a href="/metrics">/metrics</a>\n', "text/html")
        return _response(404, b"only /metrics is served here\n", "text/plain; charset=utf-8")

    def body(self, gzip_ok: bool) -> tuple[bytes, str | None]:
        with self._lock:
            generation = self.generation()
            if generation is not self._cached_for:
                self._plain = self.render_latest()
                self._gzipped = None
                self._cached_for = generation
            if not gzip_ok:
                return self._plain, None
            if self._gzipped is None:
                self._gzipped = gzip.compress(self._plain, compresslevel=1)
            return self._gzipped, "gzip"

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._closing = True
        self._wake()
        if self._reader.is_alive():
            self._reader.join(timeout=5)
        self.httpd.server_close()
        with self._handlers_lock:
            for _ in self._handlers:
                self._ready.put(None)  # each handler ends after the request it may be answering
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self) -> list[tuple[socket.socket, object]]:
        """The connections waiting to be accepted, set non-blocking (TLS: wrapped, their handshake not begun)."""
        out = []
        while True:
            try:
                sock, client_address = self.httpd.socket.accept()
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:  # out of file descriptors, a connection reset before it was accepted...
                log.debug("metrics: accept: %s", exc)
                return out
            sock.setblocking(False)
            if self.ssl_context is not None:
                try:  # no handshake yet: the reader does it as the client's bytes arrive
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except OSError:
                    self.httpd.shutdown_request(sock)
                    continue
            out.append((sock, client_address))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the pipe is full (the reader is awake already) or closed (stopping)
            pass

    # The reader thread: new connections, and request heads from every connection, each under its deadline.
    def _read_requests(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        listening = self.httpd.socket
        selector.register(listening, selectors.EVENT_READ)
        pending: dict[socket.socket, _Pending] = {}  # in order of arrival: the first is the first to expire

        def drop(sock: socket.socket) -> None:
            pending.pop(sock, None)
            selector.unregister(sock)
            self.httpd.shutdown_request(sock)

        try:
            while not self._closing:
                timeout = max(0.0, next(iter(pending.values())).deadline - time.monotonic()) if pending else None
                for key, _ in selector.select(timeout):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._drain_wake()
                        continue
                    if sock is listening:
                        for sock, client_address in self._accept():
                            if len(pending) >= self.max_connections:
                                drop(next(iter(pending)))
                            pending[sock] = _Pending(client_address, time.monotonic() + self.connection_timeout_s,
                                                     handshaking=isinstance(sock, ssl.SSLSocket))
                            selector.register(sock, selectors.EVENT_READ)
                        continue
                    request = pending.get(sock)
                    if request is None:
                        continue
                    if request.handshaking:
                        try:
                            sock.do_handshake()
                        except ssl.SSLWantReadError:
                            selector.modify(sock, selectors.EVENT_READ)
                            continue
                        except ssl.SSLWantWriteError:
                            selector.modify(sock, selectors.EVENT_WRITE)
                            continue
                        except (OSError, ValueError) as exc:  # not TLS (plain HTTP), an untrusted client certificate...
                            log.debug("metrics: TLS handshake with %s: %s", request.client_address, exc)
                            drop(sock)
                            continue
                        request.handshaking = False
                        selector.modify(sock, selectors.EVENT_READ)
                    try:
                        data = sock.recv(4096)
                        while isinstance(sock, ssl.SSLSocket) and sock.pending() and len(data) <= _MAX_HEAD:
                            data += sock.recv(sock.pending())  # decrypted already: the selector would not report it
                    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue
                    except OSError:
                        data = b""
                    request.head += data
                    if not data or len(request.head) > _MAX_HEAD:
                        drop(sock)
                    elif b"\r\n\r\n" in request.head or b"\n\n" in request.head:
                        del pending[sock]
                        selector.unregister(sock)
                        self._dispatch(sock, request.client_address, bytes(request.head))
                now = time.monotonic()
                while pending:
                    sock, request = next(iter(pending.items()))
                    if request.deadline > now:
                        break
                    drop(sock)  # too slow: idle, or trickling its request a byte at a time
        finally:
            for sock in list(pending):
                drop(sock)
            selector.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # Handler threads: started as complete requests need them, at most max_handlers, idle ones blocked on the queue.
    def _dispatch(self, sock: socket.socket, client_address: object, head: bytes) -> None:
        self._ready.put((sock, client_address, head))
        with self._handlers_lock:
            if self._ready.qsize() > self._idle_handlers and len(self._handlers) < self.max_handlers:
                thread = Thread(target=self._answer_requests, name=f"metrics-handler-{len(self._handlers)}",
                                          daemon=True)
                self._handlers.append(thread)
                thread.start()

    def _answer_requests(self) -> None:
        while True:
            with self._handlers_lock:
                self._idle_handlers += 1
            item = self._ready.get()
            with self._handlers_lock:
                self._idle_handlers -= 1
            if item is None:
                return
            sock, client_address, head = item
            try:
                sock.settimeout(self.connection_timeout_s)  # to take the answer
                sock.sendall(self.answer(head))
            except OSError as exc:  # the client went away, or took longer than the timeout to read the answer
                log.debug("metrics: answering %s: %s", client_address, exc)
            except Exception:  # noqa: BLE001 - one bad request never stops the server
                log.exception("metrics: answering %s", client_address)
            finally:
                self.httpd.shutdown_request(sock)


# The request head, parsed here rather than by http.server, whose header parsing runs the email package's feed
# parser: several hundred lines of Python for each scrape, which on a VM that is slow to touch memory idle for
# seconds cost more than the answer's own work. Strict: a request line of three words and HTTP/1.x, header lines
# "name: value" (obsolete folded lines joined), at most MAX_HEADERS of them; anything else is answered 400 (or 505
# for another HTTP version, 431 for too many headers) and the connection closed. The reader thread has already
# bounded the head to _MAX_HEAD bytes and its time to arrive to the connection timeout.
MAX_HEADERS = 100  # as http.client
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")  # RFC 9110 tchar
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class BadRequest(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """A request head's method, target and headers (names in lower case; of a repeated header, the first); raises
    BadRequest with the status to answer."""
    lines = head.decode("iso-8859-1").split("\n")
    words = lines[0].removesuffix("\r").split(" ")
    if len(words) != 3 or not all(words) or not set(words[0]) <= _TOKEN:
        raise BadRequest(400, f"bad request line {lines[0][:100]!r}")
    method, target, version = words
    major, dot, minor = version.removeprefix("HTTP/").partition(".")
    if not version.startswith("HTTP/") or not dot or not (major.isdigit() and minor.isdigit()) \
            or not major.isascii() or not minor.isascii() or len(major) > 1 or len(minor) > 1:
        raise BadRequest(400, f"bad HTTP version {version[:20]!r}")
    if major != "1":
        raise BadRequest(505 if major > "1" else 400, f"HTTP version {version} is not served here: only HTTP/1.x")
    headers: dict[str, str] = {}
    last: str | None = None  # the header a folded line continues ("" for one repeated, whose value is not kept)
    count = 0
    for line in lines[1:]:
        line = line.removesuffix("\r")
        if not line:
            break
        if line[0] in " \t":  # obsolete line folding (RFC 9110 5.5): part of the previous header's value
            if last is None:
                raise BadRequest(400, "a folded line before any header")
            if last:
                headers[last] = f"{headers[last]} {line.strip()}".strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= _TOKEN:
            raise BadRequest(400, f"bad header line {line[:100]!r}")
        count += 1
        if count > MAX_HEADERS:
            raise BadRequest(431, f"more than {MAX_HEADERS} headers")
        name = name.lower()
        last = "" if name in headers else name
        headers.setdefault(name, value.strip(" \t"))
    return method, target, headers


def _http_date(now: float | None = None) -> str:
    t = time.gmtime(now)
    return f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"


def _response(status: int, body: bytes, content_type: str, extra: str = "") -> bytes:
    return (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nDate: {_http_date()}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1") + body


class _Pending:
    __slots__ = ("client_address", "deadline", "handshaking", "head")

    def __init__(self, client_address: object, deadline: float, *, handshaking: bool = False) -> None:
        self.client_address = client_address
        self.deadline = deadline
        self.handshaking = handshaking
        self.head = bytearray()


class _ListeningServer(HTTPServer):
    """The listening socket (bound as http.server binds it) and what handlers expect of a server; never served
    from: the reader thread accepts its connections."""

    request_queue_size = 128  # socketserver's 5 drops the SYNs of a burst of connections (a 1 s retry each)

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, BaseHTTPRequestHandler)
