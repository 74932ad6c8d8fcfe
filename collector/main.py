"""Runs the collector under uvicorn, with bounds on connections and on how long a client may take to send a request.

uvicorn has a keep-alive timeout but no deadline for a request to arrive: a client that opens a
connection and sends nothing, or a header a byte at a time (slowloris), holds its connection, and
`limit_concurrency` counts connections, so a few hundred such clients would turn every agent away with
503. BoundedHttpToolsProtocol gives each request HEADER_TIMEOUT_S for its head and BODY_TIMEOUT_S for its
body, then closes the connection, and answers a head larger than MAX_HEAD_BYTES with 431.

The protocol is uvicorn's httptools one (llhttp, Node's parser, in C), not its h11 one (pure Python): at the
ingest bench's rate h11's per-request work was about a tenth of the event loop's time (#10).

With settings.tls_cert uvicorn serves HTTPS only (a plain-HTTP request on that port fails its handshake);
with tls_client_ca a client certificate is asked for, verified against that CA when given (readers
such as Prometheus may still come without one, with a token), and its common name is put in each
request's state as `tls_client`: the agent's identity (collector.api.deps).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import ssl
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from collector.api import create_app
from collector.settings import Settings
from fleetscope.vocabulary import COLLECTOR_PORT

log = logging.getLogger("fleetscope.collector")

# Every agent keeps a connection open between its posts (4,096 nodes in bench/fleet.py), and Prometheus,
# the console and API readers add theirs; past this many open connections requests are answered 503.
MAX_CONNECTIONS = 8192
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this long (uvicorn's default)
HEADER_TIMEOUT_S = 10.0  # from a connection's opening, or a request's first byte, to the end of its head
BODY_TIMEOUT_S = 60.0  # for a body to arrive once its head has: a 16 MiB batch at 2.3 Mbit/s
_RESERVED_FILES = 1024  # open files besides connections: WAL, Parquet partitions, libraries


MAX_HEAD_BYTES = 64 * 1024  # a request line and headers (h11 allowed 16 KiB, as Node does by default; tokens can be long)


def bounded_protocol(header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                     max_head_bytes: int = MAX_HEAD_BYTES) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline for each request's head and body, and a bound on its head."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        header_timeout = header_timeout_s
        body_timeout = body_timeout_s
        max_head = max_head_bytes
        _read_deadline: asyncio.TimerHandle | None = None
        _in_head = True  # between requests or inside a head: the next bytes are (part of) a head
        _head_bytes = 0
        _messages = 0  # requests begun on this connection
        _completed = 0  # requests whose body has all come

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = client_identity(transport)
            if peer is not None:  # each request's scope["state"] is a copy of app_state: this connection's only
                self.app_state = {**self.app_state, "tls_client": peer}
            self._arm(self.header_timeout)

        def data_received(self, data: bytes) -> None:
            if self._in_head and self._read_deadline is None:
                self._arm(self.header_timeout)  # a further request on a kept-alive connection begins
            seen = (self._messages, self._completed)
            super().data_received(data)
            if not self._in_head or self.parser is None or self.transport.is_closing():
                return
            # Still in a head: count what it has taken so far. httptools keeps a header's value until it ends, so
            # a head that never ends would grow until its deadline. Only a chunk that lies wholly inside one head
            # counts: one that ended a request (the rest of its body) or began one counts nothing.
            self._head_bytes = self._head_bytes + len(data) if (self._messages, self._completed) == seen else 0
            if self._head_bytes > self.max_head:
                log.debug("closing a connection from %s: a request head over %d bytes", self.client, self.max_head)
                self._disarm()
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                                     b"charset=utf-8\r\nconnection: close\r\ncontent-length: 35\r\n\r\n"
                                     b"request head too large; send less\r\n")
                self.transport.close()

        def on_message_begin(self) -> None:
            self._messages += 1
            self._in_head, self._head_bytes = True, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._arm(self.body_timeout)  # the head is in: the body has its own deadline
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._completed += 1
            self._in_head = True
            self._disarm()  # the request is in: the app's time is not bounded here; the next head's starts with it
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _too_slow(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                log.debug("closing a connection from %s: its request did not arrive in time", self.client)
                self.transport.close()

    return BoundedHttpToolsProtocol


def client_identity(transport: asyncio.BaseTransport) -> str | None:
    """The common name of the client certificate verified on this TLS connection (the first DNS name when it
    has none), or None."""
    ssl_object = transport.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert() if ssl_object is not None else None  # {} unless verified
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return next((value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"), None)


def tls_options(settings: Settings) -> dict:
    """uvicorn's ssl_* options for the settings' certificate, key and client CA (none without tls_cert)."""
    if settings.tls_cert is None:
        return {}
    options: dict = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None}
    if settings.tls_client_ca is not None:
        # Optional, not required: Prometheus and the console read with tokens; an agent's certificate, when it
        # presents one, must verify, and names it.
        options.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_OPTIONAL)
    return options


def server_config(settings: Settings, host: str = "0.0.0.0", port: int = COLLECTOR_PORT, *, max_connections: int = MAX_CONNECTIONS,
                  header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S) -> uvicorn.Config:
    """The uvicorn configuration the collector runs with."""
    return uvicorn.Config(
        create_app(settings), host=host, port=port, log_level="warning", access_log=False,
        http=bounded_protocol(header_timeout_s, body_timeout_s),
        limit_concurrency=max_connections, timeout_keep_alive=KEEP_ALIVE_S,
        backlog=min(max_connections, 4096), **tls_options(settings),
    )


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards `wanted` (as far as the hard limit allows), as Go
    programs do at start; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, new, exc)
    return soft


POLARS_NICE = 10  # polars' worker threads, against 0 for the threads that take ingest


def lower_polars_priority(nice: int = POLARS_NICE) -> int:
    """Run polars' pool threads at a lower CPU priority (Linux: a thread's own nice value); how many were set.

    The bulk work runs there: the hot tier's upkeep, the analysis pass, large reads. At equal priority it took the
    cores from the event loop and the ingest thread, and acknowledgements waited; at nice 10 it uses what ingest
    leaves (alternated paced runs of bench.ingest, five pairs: p99 -20 to -50%). With idle cores it runs as fast as
    before. A checkpoint's Parquet encoding is not here: polars' streaming engine runs a sink on threads of its own
    (async-executor), started by the checkpoint's thread and at its priority, 0. Starting them at nice 10 too
    lowered the paced p99 on a fast hour, but the fleet bench's peak RSS was 2,284 MiB in its one run against
    1,930 without (a starved checkpoint lags, so its rows wait in memory longer): not done (README, ingest)."""
    import polars as pl

    wanted = pl.thread_pool_size()  # the pool is started on first use: this starts it
    deadline = time.monotonic() + 2.0
    while True:  # its threads name themselves once running: wait for all of them (a few ms)
        try:
            names = {tid: _comm(tid).strip() for tid in os.listdir("/proc/self/task")}
        except OSError:  # not Linux
            return 0
        tids = [tid for tid, name in names.items() if name.startswith("polars-")]
        workers = sum(names[tid].removeprefix("polars-").isdigit() for tid in tids)  # polars-0, polars-1, ...
        if workers >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    done = 0
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            done += 1
        except OSError:  # the thread ended, or the system refuses
            continue
    return done


def _comm(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as fh:
            return fh.read()
    except OSError:  # the thread ended
        return ""


def run(settings: Settings, host: str = "0.0.0.0", port: int = COLLECTOR_PORT, *, max_connections: int = MAX_CONNECTIONS) -> None:
    lower_polars_priority()
    files = raise_open_files_limit(max_connections + _RESERVED_FILES)
    if files < max_connections + _RESERVED_FILES:
        log.warning("only %d open files allowed (LimitNOFILE, ulimit -n): beyond about %d connections, new ones wait",
                    files, max(files - _RESERVED_FILES, 0))
    config = server_config(settings, host, port, max_connections=max_connections)
    scheme = "https" if settings.tls_cert is not None else "http"
    log.info("collector on %s://%s:%d, data in %s (at most %d connections)", scheme, host, port, settings.data_dir, max_connections)
    server = uvicorn.Server(config)
    # What start-up made (modules, classes, functions: ~80,000 objects) lives as long as the process: leave it out of
    # the cycle collector's passes. A full pass walked all of it, and on a VM that pages out idle memory (the first
    # touch of a page idle for seconds costs ~45 us) one took 30-90 ms holding the GIL, every few seconds under load.
    gc.freeze()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:  # the port is taken, or the app did not start: as uvicorn.run does
        raise SystemExit(3)
