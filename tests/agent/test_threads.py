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


def _lane_threads(sources) -> set[str]:
    """The kernel names of the sampler's lane threads over a second of samples (20) of `sources`."""
    sampler = Sampler(sources, interval_s=0.05)
    sampler.start()
    try:
        deadline, names = time.monotonic() + 1, set()
        while time.monotonic() < deadline:
            names |= {comm(t) for t in threading.enumerate() if t.native_id is not None and t.is_alive()}
            time.sleep(0.02)
        return {n for n in names if n.startswith("sources-")}
    finally:
        sampler.stop()
        for source in sources:
            source.close()


def test_on_a_node_serving_no_model_the_gpu_source_runs_in_the_samplers_own_lane() -> None:
    # The inference source has nothing to read, so it cannot block: the GPU source is the last that may, and runs
    # last in the sampler's own lane. One thread wakes a sample, not two.
    from agent.config import AgentConfig
    from agent.sources import build_sources

    config = AgentConfig(gpu_backend="simulated", gpus=2, disable_sources=["storage", "network"])
    assert _lane_threads(build_sources(config)) == {"sources-1"}
    # A server to read may hang on HTTP: then the GPU source gets a lane of its own again.
    served = AgentConfig(gpu_backend="simulated", gpus=2, disable_sources=["storage", "network"],
                         inference_servers=[{"url": "http://127.0.0.1:9/metrics", "kind": "vllm", "service": "chat"}])
    assert len(_lane_threads(build_sources(served))) == 2
