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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
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
    unknown = set(data) - {"fault"}
    if unknown:
        raise ValueError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}; expected [[fault]]")
    return tuple(sorted(faults, key=lambda f: f.at_s))


def load_scenario(path: str | Path) -> tuple[Fault, ...]:
    with open(path, "rb") as fh:
        return parse_scenario(tomllib.load(fh), str(path))
