"""Hardware temperatures from /sys/class/hwmon (CPU packages, NICs, NVMe drives, board sensors).

The sensors present, their labels and their thresholds (max, crit) are static: they are read every
SLOW_REFRESH_S. Each sample reads only the temperatures.
"""

from __future__ import annotations

from pathlib import Path

from agent.procfs import KeptFiles, read_text
from agent.sources.base import Family, NoData, Reading, Slow, Source, register

_INPUT, _MAX, _CRIT = ("fleetscope_hwmon_temperature_celsius", "fleetscope_hwmon_temperature_max_celsius",
                       "fleetscope_hwmon_temperature_critical_celsius")


def _celsius(path: Path | str) -> float | None:
    try:
        text = read_text(path)
        return int(text) / 1000.0 if text is not None else None
    except (OSError, ValueError):
        return None  # some sensors answer EIO or ENODATA when idle: skip that one


class _Sensor:
    __slots__ = ("input", "labels", "max", "crit")

    def __init__(self, chip_dir: Path, chip: str, prefix: str) -> None:
        self.input = str(chip_dir / f"{prefix}_input")
        label = (read_text(chip_dir / f"{prefix}_label") or prefix).strip()
        self.labels = (("chip", chip), ("sensor", label))
        self.max = _celsius(chip_dir / f"{prefix}_max")
        self.crit = _celsius(chip_dir / f"{prefix}_crit")


@register("hwmon")
class HwmonSource(Source):
    name = "hwmon"
    families = (
        Family(_INPUT, "gauge", "Temperature of a hardware sensor.", ("chip", "sensor")),
        Family(_MAX, "gauge", "The sensor's high threshold.", ("chip", "sensor")),
        Family(_CRIT, "gauge", "The sensor's critical threshold.", ("chip", "sensor")),
    )

    def __init__(self, *, sysfs: str = "/sys", **_: object) -> None:
        self.root = Path(sysfs) / "class" / "hwmon"
        self._sensors: Slow[list[_Sensor] | None] = Slow(self._find)
        self._inputs = KeptFiles()

    def _find(self) -> list[_Sensor] | None:
        if not self.root.is_dir():
            return None
        sensors = []
        for chip_dir in sorted(self.root.iterdir()):
            name = (read_text(chip_dir / "name") or chip_dir.name).strip()
            # Two chips of one driver (two CPU sockets) share a name; the hwmon index tells them apart.
            chip = f"{name}/{chip_dir.name}"
            for inp in sorted(chip_dir.glob("temp*_input")):
                sensors.append(_Sensor(chip_dir, chip, inp.name.removesuffix("_input")))
        return sensors

    def collect(self):
        sensors = self._sensors.get()
        if sensors is None:
            raise NoData(f"no {self.root}")
        out = []
        for s in sensors:
            try:
                text = self._inputs.read(s.input)
                if text is None:
                    continue  # gone since the sensors were listed (a drive pulled): its thresholds go too
                out.append(Reading(_INPUT, int(text) / 1000.0, s.labels))
            except (OSError, ValueError):
                pass  # some sensors answer EIO or ENODATA when idle: skip that reading
            if s.max is not None:
                out.append(Reading(_MAX, s.max, s.labels))
            if s.crit is not None:
                out.append(Reading(_CRIT, s.crit, s.labels))
        return out

    def close(self) -> None:
        self._inputs.close()
