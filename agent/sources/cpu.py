"""CPU: seconds by mode, utilisation since the previous sample, frequency, load averages, logical CPUs.

One read of /proc/stat per sample gives both the seconds by mode and the utilisation (psutil's cpu_times and
cpu_percent would read it twice). The frequency is the mean of the cpufreq policies' scaling_cur_freq; a kernel
without a cpufreq driver (most VMs) only has /proc/cpuinfo's "cpu MHz", a large file on a large node, read every
SLOW_REFRESH_S, as are the number of CPUs online and the list of policies.
"""

from __future__ import annotations

import glob
import os

from agent.procfs import KeptFile, KeptFiles, read_text
from agent.sources.base import Family, Reading, Slow, Source, feeding, register

# /proc/stat's columns, in order (proc(5)); guest time is already counted in user/nice (as node_exporter notes).
_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
_GUEST = ("guest", "guest_nice")
_TICKS = os.sysconf("SC_CLK_TCK")
_SECONDS = "fleetscope_cpu_seconds_total"


def parse_cpu_line(text: str) -> dict[str, float]:
    """Seconds by mode from /proc/stat's first line ("cpu  user nice system ...", in clock ticks)."""
    fields = text[:text.find("\n")].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"/proc/stat does not start with the cpu line: {text[:80]!r}")
    return {mode: int(x) / _TICKS for mode, x in zip(_MODES, fields[1:])}


def busy_ratio(before: dict[str, float], after: dict[str, float]) -> float:
    """Share of CPU time not idle (nor waiting for I/O) between two readings, as psutil.cpu_percent computes
    it (rounded to 0.1%): guest time is inside user time, and a counter that went back counts 0."""
    delta = {mode: max(0.0, after[mode] - before.get(mode, 0.0)) for mode in after if mode not in _GUEST}
    total = sum(delta.values())
    if total == 0:
        return 0.0
    busy = total - delta.get("idle", 0.0) - delta.get("iowait", 0.0)
    return round(busy / total * 100, 1) / 100.0


def _frequency_files() -> list[str]:
    return (glob.glob("/sys/devices/system/cpu/cpufreq/policy[0-9]*/scaling_cur_freq")
            or glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))


def _cpuinfo_mhz() -> float | None:
    """The mean of /proc/cpuinfo's "cpu MHz" lines, or None."""
    values = []
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line[:7].lower() == "cpu mhz":
            try:
                values.append(float(line.split(":", 1)[1]))
            except (IndexError, ValueError):
                continue
    return sum(values) / len(values) if values else None


@register("cpu")
class CpuSource(Source):
    name = "cpu"
    families = (
        Family("fleetscope_cpu_seconds_total", "counter", "CPU time spent in each mode, summed over all CPUs.", ("mode",)),
        Family("fleetscope_cpu_utilization_ratio", "gauge", "Share of CPU time not idle since the previous sample (0-1)."),
        Family("fleetscope_cpu_logical_cpus", "gauge", "Logical CPUs online."),
        Family("fleetscope_cpu_frequency_hertz", "gauge", "Current CPU frequency, averaged over CPUs."),
        Family("fleetscope_cpu_load1", "gauge", "1-minute load average."),
        Family("fleetscope_cpu_load5", "gauge", "5-minute load average."),
        Family("fleetscope_cpu_load15", "gauge", "15-minute load average."),
    )
    families = feeding(families, {"fleetscope_cpu_utilization_ratio": "cpu_utilization_ratio", "fleetscope_cpu_load1": "load1"})

    def __init__(self, *, procfs: str = "/proc", **_: object) -> None:
        self.stat = KeptFile(f"{procfs}/stat")
        self._freq = KeptFiles()
        self._logical = Slow(lambda: os.sysconf("SC_NPROCESSORS_ONLN"))
        self._freq_files = Slow(_frequency_files)
        self._cpuinfo_mhz = Slow(_cpuinfo_mhz)
        self._labels = {mode: (("mode", mode),) for mode in _MODES}
        # The first reading primes the utilisation; later samples measure since the previous one.
        self._last = self._times()

    def _times(self) -> dict[str, float]:
        text = self.stat.read(4096)  # the first line is all it needs
        if text is None:
            raise FileNotFoundError(self.stat.path)
        return parse_cpu_line(text)

    def _frequency_hz(self) -> float | None:
        files = self._freq_files.get()
        if not files:
            mhz = self._cpuinfo_mhz.get()
            return mhz * 1e6 if mhz else None
        khz = []
        for path in files:
            text = self._freq.read(path)  # None: the CPU went offline since the list was made
            if text is not None and text.strip().isdigit():
                khz.append(int(text))
        return sum(khz) / len(khz) * 1e3 if khz else None

    def collect(self):
        times = self._times()
        out = [Reading(_SECONDS, value, self._labels[mode]) for mode, value in times.items() if mode not in _GUEST]
        out.append(Reading("fleetscope_cpu_utilization_ratio", busy_ratio(self._last, times)))
        self._last = times
        out.append(Reading("fleetscope_cpu_logical_cpus", float(self._logical.get() or 0)))
        freq = self._frequency_hz()
        if freq is not None and freq > 0:  # VMs often have no cpufreq: omit, never 0
            out.append(Reading("fleetscope_cpu_frequency_hertz", freq))
        load1, load5, load15 = os.getloadavg()
        out += [Reading("fleetscope_cpu_load1", load1), Reading("fleetscope_cpu_load5", load5),
                Reading("fleetscope_cpu_load15", load15)]
        return out

    def close(self) -> None:
        self.stat.close()
        self._freq.close()
