"""Workload client: training steps and inference requests sent over UDP to the node's agent.

Zero dependencies, never blocks, never raises into the caller. Each event is one JSON datagram
(the `StepEvent` / `RequestEvent` records of `fleetscope/schema.py`, without the fields the agent
adds). A datagram that cannot be sent is counted in `dropped`, never retried: a workload must
not slow down because its monitoring is unwell.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

SCHEMA_VERSION = 1
DEFAULT_AGENT_HOST = "127.0.0.1"
DEFAULT_AGENT_PORT = 9836
# One datagram must fit in a single UDP payload on loopback; the agent refuses larger ones.
MAX_DATAGRAM_BYTES = 60_000

log = logging.getLogger("fleetscope.client")


def _agent_address() -> tuple[str, int]:
    """Where the agent listens: FLEETSCOPE_AGENT_ADDR=host:port overrides the default."""
    raw = os.environ.get("FLEETSCOPE_AGENT_ADDR", "")
    if raw:
        host, _, port = raw.rpartition(":")
        try:
            return (host or DEFAULT_AGENT_HOST, int(port))
        except ValueError:
            log.warning("fleetscope: FLEETSCOPE_AGENT_ADDR=%r is not host:port; using the default", raw)
    return (DEFAULT_AGENT_HOST, DEFAULT_AGENT_PORT)


class Emitter:
    """Sends events as datagrams; safe across threads and after fork (the socket is per process)."""

    def __init__(self, address: tuple[str, int] | None = None) -> None:
        self.address = address or _agent_address()
        self.sent = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = -1

    def _socket(self) -> socket.socket:
        # A forked child must not share its parent's socket object state; make a new one.
        if self._sock is None or self._pid != os.getpid():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sock, self._pid = sock, os.getpid()
        return self._sock

    def emit(self, event: dict[str, Any]) -> bool:
        try:
            data = json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
            if len(data) > MAX_DATAGRAM_BYTES:
                raise ValueError(f"event of {len(data)} bytes exceeds {MAX_DATAGRAM_BYTES}")
            with self._lock:
                self._socket().sendto(data, self.address)
                self.sent += 1
            return True
        except Exception as exc:  # never raise into the workload
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                log.warning("fleetscope: dropping events (%s); further drops are only counted", exc)
            return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


_default_emitter: Emitter | None = None
_default_lock = threading.Lock()


def default_emitter() -> Emitter:
    global _default_emitter
    with _default_lock:
        if _default_emitter is None:
            _default_emitter = Emitter()
        return _default_emitter


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                log.warning("fleetscope: %s=%r is not an integer; ignoring it", name, value)
    return default


def _finite(value: float | int | None) -> float | int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return value if number == number and abs(number) != float("inf") else None


class Step:
    """One training step; use as a context manager via `TrainingRun.step()`."""

    __slots__ = ("run", "number", "tokens", "samples", "phases", "_t0", "_wall0", "_metrics")

    def __init__(self, run: "TrainingRun", number: int, tokens: int | None, samples: int | None) -> None:
        self.run = run
        self.number = number
        self.tokens = tokens
        self.samples = samples
        self.phases: dict[str, float] = {}
        self._metrics: dict[str, float] = {}
        self._t0 = 0.0
        self._wall0 = 0.0

    def record(self, **values: float) -> None:
        """Attach a few numbers to this step (loss, grad_norm, ...)."""
        for key, value in values.items():
            finite = _finite(value)
            if finite is not None:
                self._metrics[str(key)] = float(finite)

    def __enter__(self) -> "Step":
        self._wall0 = time.time()
        self._t0 = time.perf_counter()
        self.run._current = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        duration = time.perf_counter() - self._t0
        self.run._current = None
        try:
            self.run._emit_step(self, duration, failed=exc_type is not None)
        except Exception:  # never raise into the workload
            pass


class TrainingRun:
    """Reports the steps of one rank of a training job."""

    def __init__(
        self,
        job: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        stage: int | None = None,
        flops_per_token: float | None = None,
        emitter: Emitter | None = None,
    ) -> None:
        self.job = str(job)
        self.rank = rank if rank is not None else _env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = (
            world_size if world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        )
        self.local_rank = (
            local_rank if local_rank is not None else _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
        )
        # Pipeline-parallel stage, so a rank is compared with its own stage's peers (stages differ by design).
        self.stage = stage
        # Model FLOPs per token, forward and backward (about 6 x parameters for a dense transformer): for MFU.
        self.flops_per_token = flops_per_token
        self.emitter = emitter or default_emitter()
        self._next_step = 0
        self._current: Step | None = None

    def step(self, *, tokens: int | None = None, samples: int | None = None, number: int | None = None) -> Step:
        if number is None:
            number = self._next_step
        self._next_step = number + 1
        return Step(self, number, tokens, samples)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a part of the current step (data, forward, backward, optimizer, comm)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            step = self._current
            if step is not None:
                step.phases[name] = step.phases.get(name, 0.0) + (time.perf_counter() - t0)

    @contextmanager
    def pause(self, reason: str = "pause") -> Iterator[None]:
        """Declare time with no steps on purpose (checkpoint, evaluation): it must not look like a hang."""
        wall0, t0 = time.time(), time.perf_counter()
        self._emit_pause(reason, "begin", wall0, None)
        try:
            yield
        finally:
            self._emit_pause(reason, "end", time.time(), time.perf_counter() - t0)

    def _emit_pause(self, reason: str, phase: str, ts: float, duration: float | None) -> None:
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION, "kind": "pause", "job": self.job, "rank": self.rank, "local_rank": self.local_rank,
            "world_size": self.world_size, "reason": str(reason), "phase": phase, "ts": ts, "pid": os.getpid(),
        }
        if duration is not None:
            event["duration_s"] = duration
        try:
            self.emitter.emit(event)
        except Exception:  # never raise into the workload
            pass

    def _emit_step(self, step: Step, duration: float, failed: bool) -> None:
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "kind": "step",
            "job": self.job,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "step": step.number,
            "ts": step._wall0,
            "duration_s": max(duration, 1e-9),
            "pid": os.getpid(),
        }
        if self.stage is not None:
            event["stage"] = int(self.stage)
        if self.flops_per_token is not None:
            event["flops_per_token"] = float(self.flops_per_token)
        if step.tokens is not None:
            event["tokens"] = int(step.tokens)
        if step.samples is not None:
            event["samples"] = int(step.samples)
        if step.phases:
            event["phases"] = step.phases
        if step._metrics:
            event["metrics"] = step._metrics
        if failed:
            event["failed"] = True
        self.emitter.emit(event)


class Request:
    """One inference request; use as a context manager via `InferenceService.request()`."""

    __slots__ = ("service", "input_tokens", "output_tokens", "status", "queue_s", "_t0", "_wall0", "_first", "_end")

    def __init__(self, service: "InferenceService", input_tokens: int | None) -> None:
        self.service = service
        self.input_tokens = input_tokens
        self.output_tokens: int | None = None
        self.status = "ok"
        self.queue_s: float | None = None
        self._t0 = 0.0
        self._wall0 = 0.0
        self._first: float | None = None
        self._end: float | None = None

    def __enter__(self) -> "Request":
        self._wall0 = time.time()
        self._t0 = time.perf_counter()
        return self

    def queued(self, seconds: float) -> None:
        """Time the request waited before the server started on it."""
        self.queue_s = _finite(seconds)

    def first_token(self) -> None:
        if self._first is None:
            self._first = time.perf_counter()

    def finish(self, *, output_tokens: int | None = None, input_tokens: int | None = None, status: str = "ok") -> None:
        self._end = time.perf_counter()
        if output_tokens is not None:
            self.output_tokens = output_tokens
        if input_tokens is not None:
            self.input_tokens = input_tokens
        self.status = status

    def cancel(self) -> None:
        self.finish(status="cancelled")

    def __exit__(self, exc_type, exc, tb) -> None:
        end = self._end if self._end is not None else time.perf_counter()
        if exc_type is not None:
            self.status = "error"
        try:
            self.service._emit_request(self, end)
        except Exception:  # never raise into the workload
            pass


class InferenceService:
    """Reports the requests served by one replica of an inference service."""

    def __init__(self, service: str, *, model: str, emitter: Emitter | None = None) -> None:
        self.service = str(service)
        self.model = str(model)
        self.emitter = emitter or default_emitter()

    def request(self, *, input_tokens: int | None = None) -> Request:
        return Request(self, input_tokens)

    def _emit_request(self, req: Request, end: float) -> None:
        e2e = max(end - req._t0, 1e-9)
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "kind": "request",
            "service": self.service,
            "model": self.model,
            "ts": req._wall0,
            "e2e_s": e2e,
            "status": req.status,
            "pid": os.getpid(),
        }
        if req._first is not None:
            event["ttft_s"] = max(req._first - req._t0, 0.0)
            if req.output_tokens is not None and req.output_tokens > 1:
                event["tpot_s"] = max(end - req._first, 0.0) / (req.output_tokens - 1)
        if req.queue_s is not None:
            event["queue_s"] = req.queue_s
        if req.input_tokens is not None:
            event["input_tokens"] = int(req.input_tokens)
        if req.output_tokens is not None:
            event["output_tokens"] = int(req.output_tokens)
        self.emitter.emit(event)
