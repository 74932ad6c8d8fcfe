"""Samples every source once per interval into one immutable Snapshot that the exporter and shipper share."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Sequence

from agent.gpu.health import Verdict
from agent.gpu.state import GpuState
from agent.sources.base import Collected, NoData, Reading, Source

log = logging.getLogger("fleetscope.agent.sampler")


@dataclass(frozen=True, slots=True)
class SourceStatus:
    up: bool
    duration_s: float
    error: str | None = None
    no_data: bool = False  # the source's library or device is absent: not an error
    problems: tuple[str, ...] = ()  # the source ran, but reports something wrong (e.g. a driver/library mismatch)
    overran: bool = False  # it did not finish within its deadline


@dataclass(frozen=True)
class Snapshot:
    """The agent's one contract between sampling and its consumers (exporter, frame builder)."""

    ts: float
    readings: tuple[Reading, ...]
    status: dict[str, SourceStatus]
    gpus: tuple[GpuState, ...] = field(default=())
    health: dict[str, Verdict] = field(default_factory=dict)  # GPU uuid -> verdict

    def value(self, name: str, **labels: str) -> float | None:
        """The value of one series, or None when it is absent."""
        want = tuple(sorted((k, str(v)) for k, v in labels.items()))
        for r in self.readings:
            if r.name == name and tuple(sorted(r.labels)) == want:
                return r.value
        return None


@dataclass(frozen=True, slots=True)
class _Outcome:
    collected: Collected | None
    error: BaseException | None
    duration_s: float


def _collect(source: Source) -> _Outcome:
    t0 = time.perf_counter()
    try:
        got = source.collect()
        got = got if isinstance(got, Collected) else Collected(tuple(got))
    except Exception as exc:  # noqa: BLE001 - the sampler sorts it out
        return _Outcome(None, exc, time.perf_counter() - t0)
    return _Outcome(got, None, time.perf_counter() - t0)


class Sampler:
    """Runs the sources on a fixed interval, each on its own thread under a deadline: a failing or
    stuck source never stops or delays the others, nor the snapshot."""

    def __init__(self, sources: Sequence[Source], interval_s: float = 5.0, deadline_s: float | None = None) -> None:
        self.sources = list(sources)
        self.interval_s = interval_s
        # A source gets most of the interval; one that takes longer is reported and left to finish alone.
        self.deadline_s = deadline_s if deadline_s is not None else max(0.5, 0.8 * interval_s)
        self.latest: Snapshot | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()
        self._workers = [ThreadPoolExecutor(1, thread_name_prefix=f"source-{s.name}") for s in self.sources]
        self._running: dict[int, tuple[Future, float]] = {}  # a source's collection under way, and its start

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        self._listeners.append(callback)

    def sample_once(self) -> Snapshot:
        readings: list[Reading] = []
        status: dict[str, SourceStatus] = {}
        gpus: tuple[GpuState, ...] = ()
        health: dict[str, Verdict] = {}
        for i, source in enumerate(self.sources):
            if i not in self._running:
                self._running[i] = (self._workers[i].submit(_collect, source), time.perf_counter())
        wait([f for f, _ in self._running.values()], timeout=self.deadline_s)
        now = time.perf_counter()
        for i, source in enumerate(self.sources):
            future, t0 = self._running[i]
            if not future.done():
                # Still running from this or an earlier sample: report it, do not wait, do not start another.
                status[source.name] = SourceStatus(False, now - t0, f"overran its {self.deadline_s:.1f} s deadline "
                                                   f"(running for {now - t0:.1f} s)", overran=True)
                if source.name not in self._failing:
                    log.error("source %s did not finish within %.1f s; the snapshot goes on without it",
                              source.name, self.deadline_s)
                    self._failing.add(source.name)
                continue
            del self._running[i]
            outcome: _Outcome = future.result()
            duration, exc = outcome.duration_s, outcome.error
            if isinstance(exc, NoData):
                log.debug("source %s: no data (%s)", source.name, exc)
                status[source.name] = SourceStatus(False, duration, f"no data: {exc}", no_data=True)
                continue
            if exc is not None:
                if source.name not in self._failing:
                    log.error("source %s failed; it reports source_up 0 until it recovers", source.name,
                              exc_info=(type(exc), exc, exc.__traceback__))
                self._failing.add(source.name)
                status[source.name] = SourceStatus(False, duration, f"{type(exc).__name__}: {exc}")
                continue
            if source.name in self._failing:
                log.info("source %s recovered", source.name)
                self._failing.discard(source.name)
            got = outcome.collected
            readings.extend(got.readings)
            gpus = got.gpus or gpus
            health.update(got.health)
            status[source.name] = SourceStatus(True, duration, problems=got.problems)
        snapshot = Snapshot(time.time(), tuple(readings), status, gpus, health)
        self.latest = snapshot
        for callback in self._listeners:
            try:
                callback(snapshot)
            except Exception:
                log.exception("snapshot subscriber failed")
        return snapshot

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_at += self.interval_s
            # If a sample overran the interval, skip ahead rather than bursting to catch up.
            next_at = max(next_at, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for worker in self._workers:
            worker.shutdown(wait=False, cancel_futures=True)
        for source in self.sources:
            try:
                source.close()
            except Exception:
                log.exception("closing source %s", source.name)
