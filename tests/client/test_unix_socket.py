"""The client over the agent's Unix socket: chosen by default where it exists, and never blocking or raising."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import pytest

import fleetscope
from fleetscope import client
from fleetscope.client import Emitter
from fleetscope.schema import StepEvent, decode_event


@pytest.fixture
def folder():
    # Not tmp_path: a Unix socket's path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="fs-", dir="/tmp") as path:
        yield path


def unix_receiver(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("FLEETSCOPE_AGENT_ADDR", raising=False)


def test_steps_go_to_a_unix_socket_named_as_a_path_or_unix_url(folder):
    path = os.path.join(folder, "events.sock")
    with unix_receiver(path) as agent:
        for address in (path, f"unix:{path}"):
            emitter = Emitter(address)
            run = fleetscope.training(job="j", rank=1, world_size=2, emitter=emitter)
            with run.step(tokens=8):
                pass
            event = decode_event(agent.recv(65535))
            assert isinstance(event, StepEvent) and (event.job, event.rank, event.tokens) == ("j", 1, 8)
            assert event.pid == os.getpid() and emitter.sent == 1 and emitter.dropped == 0
            assert emitter._sock.family == socket.AF_UNIX


def test_the_environment_names_a_unix_socket(folder, monkeypatch):
    path = os.path.join(folder, "events.sock")
    monkeypatch.setenv("FLEETSCOPE_AGENT_ADDR", f"unix:{path}")
    with unix_receiver(path) as agent:
        assert Emitter().emit({"v": 1, "hello": "unix"})
        assert json.loads(agent.recv(65535)) == {"v": 1, "hello": "unix"}


def test_the_default_is_the_agents_unix_socket_where_it_exists_else_udp(folder, monkeypatch, no_env):
    path = os.path.join(folder, "events.sock")
    monkeypatch.setattr(client, "DEFAULT_AGENT_SOCKET", path)
    assert Emitter().address == ("127.0.0.1", 9836)
    with unix_receiver(path) as agent:
        emitter = Emitter()
        assert emitter.address == path
        assert emitter.emit({"v": 1, "n": 1}) and json.loads(agent.recv(65535)) == {"v": 1, "n": 1}


def test_the_default_moves_to_the_socket_when_the_agent_comes_and_back_when_it_goes(folder, monkeypatch, no_env):
    path = os.path.join(folder, "events.sock")
    monkeypatch.setattr(client, "DEFAULT_AGENT_SOCKET", path)
    monkeypatch.setattr(client, "DEFAULT_RECHECK_S", 0.05)
    emitter = Emitter()
    emitter.emit({"v": 1})  # no agent yet: UDP to the default port, sent or not, never raised
    assert emitter.address == ("127.0.0.1", 9836)
    with unix_receiver(path) as agent:  # the agent starts after the workload
        time.sleep(0.06)
        assert emitter.emit({"v": 1, "n": 2})
        assert emitter.address == path and json.loads(agent.recv(65535)) == {"v": 1, "n": 2}
    os.unlink(path)  # the agent stops (it unlinks its socket)
    assert not emitter.emit({"v": 1, "n": 3})  # dropped, counted
    emitter.emit({"v": 1, "n": 4})  # the next event chooses again: UDP
    assert emitter.address == ("127.0.0.1", 9836) and emitter._sock.family == socket.AF_INET


def test_an_address_given_is_kept_when_its_socket_is_gone(folder):
    path = os.path.join(folder, "events.sock")
    emitter = Emitter(path)
    assert not emitter.emit({"v": 1}) and not emitter.emit({"v": 1})
    assert emitter.address == path and emitter.dropped == 2


def test_a_full_unix_socket_never_blocks_or_raises(folder):
    # Nobody reads the agent's socket: the kernel's queue fills (net.unix.max_dgram_qlen datagrams, or the
    # sender's buffer) and sendto says EAGAIN, which is a drop.
    path = os.path.join(folder, "events.sock")
    with unix_receiver(path):
        run = fleetscope.training(job="j", rank=0, world_size=1, emitter=Emitter(path))
        slowest = 0.0
        for _ in range(5000):
            t0 = time.perf_counter()
            with run.step(tokens=1) as step:
                step.record(loss=1.0)
            slowest = max(slowest, time.perf_counter() - t0)
        emitter = run.emitter
        assert emitter.sent + emitter.dropped == 5000 and emitter.dropped > 0 and emitter.sent > 0
        # A blocking send would wait until someone reads, which nobody does: any bound well under "forever" tells
        # it apart, and 1 s holds however loaded the machine is (a 50 ms bound failed under load).
        assert slowest < 1.0, f"a step took {slowest * 1e3:.1f} ms with the socket full"


def test_an_event_over_the_size_limit_is_dropped_on_unix_too(folder):
    path = os.path.join(folder, "events.sock")
    with unix_receiver(path):
        emitter = Emitter(path)
        assert not emitter.emit({"v": 1, "pad": "x" * client.MAX_DATAGRAM_BYTES})
        assert emitter.dropped == 1 and emitter.sent == 0


def test_a_forked_child_sends_from_its_own_unix_socket(folder):
    path = os.path.join(folder, "events.sock")
    with unix_receiver(path) as agent:
        emitter = Emitter(path)
        assert emitter.emit({"v": 1, "who": "parent"})
        pid = os.fork()
        if pid == 0:  # child
            ok = emitter.emit({"v": 1, "who": "child"})
            os._exit(0 if ok and emitter._pid == os.getpid() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [json.loads(agent.recv(65535))["who"] for _ in range(2)] == ["parent", "child"]
