"""Pressure stall information (PSI): time tasks waited for CPU, memory and I/O."""

from __future__ import annotations

from pathlib import Path

from agent.procfs import KeptFile, parse_pressure
from agent.sources.base import Family, NoData, Source, feeding, reading, register

RESOURCES = ("cpu", "memory", "io")


@register("pressure")
class PressureSource(Source):
    name = "pressure"
    families = tuple(
        Family(f"fleetscope_pressure_{res}_{kind}_seconds_total", "counter", help_)
        for res in RESOURCES
        for kind, help_ in (("waiting", f"Time at least one task waited for {res}."),
                            ("stalled", f"Time all non-idle tasks were stalled on {res}."))
    )
    families = feeding(families, {"fleetscope_pressure_memory_stalled_seconds_total": "memory_stalled_seconds_total"})

    def __init__(self, *, procfs: str = "/proc", **_: object) -> None:
        self.root = Path(procfs) / "pressure"
        self._files = tuple((res, KeptFile(self.root / res)) for res in RESOURCES)

    def collect(self):
        found = False
        for res, kept in self._files:
            text = kept.read()
            if text is None:
                continue
            found = True
            values = parse_pressure(text)
            if "some" in values:
                yield reading(f"fleetscope_pressure_{res}_waiting_seconds_total", values["some"])
            # The kernel reports "full" for cpu as 0 before 5.13 and on the root cgroup: meaningless, left out.
            if "full" in values and res != "cpu":
                yield reading(f"fleetscope_pressure_{res}_stalled_seconds_total", values["full"])
        if not found:
            raise NoData("no /proc/pressure (kernel without PSI, or psi=0)")

    def close(self) -> None:
        for _, kept in self._files:
            kept.close()
