"""The agent's threads carry their names into the kernel (agent/threads.py): `top -H` and the overhead bench
tell them apart by /proc/<pid>/task/<tid>/comm."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from agent.sampler import Sampler
from agent.sources.cpu import CpuSource
from agent.threads import Thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc are Linux's")


def comm(thread: threading.Thread) -> str:
    try:
        with open(f"/proc/self/task/{thread.native_id}/comm") as fh:
            return fh.read().strip()
    except OSError:  # ended since it was listed
        return ""


def test_a_thread_gives_the_kernel_its_name_cut_to_15_bytes() -> None:
    seen, go = {}, threading.Event()

    def body() -> None:
        seen["comm"] = comm(threading.current_thread())
        go.wait(5)

    named = Thread(target=body, name="metrics-handler-12", daemon=True)
    plain = threading.Thread(target=go.wait, args=(5,), daemon=True)
    named.start()
    plain.start()
    try:
        deadline = time.monotonic() + 5
        while "comm" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen["comm"] == "metrics-handler"  # the kernel keeps 15 bytes
        assert comm(plain) != plain.name  # a plain thread is named only in Python: what this module is for
    finally:
        go.set()
        named.join(5)
        plain.join(5)


def test_the_samplers_threads_are_named_in_the_kernel() -> None:
    sampler = Sampler([CpuSource()], interval_s=0.05)
    sampler.start()
    try:
        deadline = time.monotonic() + 5
        names: set[str] = set()
        while time.monotonic() < deadline and not {"sampler", "sources-1"} <= names:
            names = {comm(t) for t in threading.enumerate() if t.native_id is not None and t.is_alive()}
            time.sleep(0.02)
        assert {"sampler", "sources-1"} <= names
    finally:
        sampler.stop()
