"""Memory and swap, in bytes."""

from __future__ import annotations

import psutil

from agent.sources.base import Family, Source, reading, register

_FIELDS = {
    "total": "Physical memory.",
    "available": "Memory available to new work without swapping (MemAvailable).",
    "used": "Memory in use (total minus free, buffers and cache).",
    "free": "Memory not used at all.",
    "cached": "Page cache.",
    "buffers": "Kernel buffers.",
}


@register("memory")
class MemorySource(Source):
    name = "memory"
    families = tuple(Family(f"fleetscope_memory_{k}_bytes", "gauge", h) for k, h in _FIELDS.items()) + (
        Family("fleetscope_memory_swap_total_bytes", "gauge", "Swap space."),
        Family("fleetscope_memory_swap_used_bytes", "gauge", "Swap space in use."),
    )

    def __init__(self, **_: object) -> None:
        pass

    def collect(self):
        vm = psutil.virtual_memory()
        for key in _FIELDS:
            value = getattr(vm, key, None)
            if value is not None:  # not every platform has every field
                yield reading(f"fleetscope_memory_{key}_bytes", value)
        swap = psutil.swap_memory()
        yield reading("fleetscope_memory_swap_total_bytes", swap.total)
        yield reading("fleetscope_memory_swap_used_bytes", swap.used)
