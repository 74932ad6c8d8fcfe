"""Hardware temperatures from /sys/class/hwmon (CPU packages, NICs, NVMe drives, board sensors)."""

from __future__ import annotations

from pathlib import Path

from agent.procfs import read_text
from agent.sources.base import Family, NoData, Source, reading, register


@register("hwmon")
class HwmonSource(Source):
    name = "hwmon"
    families = (
        Family("fleetscope_hwmon_temperature_celsius", "gauge", "Temperature of a hardware sensor.", ("chip", "sensor")),
        Family("fleetscope_hwmon_temperature_max_celsius", "gauge", "The sensor's high threshold.", ("chip", "sensor")),
        Family("fleetscope_hwmon_temperature_critical_celsius", "gauge", "The sensor's critical threshold.", ("chip", "sensor")),
    )

    def __init__(self, *, sysfs: str = "/sys", **_: object) -> None:
        self.root = Path(sysfs) / "class" / "hwmon"

    def collect(self):
        if not self.root.is_dir():
            raise NoData(f"no {self.root}")
        out = []
        for chip_dir in sorted(self.root.iterdir()):
            name = (read_text(chip_dir / "name") or chip_dir.name).strip()
            # Two chips of one driver (two CPU sockets) share a name; the hwmon index tells them apart.
            chip = f"{name}/{chip_dir.name}"
            for inp in sorted(chip_dir.glob("temp*_input")):
                prefix = inp.name.removesuffix("_input")
                label = (read_text(chip_dir / f"{prefix}_label") or prefix).strip()
                for suffix, metric in (("input", "fleetscope_hwmon_temperature_celsius"),
                                       ("max", "fleetscope_hwmon_temperature_max_celsius"),
                                       ("crit", "fleetscope_hwmon_temperature_critical_celsius")):
                    try:
                        text = read_text(chip_dir / f"{prefix}_{suffix}")
                        if text is not None:
                            out.append(reading(metric, int(text) / 1000.0, chip=chip, sensor=label))
                    except (OSError, ValueError):
                        continue  # some sensors answer EIO or ENODATA when idle: skip that one
        return out
