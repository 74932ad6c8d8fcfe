"""CPU: seconds by mode, utilisation since the previous sample, frequency, load averages, logical CPUs."""

from __future__ import annotations

import os

import psutil

from agent.sources.base import Family, Source, feeding, reading, register


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

    def __init__(self, **_: object) -> None:
        # The first call primes psutil's counter; later calls measure since the previous one.
        psutil.cpu_percent(interval=None)

    def collect(self):
        times = psutil.cpu_times()
        for mode, value in times._asdict().items():
            # guest time is already counted in user/nice on Linux (as node_exporter notes)
            if mode in ("guest", "guest_nice"):
                continue
            yield reading("fleetscope_cpu_seconds_total", value, mode=mode)
        yield reading("fleetscope_cpu_utilization_ratio", psutil.cpu_percent(interval=None) / 100.0)
        yield reading("fleetscope_cpu_logical_cpus", psutil.cpu_count(logical=True) or 0)
        freq = psutil.cpu_freq()
        if freq is not None and freq.current > 0:  # VMs often have no cpufreq: omit, never 0
            yield reading("fleetscope_cpu_frequency_hertz", freq.current * 1e6)
        load1, load5, load15 = os.getloadavg()
        yield reading("fleetscope_cpu_load1", load1)
        yield reading("fleetscope_cpu_load5", load5)
        yield reading("fleetscope_cpu_load15", load15)
