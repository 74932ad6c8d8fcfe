"""The datagrams the client writes: the agent's strict decoder reads every one, whatever the user passes."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest

import fleetscope
from fleetscope.client import Emitter, InferenceService, TrainingRun
from fleetscope.schema import PauseEvent, RequestEvent, StepEvent, decode_event


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`."""
    sock.settimeout(0.3)
    out = []
    try:
        while True:
            out.append(sock.recv(65535))
    except socket.timeout:
        return out


def test_steps_requests_and_pauses_decode_with_the_agents_schema(udp):
    emitter = Emitter(udp.getsockname())
    run = fleetscope.training(job="llama3-70b-ü-日本", rank=3, world_size=8, local_rank=1, stage=2,
                              flops_per_token=6e9, emitter=emitter)
    with run.step(tokens=4096, samples=8) as step:
        for name in ("data", "forward", "backward", "optimizer"):
            with run.phase(name):
                pass
        step.record(loss=2.5, grad_norm=0.125)
    with pytest.raises(KeyError):
        with run.step():
            raise KeyError("x")
    with run.pause("checkpoint"):
        pass
    svc = fleetscope.inference(service="chat-ü", model="llama3-8b", emitter=emitter)
    with svc.request(input_tokens=100) as r:
        r.queued(0.004)
        r.first_token()
        r.finish(output_tokens=11)
    with svc.request() as r:
        r.cancel()

    step_event, failed, begin, end, request, cancelled = [decode_event(d) for d in drain(udp)]
    assert isinstance(step_event, StepEvent) and step_event.job == "llama3-70b-ü-日本"
    assert (step_event.rank, step_event.world_size, step_event.local_rank, step_event.stage) == (3, 8, 1, 2)
    assert (step_event.step, step_event.tokens, step_event.samples, step_event.flops_per_token) == (0, 4096, 8, 6e9)
    assert list(step_event.phases) == ["data", "forward", "backward", "optimizer"]
    assert step_event.metrics == {"loss": 2.5, "grad_norm": 0.125}
    assert step_event.pid == os.getpid() and step_event.duration_s > 0 and not step_event.failed
    assert isinstance(failed, StepEvent) and failed.failed and failed.step == 1
    assert isinstance(begin, PauseEvent) and (begin.phase, end.phase) == ("begin", "end")
    assert isinstance(request, RequestEvent) and request.service == "chat-ü"
    assert (request.input_tokens, request.output_tokens, request.queue_s, request.status) == (100, 11, 0.004, "ok")
    assert request.ttft_s is not None and request.tpot_s is not None and request.e2e_s >= request.ttft_s
    assert cancelled.status == "cancelled"
    assert emitter.sent == 6 and emitter.dropped == 0


def test_nan_and_infinity_from_the_user_never_make_an_undecodable_datagram(udp):
    emitter = Emitter(udp.getsockname())
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=emitter)
    with run.step(tokens=10) as step:
        step.record(loss=math.nan, grad_norm=math.inf, lr=1e-4)  # the non-finite ones are left out
    with run.step() as step:
        step.phases["comm"] = math.inf  # as an integration writes phases: refused by JSON, counted
    with run.step(tokens=math.nan):  # no step count to send: nothing is sent
        pass
    svc = fleetscope.inference(service="chat", model="m", emitter=emitter)
    with svc.request() as r:
        r.queued(math.nan)  # left out
        r.first_token()
        r.finish(output_tokens=math.inf)  # not a token count: nothing is sent
    with svc.request() as r:
        r.queue_s = -math.inf  # set directly: refused by JSON, counted
    bad_flops = fleetscope.training(job="j", rank=0, world_size=1, flops_per_token=math.nan, emitter=emitter)
    with bad_flops.step():
        pass
    bad_flops.flops_per_token = 1e15  # and once it is fixed, its steps are sent again
    with bad_flops.step():
        pass
    with svc.request() as r:
        r.queued(0.5)

    events = [decode_event(d) for d in drain(udp)]
    assert [type(e).__name__ for e in events] == ["StepEvent", "StepEvent", "RequestEvent"]
    assert events[0].metrics == {"lr": 1e-4} and events[0].tokens == 10
    assert events[1].flops_per_token == 1e15 and events[2].queue_s == 0.5
    assert emitter.dropped == 3


def test_names_with_quotes_percent_signs_and_non_ascii_survive(udp):
    run = fleetscope.training(job='job "a" 100%', rank=0, world_size=1, emitter=Emitter(udp.getsockname()))
    with run.step() as step:
        with run.phase('fwd "x" 100%% ü'):
            pass
        step.record(**{"loss %d": 1.0})
    event = decode_event(udp.recv(65535))
    assert event.job == 'job "a" 100%'
    assert list(event.phases) == ['fwd "x" 100%% ü'] and event.metrics == {"loss %d": 1.0}


def test_odd_types_are_encoded_as_json_dumps_would(udp):
    """Types the hand-written encoding does not take (int keys, int seconds) go through json.dumps."""
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=Emitter(udp.getsockname()))
    with run.step() as step:
        step.phases[7] = 1  # as a careless integration might
        step.phases["data"] = 0.5
    event = decode_event(udp.recv(65535))
    assert event.phases == {"7": 1.0, "data": 0.5}


def written_and_dumped(obj, write: str, emit: str, monkeypatch, *args) -> tuple[dict, dict]:
    """An event as the client writes it, and as json.dumps writes the same event from its dict."""
    written = json.loads(getattr(obj, write)(*args)[0])
    captured = []
    monkeypatch.setattr(type(obj), write, lambda *a: (_ for _ in ()).throw(TypeError("force json.dumps")))
    monkeypatch.setattr(obj.emitter, "emit", lambda event: captured.append(json.loads(json.dumps(event))))
    getattr(obj, emit)(*args)
    return written, captured[0]


def assert_same_event(written: dict, dumped: dict) -> None:
    assert written.keys() == dumped.keys()
    for key, value in dumped.items():
        if isinstance(value, dict):
            assert written[key] == pytest.approx(value, abs=1e-9)
        elif isinstance(value, float):  # times: to the nanosecond, wall-clock starts to the microsecond
            assert written[key] == pytest.approx(value, abs=1e-6 if key == "ts" else 1e-9)
        else:
            assert written[key] == value and type(written[key]) is type(value)


def test_hand_written_steps_say_what_json_dumps_says(monkeypatch):
    run = TrainingRun("llama ü", rank=5, world_size=8, local_rank=1, stage=1, flops_per_token=6e9,
                      emitter=Emitter(("127.0.0.1", 9)))
    step = run.step(tokens=4096, samples=2, number=41)
    step._wall0 = 1_790_000_000.1234567
    step.phases.update(data=0.0123456789012, forward=1.5e-7, backward=2.0)
    step.record(loss=2.345678901234567, grad_norm=1e-12)
    written, dumped = written_and_dumped(run, "_step_datagram", "_emit_step", monkeypatch, step, 0.25, True)
    assert_same_event(written, dumped)
    assert written["metrics"] == {"loss": 2.345678901234567, "grad_norm": 1e-12}  # the user's numbers, exactly


def test_hand_written_requests_say_what_json_dumps_says(monkeypatch):
    svc = InferenceService("chat", model="llama3-8b", emitter=Emitter(("127.0.0.1", 9)))
    req = svc.request(input_tokens=100)
    req._wall0, req._t0, req._first = 1_790_000_000.5, 100.0, 100.25
    req.queued(0.0041234567891)
    req.output_tokens, req.status = 11, "error"
    written, dumped = written_and_dumped(svc, "_request_datagram", "_emit_request", monkeypatch, req, 101.0)
    assert_same_event(written, dumped)
    assert written["queue_s"] == 0.0041234567891


def test_a_run_changed_after_its_first_step_reports_the_change(udp):
    run = fleetscope.training(job="a", rank=0, world_size=2, emitter=Emitter(udp.getsockname()))
    with run.step():
        pass
    run.job, run.rank, run.stage = "b", 1, 3
    with run.step():
        pass
    first, second = [decode_event(d) for d in drain(udp)]
    assert (first.job, first.rank, first.stage) == ("a", 0, None)
    assert (second.job, second.rank, second.stage) == ("b", 1, 3)


def test_a_phase_can_decorate_a_function_that_runs_many_times_in_a_step(udp):
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=Emitter(udp.getsockname()))

    @run.phase("data")
    def load() -> int:
        return 1

    with run.step():
        assert load() + load() == 2
        with run.phase("forward") as inside:
            assert inside is None  # as the generator-based context manager it replaces gave
    event = decode_event(udp.recv(65535))
    assert set(event.phases) == {"data", "forward"} and event.phases["data"] > 0


def test_a_forked_childs_steps_carry_its_own_pid(udp):
    emitter = Emitter(udp.getsockname())
    run = fleetscope.training(job="j", rank=0, world_size=1, emitter=emitter)
    with run.step():
        pass
    assert decode_event(udp.recv(65535)).pid == os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        with run.step():
            pass
        os._exit(0 if emitter.sent == 2 and emitter._pid == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert decode_event(udp.recv(65535)).pid == pid
