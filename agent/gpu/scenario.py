"""Fault scenarios for the simulated GPUs: what goes wrong, on which GPU, when, for how long.

A scenario is a TOML file of [[fault]] tables:

    [[fault]]
    at_s = 60           # seconds after the agent starts
    gpu = 3             # GPU index
    kind = "thermal"    # thermal | power_cap | xid | nvlink_crc_storm | pcie_degraded
    duration_s = 300    # optional; by default the fault lasts until the agent stops

    [[fault]]
    at_s = 120
    gpu = 5
    kind = "xid"
    xid = 79            # 79: the GPU falls off the bus; 48, 94, 95: uncorrectable ECC; 63: row remap pending

Kind-specific settings: `power_limit_watts` (power_cap, default 350), `link` and `errors_per_second`
(nvlink_crc_storm, defaults 0 and 2000), `width` (pcie_degraded, default 8).

An optional top-level `start_ts = 1767225600.0` (Unix seconds) makes `at_s` count from that instant
instead of from the agent's start: an agent that starts late sees each fault at the same wall-clock
time, and so does anything else that plays the scenario from its start (`read_scenario`; the demo's
training ranks model the GPU they run on this way, fleetscope.sim.training).
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

KINDS = ("thermal", "power_cap", "xid", "nvlink_crc_storm", "pcie_degraded")


@dataclass(frozen=True)
class Fault:
    at_s: float
    gpu: int
    kind: str
    duration_s: float | None = None
    params: dict = field(default_factory=dict)

    def active(self, t: float) -> bool:
        return t >= self.at_s and (self.duration_s is None or t < self.at_s + self.duration_s)


def parse_scenario(data: dict, where: str = "scenario") -> tuple[Fault, ...]:
    faults = []
    for i, raw in enumerate(data.get("fault", [])):
        here = f"{where}: fault {i + 1}"
        raw = dict(raw)
        try:
            at_s, gpu, kind = float(raw.pop("at_s")), int(raw.pop("gpu")), str(raw.pop("kind"))
        except KeyError as exc:
            raise ValueError(f"{here}: missing {exc.args[0]!r} (every fault needs at_s, gpu and kind)") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{here}: {exc}") from None
        if kind not in KINDS:
            raise ValueError(f"{here}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "xid" and not isinstance(raw.get("xid"), int):
            raise ValueError(f"{here}: an xid fault needs an integer `xid` code")
        duration = raw.pop("duration_s", None)
        faults.append(Fault(at_s, gpu, kind, float(duration) if duration is not None else None, raw))
    unknown = set(data) - {"fault", "start_ts"}
    if unknown:
        raise ValueError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}; expected [[fault]]")
    return tuple(sorted(faults, key=lambda f: f.at_s))


@dataclass(frozen=True)
class Scenario:
    faults: tuple[Fault, ...]
    start_ts: float | None = None  # the Unix time `at_s` counts from; None: from whoever plays it starts

    def faults_from(self, now: float) -> tuple[Fault, ...]:
        """The faults timed from `now` (Unix seconds), the moment the caller starts playing them."""
        if self.start_ts is None:
            return self.faults
        late = now - self.start_ts
        return tuple(replace(f, at_s=f.at_s - late) for f in self.faults)


def read_scenario(path: str | Path) -> Scenario:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    start = data.get("start_ts")
    if start is not None and (isinstance(start, bool) or not isinstance(start, (int, float))):
        raise ValueError(f"{path}: start_ts must be a Unix time in seconds, got {start!r}")
    return Scenario(parse_scenario(data, str(path)), None if start is None else float(start))


def load_scenario(path: str | Path, now: float | None = None) -> tuple[Fault, ...]:
    """The scenario's faults, timed from `now` (default: this moment, the agent's start) when it has a start_ts."""
    return read_scenario(path).faults_from(time.time() if now is None else now)
