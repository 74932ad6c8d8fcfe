"""The collector's HTTP server: bounded connections, and a deadline for each request to arrive."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn

from collector import main as collector_main
from collector.settings import Settings
from tests.conftest import closed_by_server, free_port, http_get, slowloris, wait_until


def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({"i"}), read_tokens=frozenset({"r"}))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(15)
    return sock


def test_the_collector_runs_with_bounded_connections_and_request_deadlines(tmp_path):
    config = collector_main.server_config(settings(tmp_path), "127.0.0.1", 9837)
    assert config.limit_concurrency == collector_main.MAX_CONNECTIONS == 8192
    assert config.timeout_keep_alive == 5
    config.load()
    protocol = config.http_protocol_class
    assert issubclass(protocol, collector_main.HttpToolsProtocol)
    assert (protocol.header_timeout, protocol.body_timeout, protocol.max_head) == (10.0, 60.0, 64 * 1024)


def test_run_hands_uvicorn_that_configuration(tmp_path, monkeypatch):
    seen = {}

    class Server:
        started = True

        def __init__(self, config):
            seen["config"] = config

        def run(self):
            seen["frozen"] = gc.get_freeze_count()

    monkeypatch.setattr(collector_main.uvicorn, "Server", Server)
    gc.unfreeze()
    try:
        collector_main.run(settings(tmp_path), "127.0.0.1", 1, max_connections=100)
    finally:
        gc.unfreeze()  # this test process's objects go back to the cycle collector
    assert seen["config"].limit_concurrency == 100 and seen["config"].timeout_keep_alive == 5
    assert seen["config"].http.header_timeout == 10.0
    # What start-up made is left out of the cycle collector's passes before the server starts.
    assert seen["frozen"] > 10_000


@contextlib.contextmanager
def serving(tmp_path, header_timeout_s: float, body_timeout_s: float):
    """A collector in this process on a real socket."""
    port = free_port()
    config = collector_main.server_config(settings(tmp_path), "127.0.0.1", port, header_timeout_s=header_timeout_s,
                                          body_timeout_s=body_timeout_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=30, what="the collector")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def collector(tmp_path):
    """A collector with deadlines short enough to watch."""
    with serving(tmp_path, 0.5, 1.0) as port:
        yield port


def test_idle_connections_do_not_keep_readers_waiting_and_are_closed(collector):
    idle = [connect(collector) for _ in range(50)]
    try:
        started = time.monotonic()
        assert http_get(f"http://127.0.0.1:{collector}/healthz", timeout=2)[0] == 200
        assert time.monotonic() - started < 1.0
        assert all(closed_by_server(sock) for sock in idle)
        assert time.monotonic() - started < 5.0
    finally:
        for sock in idle:
            sock.close()


def test_a_trickled_head_and_a_stalled_body_are_cut_off(collector):
    trickling, stalled = connect(collector), connect(collector)
    stalled.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer i\r\nContent-Length: 1000\r\n\r\n{")
    stop = threading.Event()
    slowloris(trickling, b"GET /healthz HTTP/1.1\r\nHost: collector\r\nX-Padding: " + b"a" * 200, stop)
    started = time.monotonic()
    try:
        assert closed_by_server(trickling)
        assert 0.4 < time.monotonic() - started < 3.0
        assert closed_by_server(stalled)
        assert time.monotonic() - started < 4.0
    finally:
        stop.set()
        trickling.close()
        stalled.close()


def test_a_head_too_large_is_refused_with_431_and_its_connection_closed(tmp_path):
    """httptools keeps a header's value until the header ends: without a bound, one endless header would grow in
    memory until the head's deadline (here 10 s, far off). A large head within the bound is served."""
    with serving(tmp_path, 10.0, 10.0) as port:
        sock = connect(port)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: c\r\nX-Big: " + b"a" * (40 * 1024) + b"\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: c\r\nX-Endless: ")
            for _ in range(100):  # 800 KiB at most, a piece at a time until the server answers (past 64 KiB)
                sock.sendall(b"a" * 8192)
                if select.select([sock], [], [], 0.3)[0]:
                    break
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        finally:
            sock.close()
        assert http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200


def test_large_bodies_one_after_another_on_one_connection_are_all_taken(collector):
    """The head's bound counts head bytes only: a body's last chunk (hundreds of KiB, after which the parser waits
    for the next head) is no head."""
    import json

    sock = connect(collector)
    try:
        for seq in range(4):
            events = [{"v": 1, "kind": "step", "job": "big", "rank": r, "world_size": 8, "step": seq * 200 + s,
                       "ts": time.time() - 60, "duration_s": 0.5, "phases": {"forward": 0.2, "backward": 0.25}}
                      for s in range(200) for r in range(8)]
            body = json.dumps({"v": 1, "agent_id": "a", "seq": seq, "node": "n", "sent_ts": time.time(),
                               "events": events}).encode()
            assert len(body) > 200 * 1024
            sock.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer i\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            head = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), (seq, head)
    finally:
        sock.close()


def test_requests_pipelined_on_one_connection_are_each_answered(collector):
    sock = connect(collector)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n" * 3)
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 3:
            answers += sock.recv(4096)
    finally:
        sock.close()


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_a_kept_alive_connection_still_serves_several_requests(collector):
    sock = connect(collector)
    try:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)  # under the keep-alive timeout, and the head deadline starts only with the next request
    finally:
        sock.close()


@pytest.mark.e2e
def test_the_real_collector_process_closes_a_slowloris_connection(tmp_path):
    for name, token in (("ingest", "i"), ("read", "r")):
        (tmp_path / name).write_text(token)
        (tmp_path / name).chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCOPE_")}
    env |= {"FLEETSCOPE_INGEST_TOKEN_FILE": str(tmp_path / "ingest"), "FLEETSCOPE_READ_TOKEN_FILE": str(tmp_path / "read")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", str(tmp_path / "data")], env=env,
                            stdout=(tmp_path / "collector.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=30, what="the collector")
        idle = [connect(port) for _ in range(50)]
        half = connect(port)
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: c\r\n")  # never finished
        started = time.monotonic()
        assert http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200
        assert closed_by_server(half) and all(closed_by_server(sock) for sock in idle)
        assert 9.0 < time.monotonic() - started < 14.0  # HEADER_TIMEOUT_S
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def polars_workers(pid: int) -> int:
    """How many threads of polars' pool the process runs (they name themselves polars-0, polars-1, ...)."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            names.append(open(f"/proc/{pid}/task/{tid}/comm").read().strip())
    return sum(name.removeprefix("polars-").isdigit() for name in names)


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are Linux's")
def test_the_collector_process_leaves_a_core_to_ingest_unless_the_operator_sized_polars_pool(tmp_path):
    (tmp_path / "ingest").write_text("i")
    (tmp_path / "read").write_text("r")
    for name in ("ingest", "read"):
        (tmp_path / name).chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETSCOPE_", "POLARS_"))}
    env |= {"FLEETSCOPE_INGEST_TOKEN_FILE": str(tmp_path / "ingest"), "FLEETSCOPE_READ_TOKEN_FILE": str(tmp_path / "read")}
    cpus = len(os.sched_getaffinity(0))
    for extra, wanted in (({}, max(1, cpus - 1)), ({"POLARS_MAX_THREADS": "3"}, 3)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                                 "--data-dir", str(tmp_path / "data")], env=env | extra,
                                stdout=(tmp_path / "collector.log").open("ab"), stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=30, what="the collector")
            # the pool starts with the first polars work (the app's start-up does some); its threads name themselves
            assert wait_until(lambda: polars_workers(proc.pid) == wanted or None, timeout=10,
                              what=f"{wanted} polars workers, not {polars_workers(proc.pid)}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread nice values are Linux's")
def test_polars_pool_threads_run_at_a_lower_priority_than_the_threads_that_take_ingest():
    # In a fresh interpreter: the test process's own polars threads keep their priority.
    probe = """
import os, threading
from collector.main import POLARS_NICE, lower_polars_priority
done = lower_polars_priority()
nice = {}
for tid in os.listdir("/proc/self/task"):
    comm = open(f"/proc/self/task/{tid}/comm").read().strip()
    nice[comm] = int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
import polars as pl
workers = [v for k, v in nice.items() if k.removeprefix("polars-").isdigit()]
assert len(workers) == pl.thread_pool_size(), nice
print(len(workers), POLARS_NICE, sorted(workers), nice[open("/proc/self/comm").read().strip()])
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout.split(maxsplit=2)
    done, wanted = int(out[0]), int(out[1])
    polars_nices, main_nice = out[2].rsplit(" ", 1)
    assert done >= 1 and polars_nices == str([wanted] * done)  # every worker of the pool
    assert int(main_nice) == os.nice(0)  # the main thread (the event loop) keeps the process's priority
