"""The /metrics endpoint: the latest snapshot rendered once, in the Prometheus text format, then cached.

prometheus_client's generate_latest spends most of a scrape building objects; with a thousand
GPU series that is several milliseconds. This renderer writes the same bytes (a test holds it
to generate_latest's output) straight from the readings, and the server keeps the rendered text
(and its gzip) until a new snapshot arrives, so ten scrapers cost what one does.
"""

from __future__ import annotations

import gzip
import logging
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Sequence

from prometheus_client.utils import floatToGoString

from agent.sources.base import Family, Reading, by_family

log = logging.getLogger("fleetscope.agent.exposition")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TYPES = {"gauge": "gauge", "counter": "counter", "untyped": "untyped"}


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# Rendered label sets, by (family name, labels): a node's series keep their labels from one sample to
# the next, so each set is escaped and joined once, not at every render. Bounded: cleared when full.
_LABEL_TEXT: dict[tuple, str] = {}
_LABEL_TEXT_MAX = 200_000


def _label_text(name: str, wanted: tuple[str, ...], labels: tuple) -> str:
    key = (name, labels)
    text = _LABEL_TEXT.get(key)
    if text is None:
        if len(_LABEL_TEXT) >= _LABEL_TEXT_MAX:
            _LABEL_TEXT.clear()
        have = dict(labels)
        text = _LABEL_TEXT[key] = ",".join(f'{k}="{_escape_value(have.get(k, ""))}"' for k in wanted)
    return text


def render(families: Sequence[Family], readings: Iterable[Reading]) -> bytes:
    """Families in the given order, each with its readings; a family without readings is left out."""
    out: list[str] = []
    for fam, rows in by_family(families, readings):
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}\n# TYPE {fam.name} {_TYPES[fam.kind]}\n")
        wanted = tuple(sorted(fam.labels))
        spell = _formatted(fam.value_format) if fam.value_format else floatToGoString
        name = fam.name
        if wanted:
            out.extend(f"{name}{{{_label_text(name, wanted, r.labels)}}} {spell(r.value)}\n" for r in rows)
        else:
            out.extend(f"{name} {spell(r.value)}\n" for r in rows)
    return "".join(out).encode()


def _formatted(fmt: str) -> Callable[[float], str]:
    """Values as `fmt` spells them (dcgm-exporter writes "%d" for DCGM's integer fields and "%f" for its
    doubles); NaN and infinities keep Prometheus' spelling, which "%d" cannot write.
    generate_latest always writes Go's shortest float, so for such a family it is not byte-for-byte equal."""
    return lambda value: fmt % value if math.isfinite(value) else floatToGoString(value)


class MetricsServer:
    """Serves GET /metrics from `render_latest()`, re-rendering only when `generation()` changes."""

    def __init__(self, host: str, port: int, render_latest: Callable[[], bytes], generation: Callable[[], object]) -> None:
        self.render_latest = render_latest
        self.generation = generation
        self._lock = threading.Lock()
        self._cached_for: object = object()
        self._plain = b""
        self._gzipped: bytes | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, encoding = server.body("gzip" in self.headers.get("Accept-Encoding", ""))
                    ctype = CONTENT_TYPE
                elif path == "/":
                    body, encoding, ctype = b'<a href="/metrics">/metrics</a>\n', None, "text/html"
                else:
                    self.send_error(404, "only /metrics is served here")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                if encoding:
                    self.send_header("Content-Encoding", encoding)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per scrape would drown the agent's log

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        # serve_forever polls for shutdown every poll_interval; an hour keeps an idle agent asleep, and stop()
        # wakes the loop with a connection of its own instead of waiting.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 3600},
                                        name="metrics-http", daemon=True)

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
        self._thread.start()

    def stop(self) -> None:
        stopper = threading.Thread(target=self.httpd.shutdown, daemon=True)
        stopper.start()
        host, port = self.httpd.server_address[:2]
        for _ in range(50):  # until the loop has seen the shutdown request
            try:
                with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "") else host, port), timeout=1):
                    pass
            except OSError:
                break
            stopper.join(timeout=0.1)
            if not stopper.is_alive():
                break
        stopper.join(timeout=5)
        self.httpd.server_close()
