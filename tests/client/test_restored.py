"""run.restored(step) and the process start: what begins an incarnation of a job reaches the agent's listener,
over a real socket, as a valid step event; and neither can raise into the workload."""

from __future__ import annotations

import os
import time

import pytest

import fleetscope
from agent.listener import Listener
from fleetscope.client import Emitter, process_start_time
from fleetscope.schema import StepEvent


@pytest.fixture
def listener():
    got: list = []
    lst = Listener("127.0.0.1", 0, node="gpu-007", deliver=got.append)
    lst.start()
    lst.delivered = got
    yield lst
    lst.stop()


def wait_for(got: list, n: int) -> list:
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def test_the_first_step_and_the_first_after_a_restore_reach_the_listener_marked(listener):
    run = fleetscope.training(job="resumed", rank=1, world_size=2, emitter=Emitter(listener.address))
    for _ in range(2):
        with run.step():
            pass
    run.restored(70)
    with run.step():
        pass
    with run.step():
        pass
    first, second, restored, after = wait_for(listener.delivered, 4)
    assert all(isinstance(e, StepEvent) for e in (first, second, restored, after))
    assert listener.rejected.total() == 0
    started = process_start_time()
    assert started is not None and first.process_start_ts == pytest.approx(started, abs=0.02)
    assert first.process_start_ts < time.time() and first.restored_step is None
    assert (second.process_start_ts, second.restored_step) == (None, None)
    # numbering goes on from the checkpoint's step, and the step says where it resumed from
    assert (restored.step, restored.restored_step, restored.process_start_ts) == (70, 70, first.process_start_ts)
    assert (after.step, after.restored_step, after.process_start_ts) == (71, None, None)
    assert restored.node == "gpu-007" and restored.pid == os.getpid()


def test_a_bad_restore_is_ignored_and_nothing_raises(udp):
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=Emitter(udp.getsockname()))
    run.restored(-3)
    run.restored("not a step")
    with run.step():
        pass
    event = __import__("json").loads(udp.recv(65535))
    assert event["step"] == 0 and "restored_step" not in event


def test_the_process_start_is_read_from_proc_and_falls_back_when_it_cannot_be(tmp_path):
    stat = tmp_path / "stat"
    # a command name with spaces and a parenthesis must not shift the fields
    stat.write_text("4242 (python (x) y) S " + " ".join(["0"] * 18) + " 250 0 0\n")
    boot = tmp_path / "boot"
    boot.write_text("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n")
    assert process_start_time(str(stat), str(boot)) == pytest.approx(1_700_000_000 + 250 / os.sysconf("SC_CLK_TCK"))
    assert process_start_time(str(tmp_path / "missing"), str(boot)) is None
    run = fleetscope.training(job="j", rank=0, world_size=1)
    assert abs(run.process_start_ts - time.time()) < 3600  # /proc here, or the time the run was made
