"""The workload client: what it sends, and that it never blocks or raises into the workload."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest

import fleetscope
from fleetscope import client
from fleetscope.client import MAX_DATAGRAM_BYTES, Emitter


def receive(sock) -> dict:
    data, _ = sock.recvfrom(65535)
    return json.loads(data)


def test_training_step_reports_duration_tokens_phases_and_rank(udp, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    run = fleetscope.training(job="llama", flops_per_token=6e9, emitter=Emitter(udp.getsockname()))
    with run.step(tokens=4096, samples=2) as step:
        with run.phase("forward"):
            time.sleep(0.02)
        with run.phase("backward"):
            time.sleep(0.01)
        step.record(loss=2.5, grad_norm=float("nan"))
    event = receive(udp)
    assert event["kind"] == "step" and event["v"] == 1
    assert (event["job"], event["rank"], event["world_size"], event["local_rank"]) == ("llama", 5, 8, 1)
    assert event["step"] == 0 and event["tokens"] == 4096 and event["samples"] == 2
    assert event["duration_s"] >= 0.03
    assert event["phases"]["forward"] >= 0.02 and event["phases"]["backward"] >= 0.01
    assert event["metrics"] == {"loss": 2.5}  # NaN is dropped, not sent
    assert event["pid"] == os.getpid() and event["flops_per_token"] == 6e9
    with run.step():
        pass
    assert receive(udp)["step"] == 1


def test_slurm_environment_is_used_when_torchrun_is_absent(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    run = fleetscope.training(job="j")
    assert (run.rank, run.world_size, run.local_rank) == (3, 16, 3)
    assert fleetscope.training(job="j", rank=7).rank == 7


def test_a_failing_step_is_reported_and_the_exception_reaches_the_caller(udp):
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=Emitter(udp.getsockname()))
    with pytest.raises(ZeroDivisionError):
        with run.step():
            1 / 0
    assert receive(udp)["failed"] is True


def test_inference_request_reports_ttft_tpot_and_status(udp):
    svc = fleetscope.inference(service="chat", model="llama3-8b", emitter=Emitter(udp.getsockname()))
    with svc.request(input_tokens=100) as r:
        r.queued(0.004)
        time.sleep(0.02)
        r.first_token()
        time.sleep(0.03)
        r.finish(output_tokens=11)
    event = receive(udp)
    assert event["kind"] == "request" and (event["service"], event["model"]) == ("chat", "llama3-8b")
    assert event["status"] == "ok" and event["input_tokens"] == 100 and event["output_tokens"] == 11
    assert event["queue_s"] == 0.004
    assert 0.02 <= event["ttft_s"] < event["e2e_s"]
    # 10 inter-token gaps over ~30 ms
    assert event["tpot_s"] == pytest.approx((event["e2e_s"] - event["ttft_s"]) / 10, rel=0.05)

    with pytest.raises(RuntimeError):
        with svc.request():
            raise RuntimeError("backend died")
    assert receive(udp)["status"] == "error"


def test_the_client_never_raises_when_it_cannot_send():
    emitter = Emitter(("256.0.0.1", 1))  # not an address: sendto fails
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=emitter)
    for _ in range(3):
        with run.step():
            pass
    assert emitter.dropped == 3 and emitter.sent == 0


def test_an_oversized_event_is_dropped_and_counted(udp):
    emitter = Emitter(udp.getsockname())
    assert emitter.emit({"v": 1, "blob": "x" * (MAX_DATAGRAM_BYTES + 1)}) is False
    assert emitter.dropped == 1
    assert emitter.emit({"v": 1, "kind": "ok"}) is True
    assert receive(udp)["kind"] == "ok"


def test_non_finite_values_are_not_sent(udp):
    emitter = Emitter(udp.getsockname())
    assert emitter.emit({"v": 1, "x": math.inf}) is False  # JSON has no infinity; the agent would refuse it


def test_send_does_not_block_when_nobody_listens():
    port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port.bind(("127.0.0.1", 0))
    address = port.getsockname()
    port.close()  # nothing listens there now
    emitter = Emitter(address)
    t0 = time.perf_counter()
    for _ in range(1000):
        emitter.emit({"v": 1, "kind": "step"})
    assert emitter.sent + emitter.dropped == 1000
    assert time.perf_counter() - t0 < 5  # generous: it must not wait on anything


def test_a_forked_child_sends_through_its_own_socket(udp):
    emitter = Emitter(udp.getsockname())
    emitter.emit({"v": 1, "who": "parent"})
    assert receive(udp)["who"] == "parent"
    pid = os.fork()
    if pid == 0:  # child
        ok = emitter.emit({"v": 1, "who": "child", "pid": os.getpid()})
        os._exit(0 if ok and emitter._pid == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    event = receive(udp)
    assert event["who"] == "child" and event["pid"] == pid


def test_agent_address_from_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(client, "DEFAULT_AGENT_SOCKET", str(tmp_path / "absent.sock"))  # no agent socket here
    monkeypatch.setenv("FLEETSCOPE_AGENT_ADDR", "127.0.0.2:9999")
    assert Emitter().address == ("127.0.0.2", 9999)
    monkeypatch.setenv("FLEETSCOPE_AGENT_ADDR", "unix:/run/elsewhere/events.sock")
    assert Emitter().address == "/run/elsewhere/events.sock"
    for garbage in ("garbage", "unix:relative.sock"):
        monkeypatch.setenv("FLEETSCOPE_AGENT_ADDR", garbage)
        assert Emitter().address == ("127.0.0.1", 9836)


def test_a_declared_pause_is_reported_when_it_begins_and_when_it_ends(udp):
    run = fleetscope.training(job="j", rank=2, world_size=4, emitter=Emitter(udp.getsockname()))
    with run.pause("checkpoint"):
        begin = receive(udp)  # sent at once, so a long pause is known while it lasts
        time.sleep(0.02)
    end = receive(udp)
    assert (begin["kind"], begin["phase"], begin["reason"], begin["rank"]) == ("pause", "begin", "checkpoint", 2)
    assert end["phase"] == "end" and end["duration_s"] >= 0.02 and "duration_s" not in begin


def test_under_slurm_training_needs_no_arguments(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # torchrun's names win over Slurm's when both are set
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain-7b")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    run = fleetscope.training(emitter=Emitter(("127.0.0.1", 9)))
    assert (run.job, run.rank, run.world_size, run.local_rank) == ("pretrain-7b", 5, 16, 1)
    assert fleetscope.training(job="named", emitter=Emitter(("127.0.0.1", 9))).job == "named"
    monkeypatch.delenv("SLURM_JOB_NAME")
    with pytest.raises(TypeError, match="job="):
        fleetscope.training(emitter=Emitter(("127.0.0.1", 9)))
