"""Samples every source once per interval into one immutable Snapshot that the exporter and shipper share."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import select
import struct
import threading
import time
from queue import SimpleQueue
from dataclasses import dataclass
from typing import Callable, Sequence

from agent.gpu.health import Verdict
from agent.gpu.state import GpuState
from agent.sources.base import Collected, Deferred, NoData, Reading, Source
from agent.threads import Thread

log = logging.getLogger("fleetscope.agent.sampler")
# After a stuck source has spent a sample's deadline, each further group of sources gets this share of a deadline.
MIN_BUDGET_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class SourceStatus:
    up: bool
    duration_s: float
    error: str | None = None
    no_data: bool = False  # the source's library or device is absent: not an error
    problems: tuple[str, ...] = ()  # the source ran, but reports something wrong (e.g. a driver/library mismatch)
    overran: bool = False  # it did not finish within its deadline


class Snapshot:
    """The agent's one contract between sampling and its consumers (exporter, frame builder). Immutable.

    `readings` may be given as a Deferred (agent/sources/base.py): then they are built when first read, which
    the exporter does when /metrics is scraped; the frame builder reads only the typed fields."""

    __slots__ = ("ts", "_readings", "status", "gpus", "health", "host", "servers")

    def __init__(self, ts: float, readings: tuple[Reading, ...] | Deferred, status: dict[str, SourceStatus],
                 gpus: tuple[GpuState, ...] = (), health: dict[str, Verdict] | None = None,
                 host: dict[str, float] | None = None, servers: tuple = ()) -> None:
        self.ts = ts
        self._readings = readings
        self.status = status
        self.gpus = gpus
        self.health: dict[str, Verdict] = health if health is not None else {}  # GPU uuid -> verdict
        # The host figures (HostFrame fields) the sources' families feed, each the sum of its families' readings.
        self.host: dict[str, float] = host if host is not None else {}
        # Inference servers' cumulative counts per model (agent.inference_servers.ServerReading), for the frames.
        self.servers = servers

    @property
    def readings(self) -> tuple[Reading, ...]:
        r = self._readings
        return r.get() if isinstance(r, Deferred) else r

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


class _Slot:
    """One source's collection within a sample."""

    __slots__ = ("index", "source", "started", "outcome", "taken")

    def __init__(self, index: int, source: Source) -> None:
        self.index, self.source = index, source
        self.started: float | None = None
        self.outcome: _Outcome | None = None
        self.taken = False  # moved to another worker before this one started it


class _Round:
    """One sample of the periodic schedule: its lanes run at once, and the last to finish publishes it, unless the
    sampler thread, at the sample's deadline, takes over the lanes still running and publishes it instead."""

    __slots__ = ("slots", "scheduled", "started", "done", "taken_over", "open", "lock")

    def __init__(self, slots: list[_Slot], scheduled: float, lanes: set[int]) -> None:
        self.slots, self.scheduled = slots, scheduled
        self.started = time.monotonic()
        self.done = False  # every lane finished: the last one publishes it
        self.taken_over = False  # it overran: the sampler thread finishes and publishes it
        self.open = lanes  # the lanes still running: OWN_LANE, and the index of each source that may block
        self.lock = threading.Lock()

    def finish(self, lane: int) -> bool | None:
        """`lane` has finished: True when it was the last one (it publishes), False when others run on, None when
        the sample was taken over before it finished (the sampler thread has published it)."""
        with self.lock:
            if self.taken_over:
                return None
            self.open.discard(lane)
            if self.open:
                return False
            self.done = True
            return True


OWN_LANE = -1  # the lane of the sources that do not block, run in turn by the schedule's worker


class _Worker:
    """A thread that runs sources one after another: a sample's, handed over as a job, or every sample on the
    schedule (Sampler._periodic). When one of them overruns its deadline the sampler abandons the worker to
    it and hands the sources not yet started to a fresh worker."""

    def __init__(self, n: int) -> None:
        self.jobs: SimpleQueue = SimpleQueue()
        self.lock = threading.Lock()
        self.abandoned = False
        self.current: _Slot | None = None  # the slot whose source it is collecting
        self.thread = Thread(target=self._run, name=f"sources-{n}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or not job(self) or self.abandoned:
                return  # stopped, or abandoned to a stuck source that has now returned

    def run_slots(self, slots: list[_Slot]) -> bool:
        """Collects each slot in turn; False when the rest were taken by another worker (this one was abandoned)."""
        for slot in slots:
            with self.lock:
                if slot.taken:
                    return False
                slot.started = time.perf_counter()
                self.current = slot
            slot.outcome = _collect(slot.source)
            self.current = None
        return True


def _joined(parts: list[tuple[Reading, ...] | Deferred]) -> tuple[Reading, ...] | Deferred:
    """The sources' readings in order: a tuple when every source built its own, else built when first read."""
    if not any(isinstance(p, Deferred) for p in parts):
        return tuple(itertools.chain.from_iterable(parts))  # type: ignore[arg-type]
    return Deferred(lambda: list(itertools.chain.from_iterable(p.get() if isinstance(p, Deferred) else p for p in parts)))


class _Alarm:
    """A timer that one thread blocks on and another sets; set again to a later time in time, it wakes nobody.

    Linux's timerfd, through ctypes (os.timerfd_* is Python 3.13+). The sampler thread waits on it for the
    current sample's deadline, so a sample that finishes in time costs that thread no wake-up at all: on a
    virtual machine a Python thread waking from idle costs a good part of a millisecond. Where there is no
    timerfd, `Alarm.make()` gives None and the sampler thread wakes at each deadline instead.

    The struct itimerspec goes to C as a bytes object packed by `struct` and the function has no argtypes:
    ctypes passes bytes, ints and None as they are. A ctypes Structure filled field by field and passed by
    byref() ran through enough of ctypes' code to cost 2-4 ms of CPU a sample on a VM where memory untouched
    for seconds is slow to touch again (two calls a sample); this way a call costs about 10 us when warm. Even so,
    the first call after 5 s asleep cost 3-4 ms (the kernel's timer as well as ctypes' code): the schedule sets
    each deadline once, before its sleep, and moves it on to the next sample's when a sample finishes."""

    _CLOCK_MONOTONIC, _TFD_CLOEXEC, _TFD_NONBLOCK, _TFD_TIMER_ABSTIME = 1, 0o2000000, 0o4000, 1
    _SPEC = struct.Struct("@4l")  # struct itimerspec: it_interval (tv_sec, tv_nsec), it_value (tv_sec, tv_nsec)
    _SOON = _SPEC.pack(0, 0, 0, 1)

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._settime, self.fd = libc.timerfd_settime, fd
        self._closed = False

    @classmethod
    def make(cls) -> _Alarm | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
            fd = libc.timerfd_create(cls._CLOCK_MONOTONIC, cls._TFD_CLOEXEC | cls._TFD_NONBLOCK)
        except (OSError, AttributeError):  # not Linux, or no libc to ask
            return None
        return cls(libc, fd) if fd >= 0 else None

    def _set(self, spec: bytes, flags: int) -> None:
        if not self._closed:
            self._settime(self.fd, flags, spec, None)

    def at(self, when: float) -> None:
        """Rings at time.monotonic() == when (both read CLOCK_MONOTONIC); a time already past rings at once."""
        whole = max(0, int(when))
        self._set(self._SPEC.pack(0, 0, whole, max(1, int((when - whole) * 1e9))), self._TFD_TIMER_ABSTIME)

    def ring(self) -> None:
        self._set(self._SOON, 0)

    def wait(self) -> None:
        """Blocks until it rings (at once if it rang while nobody waited)."""
        select.select([self.fd], [], [])
        try:
            os.read(self.fd, 8)
        except BlockingIOError:  # re-armed or cancelled between the ring and the read
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class Sampler:
    """Runs the sources on a fixed interval, each under its own deadline: a failing or stuck source never stops
    or delays the others, and never holds the snapshot past the deadline.

    Each source that may block on hardware or the network (NVML, HTTP to inference servers) runs in a lane of
    its own, a worker thread of its own, started with the sample: a GPU in GSP timeouts never delays the
    inference servers' scrape, nor they the GPUs. The sources that only read /proc and /sys run one after
    another in the sampler's own lane, on the worker that keeps the schedule, and the last source that may block
    runs after them there: nothing runs after it to be delayed, and a node whose only such source is NVML needs
    no other thread. Every lane has the whole deadline, counted from the sample's start, and the last lane to
    finish publishes the snapshot.
    On the schedule (start()) the worker keeps the time itself: it wakes, starts the other lanes, runs its own,
    and the last lane publishes; the sampler thread wakes once per sample, at its deadline, only to check that
    the sample was published; on Linux it waits on a timer (_Alarm) that the publishing lane, finishing in time,
    moves on to the next sample's deadline (counted from when that sample is due), so it does not wake at all.
    One thread wake-up per sample, and one more per lane of a source that may block, however many sources; the snapshot
    is built by a thread whose caches the sample has just warmed (on a virtual machine, a thread waking from
    idle runs several times slower for its first milliseconds).
    A source still running at its deadline is reported (source_up 0, and for how long it has been running),
    left to finish alone on its worker, and not started again until it returns. In the own lane, the sources
    after it move to a fresh worker with what is left of the deadline (at least a tenth of one): however many
    sources are stuck, a snapshot is published about one deadline after its sample began. The own lane's
    sources share its deadline in turn; they read files the kernel answers from memory."""

    def __init__(self, sources: Sequence[Source], interval_s: float = 5.0, deadline_s: float | None = None) -> None:
        self.sources = sorted(sources, key=lambda s: getattr(s, "may_block", False))
        self.interval_s = interval_s
        # A sample gets most of the interval; a source that takes longer is reported and left to finish alone. Never
        # more than the interval: a sample is published before the next one starts.
        self.deadline_s = min(interval_s, deadline_s if deadline_s is not None else max(0.5, 0.8 * interval_s))
        self.latest: Snapshot | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = threading.Event()
        # Held until stop(): the schedule sleeps by acquiring it with a timeout, in C (Event.wait runs a dozen lines
        # of threading.py at each wake-up, whose memory a sample 5 s later finds cold).
        self._stopped = threading.Lock()
        self._stopped.acquire()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()
        self._workers = 0
        self._worker = self._new_worker()  # the own lane's
        # The sources with a lane of their own: every one that may block but the last, which runs last in the own
        # lane (nothing runs after it there for it to delay), so a node with only NVML to wait on wakes no other thread.
        self._blocking = frozenset([i for i, s in enumerate(self.sources) if getattr(s, "may_block", False)][:-1])
        self._lanes: dict[int, _Worker] = {}  # the worker of each source that may block, by the source's index
        self._stuck: dict[int, _Slot] = {}  # sources still running on an abandoned worker
        self._feeds = [{f.name: f.host for f in s.families if f.host} for s in self.sources]
        self._round: _Round | None = None  # the schedule's current sample
        self._next_at = 0.0  # when the schedule's next sample starts
        self._alarm: _Alarm | None = None  # the current sample's deadline, where timerfd exists (start())

    def _new_worker(self) -> _Worker:
        self._workers += 1
        return _Worker(self._workers)

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        self._listeners.append(callback)

    def _fresh_slots(self) -> list[_Slot]:
        for i in [i for i, slot in list(self._stuck.items()) if slot.outcome is not None]:
            del self._stuck[i]  # it returned at last: its late result is dropped, and it runs again from now
        return [_Slot(i, s) for i, s in enumerate(self.sources) if i not in self._stuck]

    def _lane(self, index: int) -> _Worker:
        """The worker of the lane of source `index` (one that may block): a fresh one if it was abandoned."""
        worker = self._lanes.get(index)
        if worker is None or worker.abandoned:
            worker = self._lanes[index] = self._new_worker()
        return worker

    def _start_lanes(self, slots: list[_Slot], job: Callable[[_Slot], Callable[[_Worker], bool]]) -> list[_Slot]:
        """Hands each slot of a source that may block to its lane's worker; the slots of the own lane."""
        own = []
        for slot in slots:
            if slot.index in self._blocking:
                self._lane(slot.index).jobs.put(job(slot))
            else:
                own.append(slot)
        return own

    def _abandon(self, worker: _Worker, slots: list[_Slot]) -> list[_Slot]:
        """Leaves `worker` to the source it is running past its deadline; the slots it has not started, to run elsewhere."""
        with worker.lock:
            running = [s for s in slots if s.started is not None and s.outcome is None]
            rest = [s for s in slots if s.started is None]
            for s in rest:
                s.taken = True
        worker.abandoned = True
        for s in running:
            self._stuck[s.index] = s
        self._worker = self._new_worker()  # the old one finishes the stuck source alone, then exits
        return rest

    def _abandon_lane(self, slot: _Slot) -> None:
        """The deadline has passed with the source of lane `slot.index` unfinished: its worker is left to it."""
        worker = self._lanes[slot.index]
        with worker.lock:
            if slot.outcome is not None:
                return  # it finished at the deadline: its readings count
            if slot.started is None:
                slot.taken = True  # its worker never got to start it (a frozen machine): reported as overrun
            else:
                self._stuck[slot.index] = slot
            worker.abandoned = True  # the next sample starts a fresh worker for the lane

    def _budget(self, due: float) -> float:
        """Seconds the sources still to run get: what is left of the sample's deadline (`due`, monotonic), or, once
        a stuck source has spent it, a tenth of the deadline, so that several stuck sources in one sample hold the
        snapshot about one deadline in all, not one each."""
        return max(due - time.monotonic(), MIN_BUDGET_SHARE * self.deadline_s)

    def _run_slots(self, slots: list[_Slot], due: float | None = None) -> list[_Slot]:
        """Runs `slots` in turn on the own lane's worker within the sample's deadline (`due`, monotonic; by default
        one deadline from now); the slots that ran (or are stuck)."""
        due = time.monotonic() + self.deadline_s if due is None else due
        todo = slots
        while todo:
            done = threading.Event()
            self._worker.jobs.put(lambda worker, todo=todo, done=done: worker.run_slots(todo) and (done.set() or True))
            if done.wait(self._budget(due)):
                break
            rest = self._abandon(self._worker, todo)
            todo = [_Slot(s.index, s.source) for s in rest]
            slots = [s for s in slots if not s.taken] + todo
        return slots

    def sample_once(self) -> Snapshot:
        """One sample now, on this thread's time (before start(), or without it)."""
        slots = self._fresh_slots()
        due = time.monotonic() + self.deadline_s
        lanes: list[tuple[_Slot, threading.Event]] = []

        def job(slot: _Slot) -> Callable[[_Worker], bool]:
            done = threading.Event()
            lanes.append((slot, done))
            return lambda worker: worker.run_slots([slot]) and (done.set() or True)

        own = self._run_slots(self._start_lanes(slots, job), due)
        for slot, done in lanes:
            if not done.wait(max(0.0, due - time.monotonic())):
                self._abandon_lane(slot)
        return self._publish(own + [slot for slot, _ in lanes])

    def _publish(self, slots: list[_Slot]) -> Snapshot:
        parts: list[tuple[Reading, ...] | Deferred] = []
        status: dict[str, SourceStatus] = {}
        gpus: tuple[GpuState, ...] = ()
        health: dict[str, Verdict] = {}
        host: dict[str, float] = {}
        servers: list = []
        outcomes = {slot.index: slot.outcome for slot in slots if slot.outcome is not None}
        now = time.perf_counter()
        for i, source in enumerate(self.sources):
            outcome = outcomes.get(i)
            stuck = self._stuck.get(i)  # once: the schedule's worker may forget it meanwhile (_fresh_slots)
            if stuck is not None or outcome is None:
                # Still running from this or an earlier sample: report it, do not wait, do not start another. (Or
                # never started: its lane's worker did not get to it within the deadline.)
                running_for = now - (stuck.started or now) if stuck is not None else 0.0
                error = (f"overran its {self.deadline_s:.1f} s deadline (running for {running_for:.1f} s)" if stuck is not None
                         else f"did not start within its {self.deadline_s:.1f} s deadline")
                status[source.name] = SourceStatus(False, running_for, error, overran=True)
                if source.name not in self._failing:
                    log.error("source %s did not finish within %.1f s; the snapshot goes on without it",
                              source.name, self.deadline_s)
                    self._failing.add(source.name)
                continue
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
            feeds = self._feeds[i]
            if feeds:  # the host figures are wanted at every sample: such a source's readings are built now
                for r in got.readings:
                    figure = feeds.get(r.name)
                    if figure is not None:
                        host[figure] = host.get(figure, 0.0) + r.value
            parts.append(got.deferred)
            gpus = got.gpus or gpus
            servers.extend(got.servers)
            health.update(got.health)
            status[source.name] = SourceStatus(True, duration, problems=got.problems)
        snapshot = Snapshot(time.time(), _joined(parts), status, gpus, health, host, tuple(servers))
        self.latest = snapshot
        for callback in self._listeners:
            try:
                callback(snapshot)
            except Exception:
                log.exception("snapshot subscriber failed")
        return snapshot

    def _periodic(self, worker: _Worker, first_at: float) -> bool:
        """The schedule, on the own lane's worker: sleep, start the lanes, run the own lane's sources, and publish
        if the last to finish, until stopped or abandoned."""
        next_at = first_at
        alarm = self._alarm
        # Each sample's deadline is set before the sleep that precedes it, by a thread still warm from the sample
        # before, counted from when the sample is due: set after waking, the timer's one call cost 3-4 ms of CPU
        # a sample on a VM where what has not run for seconds is slow to run again (it was the first thing run).
        if alarm is not None:
            alarm.at(next_at + self.deadline_s)
        while not self._stop.is_set() and not self._stopped.acquire(timeout=max(0.0, next_at - time.monotonic())):
            last = self._round
            if last is not None and not last.done and not last.taken_over:
                # The sample before still has a lane running as this one is due (it started late, or its deadline is
                # the whole interval): it is taken over now, by this worker, whose own lane of it is done. The
                # watchdog watches one sample, this one from now on: left open, the last would never be published
                # and its hung source would be started again.
                self._take_over(last)
            slots = self._fresh_slots()
            round_ = _Round(slots, next_at, {OWN_LANE, *(s.index for s in slots if s.index in self._blocking)})
            self._round = round_
            own = self._start_lanes(slots, lambda slot, round_=round_: lambda w: self._run_lane(w, round_, slot))
            if not worker.run_slots(own) or round_.taken_over:
                return False  # abandoned to a stuck source: the schedule goes on elsewhere
            self._next_at = next_at + self.interval_s  # before the watchdog or a lane can look
            last = round_.finish(OWN_LANE)
            if last is None:  # taken over at its deadline with this lane still running: the schedule goes on elsewhere
                return False
            if last:
                self._publish_round(round_)
            next_at = self._next_at
        return False

    def _run_lane(self, worker: _Worker, round_: _Round, slot: _Slot) -> bool:
        """One source that may block, in its lane, for the schedule's sample `round_`."""
        if not worker.run_slots([slot]):
            return False
        if round_.finish(slot.index):
            self._publish_round(round_)
        return True

    def _publish_round(self, round_: _Round) -> None:
        """Publishes the schedule's sample and moves the deadline timer on to the next one's."""
        self._publish(round_.slots)
        # If a sample overran the interval, skip ahead rather than bursting to catch up.
        self._next_at = max(self._next_at, time.monotonic())
        if self._alarm is not None:
            self._alarm.at(self._next_at + self.deadline_s)  # in time: the watchdog sleeps on, until the next deadline

    def _take_over(self, round_: _Round) -> None:
        """The round overran its deadline: report what is stuck, run the rest of the own lane elsewhere, publish,
        and, if the schedule's worker is the one stuck, go on with the schedule on a fresh worker."""
        with round_.lock:
            if round_.done or round_.taken_over:
                return  # published by its last lane, or taken over already (the watchdog, or the next sample)
            round_.taken_over = True
            still = set(round_.open)
        for slot in round_.slots:
            if slot.index in still and slot.index in self._blocking:
                self._abandon_lane(slot)
        if OWN_LANE not in still:  # the schedule's worker is asleep until the next sample, or is the next sample's
            self._publish_round(round_)
            return
        own = [s for s in round_.slots if s.index not in self._blocking]
        rest = self._abandon(self._worker, own)
        # The sample's deadline has passed: the sources left get the least budget, not a whole deadline again.
        slots = [s for s in round_.slots if not s.taken] + self._run_slots([_Slot(s.index, s.source) for s in rest],
                                                                            due=round_.started + self.deadline_s)
        self._publish(slots)
        self._next_at = max(round_.scheduled + self.interval_s, time.monotonic())
        self._worker.jobs.put(lambda w, at=self._next_at: self._periodic(w, at))

    def _run(self) -> None:
        """The watchdog: the worker keeps the schedule, this takes over a sample that overruns its deadline."""
        self._next_at = time.monotonic()
        self._worker.jobs.put(lambda w, at=self._next_at: self._periodic(w, at))
        alarm = self._alarm
        if alarm is not None:  # woken only by a deadline the worker did not move on in time, or by stop()
            while True:
                alarm.wait()
                if self._stop.is_set():
                    return
                round_, now = self._round, time.monotonic()
                if round_ is not None and not round_.done and not round_.taken_over:
                    due = round_.started + self.deadline_s
                    if now >= due:
                        self._take_over(round_)  # the new worker sets its own deadlines
                    else:
                        alarm.at(due)  # the sample started after it was due: its deadline counts from its start
                    continue
                # No sample running: the worker sets the next deadline when it has published, so this is a worker
                # late to start the next sample (a frozen machine: look again soon), or a deadline that passed
                # while the last sample was being published (the worker sets the next one, or has).
                due = self._next_at + self.deadline_s
                alarm.at(due if due > now else now + min(0.1, self.deadline_s))
        while True:  # no timerfd: wake at each sample's deadline and look
            round_, now = self._round, time.monotonic()
            if round_ is not None and not round_.done and not round_.taken_over:
                due = round_.started + self.deadline_s
                if now >= due:
                    self._take_over(round_)
                    continue
            else:
                due = self._next_at + self.deadline_s
                if due <= now:  # the worker is late to start the next sample (a frozen machine): look again soon
                    due = now + min(0.1, self.deadline_s)
            if self._stop.wait(due - now):
                return

    def start(self) -> None:
        self._alarm = _Alarm.make()
        self._thread = Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._stopped.release()  # wakes the schedule's worker, if it sleeps
        if self._alarm is not None:
            self._alarm.ring()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._alarm is not None and (self._thread is None or not self._thread.is_alive()):
            self._alarm.close()
        workers = [self._worker, *self._lanes.values()]
        for worker in workers:
            worker.jobs.put(None)
        # A sample in progress finishes first, within its deadline: a source is not closed while a lane reads it
        # (nvmlShutdown under another thread's NVML call). One still running then is stuck: it is left open, as
        # are those stuck from earlier samples, on the threads left to them.
        until = time.monotonic() + self.deadline_s
        for worker in workers:
            worker.thread.join(timeout=max(0.0, until - time.monotonic()))
        running = {slot.index for slot in list(self._stuck.values()) if slot.outcome is None}
        running |= {slot.index for w in workers if w.thread.is_alive() and (slot := w.current) is not None}
        for i, source in enumerate(self.sources):
            if i in running:
                log.warning("source %s is still running as the sampler stops: it is not closed", source.name)
                continue
            try:
                source.close()
            except Exception:
                log.exception("closing source %s", source.name)
