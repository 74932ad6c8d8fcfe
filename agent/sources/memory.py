"""Memory, swap and huge pages in bytes, and OOM kills, from /proc/meminfo and /proc/vmstat."""

from __future__ import annotations

from pathlib import Path

from agent.procfs import KeptFile, pick_keyed
from agent.sources.base import Family, NoData, Source, feeding, reading, register

# (meminfo key, metric, help)
_MEMINFO = (
    ("MemTotal", "fleetscope_memory_total_bytes", "Physical memory."),
    ("MemAvailable", "fleetscope_memory_available_bytes", "Memory available to new work without swapping (MemAvailable)."),
    ("MemFree", "fleetscope_memory_free_bytes", "Memory not used at all."),
    ("Cached", "fleetscope_memory_cached_bytes", "Page cache."),
    ("Buffers", "fleetscope_memory_buffers_bytes", "Kernel buffers."),
    ("Shmem", "fleetscope_memory_shared_bytes", "Shared memory (tmpfs, /dev/shm: NCCL and DataLoader buffers live here)."),
    ("SwapTotal", "fleetscope_memory_swap_total_bytes", "Swap space."),
    ("SwapFree", "fleetscope_memory_swap_free_bytes", "Swap space free."),
    ("HugePages_Total", "fleetscope_memory_hugepages", "Huge pages configured."),
    ("HugePages_Free", "fleetscope_memory_hugepages_free", "Huge pages not in use."),
    ("Hugepagesize", "fleetscope_memory_hugepage_size_bytes", "Size of one huge page."),
    ("AnonHugePages", "fleetscope_memory_anon_hugepages_bytes", "Transparent huge pages in anonymous memory."),
)

_KEYS = tuple(key for key, _, _ in _MEMINFO)


@register("memory")
class MemorySource(Source):
    name = "memory"
    families = tuple(Family(metric, "gauge", help_) for _, metric, help_ in _MEMINFO) + (
        Family("fleetscope_memory_used_bytes", "gauge", "Memory in use: total minus available."),
        Family("fleetscope_memory_oom_kills_total", "counter", "Processes the kernel's OOM killer ended."),
    )
    families = feeding(families, {"fleetscope_memory_total_bytes": "memory_total_bytes",
                                  "fleetscope_memory_available_bytes": "memory_available_bytes"})

    def __init__(self, *, procfs: str = "/proc", **_: object) -> None:
        self.procfs = Path(procfs)
        self._meminfo, self._vmstat = KeptFile(self.procfs / "meminfo"), KeptFile(self.procfs / "vmstat")

    def collect(self):
        text = self._meminfo.read()
        if text is None:
            raise NoData(f"no {self.procfs / 'meminfo'}")
        info = pick_keyed(text, _KEYS)
        for key, metric, _ in _MEMINFO:
            if key in info:  # older kernels lack some keys: omitted, never 0
                yield reading(metric, info[key])
        if "MemTotal" in info and "MemAvailable" in info:
            yield reading("fleetscope_memory_used_bytes", info["MemTotal"] - info["MemAvailable"])
        vmstat = self._vmstat.read()
        if vmstat is not None:
            oom = pick_keyed(vmstat, ("oom_kill",)).get("oom_kill")  # since Linux 4.13
            if oom is not None:
                yield reading("fleetscope_memory_oom_kills_total", oom)

    def close(self) -> None:
        self._meminfo.close()
        self._vmstat.close()
