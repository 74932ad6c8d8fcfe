"""Samples every source once per interval into one immutable Snapshot that the exporter and shipper share."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from agent.gpu.state import GpuState
from agent.sources.base import NoData, Reading, Source

log = logging.getLogger("fleetscope.agent.sampler")


@dataclass(frozen=True, slots=True)
class SourceStatus:
    up: bool
    duration_s: float
    error: str | None = None
    no_data: bool = False  # the source's library or device is absent: not an error


@dataclass(frozen=True)
class Snapshot:
    ts: float
    readings: tuple[Reading, ...]
    status: dict[str, SourceStatus]
    gpus: tuple[GpuState, ...] = field(default=())

    def value(self, name: str, **labels: str) -> float | None:
        """The value of one series, or None when it is absent."""
        want = tuple(sorted((k, str(v)) for k, v in labels.items()))
        for r in self.readings:
            if r.name == name and tuple(sorted(r.labels)) == want:
                return r.value
        return None


class Sampler:
    """Runs the sources on a fixed interval; a failing source never stops the others."""

    def __init__(self, sources: Sequence[Source], interval_s: float = 5.0) -> None:
        self.sources = list(sources)
        self.interval_s = interval_s
        self.latest: Snapshot | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        self._listeners.append(callback)

    def sample_once(self) -> Snapshot:
        readings: list[Reading] = []
        status: dict[str, SourceStatus] = {}
        gpus: tuple[GpuState, ...] = ()
        for source in self.sources:
            t0 = time.perf_counter()
            try:
                got = list(source.collect())
            except NoData as exc:
                log.debug("source %s: no data (%s)", source.name, exc)
                status[source.name] = SourceStatus(False, time.perf_counter() - t0, f"no data: {exc}", no_data=True)
                continue
            except Exception as exc:
                if source.name not in self._failing:
                    log.exception("source %s failed; it reports source_up 0 until it recovers", source.name)
                self._failing.add(source.name)
                status[source.name] = SourceStatus(False, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
                continue
            if source.name in self._failing:
                log.info("source %s recovered", source.name)
                self._failing.discard(source.name)
            readings.extend(got)
            status[source.name] = SourceStatus(True, time.perf_counter() - t0)
            gpus = getattr(source, "latest", gpus) or gpus
        snapshot = Snapshot(time.time(), tuple(readings), status, gpus)
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
        for source in self.sources:
            try:
                source.close()
            except Exception:
                log.exception("closing source %s", source.name)
