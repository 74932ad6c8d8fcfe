"""The agent's /metrics server under idle, trickling and crowding clients, with real sockets."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from agent import exposition
from agent.exposition import MetricsServer
from tests.conftest import closed_by_server, slowloris, wait_until

BODY = b"fleetscope_x 1.0\n"


@pytest.fixture
def serve():
    servers = []

    def start(render=lambda: BODY, **limits) -> MetricsServer:
        server = MetricsServer("127.0.0.1", 0, render, lambda: None, **limits)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def scrape(server: MetricsServer, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read()


def connect(server: MetricsServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.address[1]))
    sock.settimeout(10)
    return sock


def handler_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("metrics-handler")]


def test_the_defaults_bound_every_connection_and_the_threads():
    assert exposition.CONNECTION_TIMEOUT_S == 10.0 and exposition.MAX_HANDLERS == 16
    server = MetricsServer("127.0.0.1", 0, lambda: BODY, lambda: None)
    try:
        assert server.connection_timeout_s == 10.0 and server.max_handlers == 16
    finally:
        server.httpd.server_close()


def test_fifty_idle_connections_cost_no_thread_and_a_scrape_is_answered_at_once(serve):
    server = serve(connection_timeout_s=5.0, max_handlers=2)
    threads_before = threading.active_count()
    idle = [connect(server) for _ in range(50)]
    half_sent = idle[:10]
    for sock in half_sent:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a request head never finished
    try:
        started = time.monotonic()
        assert scrape(server, timeout=2) == BODY
        assert time.monotonic() - started < 1.0
        assert threading.active_count() - threads_before <= 3  # the reader and the answering handler, not 50
        assert len(handler_threads()) <= 2
    finally:
        for sock in idle:
            sock.close()


def test_idle_and_trickling_connections_are_closed_after_the_timeout(serve):
    server = serve(connection_timeout_s=0.5)
    idle = connect(server)
    trickling = connect(server)
    stop = threading.Event()
    slowloris(trickling, b"GET /metrics HTTP/1.1\r\nHost: agent\r\nX-Padding: " + b"a" * 200, stop)
    started = time.monotonic()
    try:
        assert closed_by_server(idle)
        assert closed_by_server(trickling)
        assert 0.4 < time.monotonic() - started < 3.0
        assert scrape(server) == BODY  # and the server answers the next scrape
    finally:
        stop.set()
        idle.close()
        trickling.close()


def test_at_most_max_handlers_answer_at_once_and_the_rest_wait_their_turn(serve):
    release = threading.Event()

    def slow_render() -> bytes:
        release.wait(10)
        return BODY

    server = serve(render=slow_render, max_handlers=3)
    results: list[bytes] = []
    clients = [threading.Thread(target=lambda: results.append(scrape(server, timeout=10))) for _ in range(10)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: len(handler_threads()) >= 3, timeout=5, what="three handler threads")
        time.sleep(0.3)  # room for a fourth, were there no cap
        assert len(handler_threads()) == 3
    finally:
        release.set()
        for client in clients:
            client.join(timeout=10)
    assert results == [BODY] * 10  # queued, not refused


def test_a_crowd_of_new_connections_pushes_out_the_oldest(serve):
    server = serve(connection_timeout_s=5.0, max_connections=5)
    oldest = connect(server)
    time.sleep(0.05)
    others = [connect(server) for _ in range(5)]
    try:
        assert closed_by_server(oldest)
        assert scrape(server) == BODY
    finally:
        for sock in [oldest, *others]:
            sock.close()


def test_stop_is_prompt_with_connections_still_open():
    server = MetricsServer("127.0.0.1", 0, lambda: BODY, lambda: None)
    server.start()
    idle = [connect(server) for _ in range(20)]
    assert scrape(server) == BODY
    started = time.monotonic()
    server.stop()
    try:
        assert time.monotonic() - started < 3.0
        assert all(closed_by_server(sock) for sock in idle)
        assert not server._reader.is_alive()
    finally:
        for sock in idle:
            sock.close()


def test_one_thread_accepts_and_reads_and_a_scrape_wakes_only_it_and_one_handler():
    before = set(threading.enumerate())
    server = MetricsServer("127.0.0.1", 0, lambda: BODY, lambda: None)
    server.start()
    try:
        assert [t.name for t in set(threading.enumerate()) - before] == ["metrics-requests"]  # nobody waits in accept()
        assert [scrape(server) for _ in range(3)] == [BODY] * 3
        # The reader and the handlers that answered: one, or a second when a scrape came in before the first
        # handler was idle again (it has sent its answer, and the client asked again at once).
        names = sorted(t.name for t in set(threading.enumerate()) - before)
        assert names[-1] == "metrics-requests" and 1 <= len(names[:-1]) <= 3, names
        assert all(name.startswith("metrics-handler-") for name in names[:-1]), names
    finally:
        server.stop()
    with pytest.raises(OSError):  # stopped: the listening socket is closed
        socket.create_connection(("127.0.0.1", server.address[1]), timeout=2)


def test_a_request_head_is_parsed_strictly():
    head = (b"GET /metrics?x=1 HTTP/1.1\r\nHost: node:9835\r\nAccept-Encoding: gzip\r\nX-Long: a\r\n\tb\r\n"
            b"accept-encoding: identity\r\nAuthorization:  Basic cHJvbTpz  \r\n\r\nbody bytes are not read")
    assert exposition.parse_head(head) == ("GET", "/metrics?x=1", {
        "host": "node:9835", "accept-encoding": "gzip",  # names in lower case; of a repeated header, the first
        "x-long": "a b",  # a folded line joins the header before it
        "authorization": "Basic cHJvbTpz"})
    assert exposition.parse_head(b"GET / HTTP/1.0\n\n") == ("GET", "/", {})  # bare newlines, as http.server takes them
    refused = {
        b"\r\n\r\n": 400,
        b"GET /metrics\r\n\r\n": 400,  # HTTP/0.9
        b"GET  /metrics HTTP/1.1\r\n\r\n": 400,  # two spaces: four words
        b"GET /metrics HTTP/1.1 extra\r\n\r\n": 400,
        b"G(T /metrics HTTP/1.1\r\n\r\n": 400,  # not a token
        b"GET /metrics HTTX/1.1\r\n\r\n": 400,
        b"GET /metrics HTTP/1\r\n\r\n": 400,
        b"GET /metrics HTTP/1.x\r\n\r\n": 400,
        b"GET /metrics HTTP/\xb9.1\r\n\r\n": 400,  # a digit to str.isdigit (superscript one), but not an ASCII one
        b"GET /metrics HTTP/0.9\r\n\r\n": 400,
        b"GET /metrics HTTP/2.0\r\n\r\n": 505,
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n": 400,
        b"GET /metrics HTTP/1.1\r\n: no name\r\n\r\n": 400,
        b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n": 400,
        b"GET /metrics HTTP/1.1\r\n folded first\r\n\r\n": 400,
        b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * (exposition.MAX_HEADERS + 1) + b"\r\n": 431,
    }
    for bad, status in refused.items():
        with pytest.raises(exposition.BadRequest) as caught:
            exposition.parse_head(bad)
        assert caught.value.status == status, bad
    assert exposition.parse_head(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * exposition.MAX_HEADERS + b"\r\n")[2] == {"x": "y"}


def test_a_bad_request_is_answered_with_its_status_and_closed_and_the_server_serves_on(serve):
    server = serve()

    def ask(head: bytes) -> tuple[bytes, bytes]:
        with connect(server) as sock:
            sock.sendall(head)
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        return status_line, rest

    assert ask(b"GET /metrics HTTP/2.0\r\n\r\n")[0] == b"HTTP/1.0 505 HTTP Version Not Supported"
    assert ask(b"hello\r\n\r\n")[0] == b"HTTP/1.0 400 Bad Request"
    assert ask(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")[0] == b"HTTP/1.0 431 Request Header Fields Too Large"
    status, rest = ask(b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert status == b"HTTP/1.0 501 Not Implemented" and b"\r\nAllow: GET\r\n" in rest
    assert ask(b"GET /nope HTTP/1.1\r\n\r\n")[0] == b"HTTP/1.0 404 Not Found"
    status, rest = ask(b"GET /metrics?x HTTP/1.1\r\nHost: a\r\n\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.0 200 OK" and body == BODY
    assert f"Content-Length: {len(BODY)}".encode() in headers.split(b"\r\n") and b"Date: " in headers
    assert scrape(server) == BODY


def test_the_date_header_is_an_http_date():
    from email.utils import formatdate

    for at in (0.0, 951782400.0, 1764504000.5, time.time()):  # 1970, a leap day (2000-02-29), 2025, now
        assert exposition._http_date(at) == formatdate(at, usegmt=True)
