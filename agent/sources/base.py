"""What every source shares: readings, metric families, NoData, and the registry of sources by name."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, Literal, NamedTuple, TypeVar

from agent.gpu.health import Verdict
from agent.gpu.state import GpuState

Kind = Literal["gauge", "counter", "untyped"]
Labels = tuple[tuple[str, str], ...]


# Static facts (link speeds, the sensors present, the CPU count, mount tables where the kernel cannot say they
# changed) are read again this often, not at every sample.
SLOW_REFRESH_S = 60.0
T = TypeVar("T")


class Slow(Generic[T]):
    """`read()`'s value, read again when it is SLOW_REFRESH_S old (or when asked to, `stale=True`)."""

    def __init__(self, read: Callable[[], T], period_s: float = SLOW_REFRESH_S) -> None:
        self.read, self.period_s = read, period_s
        self._value: T | None = None
        self._at = float("-inf")

    def get(self, stale: bool = False) -> T:
        now = time.monotonic()
        if stale or now - self._at >= self.period_s:
            self._value, self._at = self.read(), now
        return self._value  # type: ignore[return-value]


class NoData(Exception):
    """The library or device a source reads is absent: not an error, logged at debug."""


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family a source may emit; counters are named with their `_total` suffix."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    # printf-style spelling of the values ("%d", "%f") where another exporter's exact text must be kept
    # (--compat dcgm); empty: Prometheus' shortest float. Only the fast renderer can honour it.
    value_format: str = ""
    # The host figure (a HostFrame field, agent/frames.py) this family's readings add up to, if any.
    host: str = ""


class Reading(NamedTuple):
    """One series' value. A named tuple, not a frozen dataclass: an 8-GPU node makes ~1,700 of these per
    sample, and a tuple is built in half the time."""

    name: str
    value: float
    labels: Labels = ()


def reading(metric: str, value: float, /, **labels: object) -> Reading:
    return Reading(metric, float(value), tuple((k, str(v)) for k, v in labels.items()))


def feeding(families: tuple[Family, ...], figures: dict[str, str]) -> tuple[Family, ...]:
    """`families`, each named in `figures` marked with the host figure its readings add up to."""
    unknown = set(figures) - {f.name for f in families}
    if unknown:
        raise ValueError(f"no such families: {sorted(unknown)}")
    return tuple(dataclasses.replace(f, host=figures[f.name]) if f.name in figures else f for f in families)


def by_family(families: Iterable[Family], readings: Iterable[Reading]) -> Iterator[tuple[Family, list[Reading]]]:
    """Each family, in order, with its readings; families without a reading are left out."""
    grouped: dict[str, list[Reading]] = {}
    for r in readings:
        grouped.setdefault(r.name, []).append(r)
    for fam in families:
        rows = grouped.get(fam.name)
        if rows:
            yield fam, rows


class Deferred:
    """Readings built when first asked for, once, by `build()`: a function of one sample's data only (it must
    not read state that later samples change), so that what it returns is that sample's readings whenever it runs.
    The GPU source's thousand-odd series are built this way: only what is scraped is built (the shipper reads
    the snapshot's typed fields, never its readings)."""

    __slots__ = ("_build", "_readings", "_lock")

    def __init__(self, build: Callable[[], Iterable[Reading]]) -> None:
        self._build: Callable[[], Iterable[Reading]] | None = build
        self._readings: tuple[Reading, ...] | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._readings is not None

    def get(self) -> tuple[Reading, ...]:
        readings = self._readings
        if readings is None:
            with self._lock:  # two scrapes at once build it once
                if self._readings is None:
                    self._readings = tuple(self._build())  # type: ignore[misc]
                    self._build = None  # what it held (the sample's data) is not needed any more
                readings = self._readings
        return readings


class Collected:
    """What one source contributes to a snapshot beyond its readings: typed fields the consumers read.
    `readings` is a tuple, or a Deferred that builds them when first read."""

    __slots__ = ("_readings", "gpus", "health", "problems", "servers")

    def __init__(self, readings: tuple[Reading, ...] | Deferred, gpus: tuple[GpuState, ...] = (),
                 health: dict[str, Verdict] | None = None, problems: tuple[str, ...] = (),
                 servers: tuple = ()) -> None:
        self._readings = readings
        self.gpus = gpus
        self.servers = servers  # agent.inference_servers.ServerReading: inference servers' cumulative counts
        self.health: dict[str, Verdict] = health if health is not None else {}  # GPU uuid -> verdict
        self.problems = problems

    @property
    def readings(self) -> tuple[Reading, ...]:
        r = self._readings
        return r.get() if isinstance(r, Deferred) else r

    @property
    def deferred(self) -> tuple[Reading, ...] | Deferred:
        """The readings as given: a Deferred stays unbuilt."""
        return self._readings

    def __iter__(self):  # a Collected reads as its readings, as a plain source's result does
        return iter(self.readings)


class Source:
    """A subsystem the sampler reads once per interval. `collect()` returns its readings."""

    name: str = ""
    families: tuple[Family, ...] = ()
    may_block = False  # it talks to hardware or the network and can hang: the sampler runs it after the others

    def collect(self) -> Iterable[Reading] | Collected:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Registration:
    name: str
    factory: Callable[..., Source]
    default_enabled: bool


REGISTRY: dict[str, Registration] = {}


def register(name: str, *, default_enabled: bool = True) -> Callable[[Callable[..., Source]], Callable[..., Source]]:
    """Register a source factory under `name` (enabled or disabled by that name in config)."""

    def wrap(factory: Callable[..., Source]) -> Callable[..., Source]:
        REGISTRY[name] = Registration(name, factory, default_enabled)
        return factory

    return wrap
