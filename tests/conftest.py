"""Shared test helpers: free ports, required system binaries, waiting for servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def udp():
    """A UDP socket on loopback standing in for the agent's event socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(*names: str) -> str:
    """Path of the first of `names` on PATH; skip (or fail in CI) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' / '.join(names)} not installed (make test installs it when run as root)"
    if os.environ.get("FLEETSCOPE_REQUIRE_SYSTEM_DEPS"):
        pytest.fail(message)
    pytest.skip(message)


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the server may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# `pytest -m "not e2e and not slow"` is the quick loop (about a minute): real processes on loopback
# (tests/e2e, and the attacks of tests/security) and the real-framework integrations (torch, transformers, lightning) are left out.
_MARKED_DIRS = {"e2e": "e2e", "security": "e2e", "integrations": "slow"}
# Files that do heavy work when imported (the fuzz test builds its collector and schema at import): marked here
# too, so that a run that leaves their marker out does not even import them.
_MARKED_FILES = {"test_fuzz.py": "slow"}
# Single tests of the quick directories that wait seconds each on real clocks or processes (1.5-5 s each, a
# third of the quick loop's time between them): the whole suite runs them, the quick loop does not.
_SLOW_TESTS = {
    "test_decoders.py": {"test_a_worker_killed_with_batches_in_hand_loses_none",
                         "test_a_worker_that_cannot_start_is_not_restarted_in_a_tight_loop"},
    "test_server_limits.py": {"test_a_head_too_large_is_refused_with_431_and_its_connection_closed"},
    "test_compaction_open_day.py": {"test_maintenance_through_a_day_rewrites_each_folder_once"},
    "test_shipper.py": {"test_an_unexpected_error_does_not_kill_the_shipper_thread"},
    "test_upgrade_columns.py": {"test_an_hour_of_rollups_is_merged_sorted_by_gpu_and_only_while_the_hot_tier_is_not_maintained"},
    # the schedule's own timing (sample_once's deadlines and stuck sources stay in the quick loop)
    "test_sampler.py": {"test_on_its_schedule_each_source_that_may_block_runs_with_the_sample_not_after_a_stuck_one",
                        "test_a_hung_lane_in_a_sample_that_started_late_is_published_once_in_order",
                        "test_a_hung_lane_is_taken_over_when_its_deadline_is_the_whole_interval",
                        "test_on_its_schedule_a_stuck_source_is_reported_at_the_deadline_and_the_others_go_on",
                        "test_a_sample_that_starts_late_still_has_its_whole_deadline"},
}


def _marker_of(path: Path) -> str | None:
    parts = path.parts
    if "tests" not in parts:
        return None
    rest = parts[parts.index("tests") + 1:]
    if rest and rest[-1] in _MARKED_FILES:
        return _MARKED_FILES[rest[-1]]
    return _MARKED_DIRS.get(rest[0]) if rest else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = _marker_of(item.path)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
        elif getattr(item, "originalname", item.name) in _SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)


def pytest_ignore_collect(collection_path, config):
    """Skip importing a marked folder or file when `-m` deselects its marker whatever else its tests carry: the
    quick loop then does not pay for importing torch, schemathesis or a whole fuzzing app only to deselect them."""
    markexpr = config.getoption("markexpr", "")
    marker = _marker_of(Path(collection_path))
    if not markexpr or not marker:
        return None
    from _pytest.mark.expression import Expression  # pytest's own -m grammar

    try:
        expr = Expression.compile(markexpr)
    except Exception:  # noqa: BLE001 - a bad -m is pytest's to report
        return None
    only = expr.evaluate(lambda name, /, **_: name == marker)
    every = expr.evaluate(lambda name, /, **_: True)
    return True if not only and not every else None


def wait_ready(client, timeout: float = 30.0):
    """A TestClient of the collector once its store has opened (/healthz answers 200)."""
    wait_until(lambda: client.get("/healthz").status_code == 200, timeout=timeout, interval=0.02, what="the collector's store")
    return client


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Stop a child process with `sig`, killing it if it has not ended within `timeout`; its return code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def closed_by_server(sock: socket.socket) -> bool:
    """True once the peer has closed `sock` (whatever it wrote before closing is read past)."""
    try:
        while True:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True


def slowloris(sock: socket.socket, head: bytes, stop: threading.Event, every_s: float = 0.1) -> threading.Thread:
    """Send `head` a byte every `every_s` seconds from a thread (each byte resets any per-read timeout)."""

    def trickle():
        for byte in head:
            if stop.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    return thread
