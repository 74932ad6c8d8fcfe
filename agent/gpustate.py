"""The state of one GPU at one sample, as every GPU backend (NVML, simulated) reports it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GpuState:
    """A field the GPU does not support is None, never 0."""

    index: int
    uuid: str
    up: bool = True
    name: str | None = None
    serial: str | None = None
    pci_bus_id: str | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    sm_clock_hertz: float | None = None
    sm_clock_max_hertz: float | None = None
    memory_clock_hertz: float | None = None
    fan_speed_ratio: float | None = None
    pstate: int | None = None
    # Processes with a CUDA context on this GPU, for attributing workload events to it.
    pids: tuple[int, ...] = field(default=())
