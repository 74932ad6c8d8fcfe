"""GPUs: identity, utilisation, memory, temperature, power, energy and clocks, from NVML or the simulator."""

from __future__ import annotations

import logging

from agent.gpustate import GpuState
from agent.sources.base import Family, NoData, Source, reading, register

log = logging.getLogger("fleetscope.agent.gpu")

G = ("gpu", "uuid")

# (GpuState field, metric, kind, help)
_FIELDS = (
    ("utilization_ratio", "fleetscope_gpu_utilization_ratio", "gauge", "Share of the last sample period a kernel was running (0-1)."),
    ("memory_utilization_ratio", "fleetscope_gpu_memory_utilization_ratio", "gauge", "Share of the last sample period device memory was read or written (0-1)."),
    ("memory_used_bytes", "fleetscope_gpu_memory_used_bytes", "gauge", "Device memory in use."),
    ("memory_free_bytes", "fleetscope_gpu_memory_free_bytes", "gauge", "Device memory free."),
    ("memory_total_bytes", "fleetscope_gpu_memory_total_bytes", "gauge", "Device memory installed."),
    ("temperature_celsius", "fleetscope_gpu_temperature_celsius", "gauge", "GPU core temperature."),
    ("power_watts", "fleetscope_gpu_power_watts", "gauge", "Power draw."),
    ("power_limit_watts", "fleetscope_gpu_power_limit_watts", "gauge", "Enforced power limit."),
    ("energy_joules", "fleetscope_gpu_energy_joules_total", "counter", "Energy consumed since the driver loaded."),
    ("sm_clock_hertz", "fleetscope_gpu_sm_clock_hertz", "gauge", "SM clock."),
    ("sm_clock_max_hertz", "fleetscope_gpu_sm_clock_max_hertz", "gauge", "Maximum SM clock."),
    ("memory_clock_hertz", "fleetscope_gpu_memory_clock_hertz", "gauge", "Memory clock."),
    ("fan_speed_ratio", "fleetscope_gpu_fan_speed_ratio", "gauge", "Fan speed as a share of its maximum (0-1)."),
    ("pstate", "fleetscope_gpu_pstate", "gauge", "Performance state (0 is the fastest, 15 the slowest)."),
)


def make_backend(kind: str, *, gpus: int = 8, seed: int = 0, node: str = "sim"):
    """Return a GPU backend for `kind` (auto, nvml, simulated, none), or None for no GPUs."""
    if kind == "none":
        return None
    if kind == "simulated":
        from agent.gpusim import SimulatedGpus

        return SimulatedGpus(gpus, seed=seed, node=node)
    from agent.nvml import Nvml, NvmlUnavailable

    try:
        backend = Nvml()
    except ImportError:
        if kind == "nvml":
            raise
        log.warning("no GPUs: pynvml is not installed (pip install 'fleetscope[agent]'); running with host sources only")
        return None
    try:
        backend.init()
    except NvmlUnavailable as exc:
        if kind == "nvml":
            # Asked for NVML explicitly: keep trying at every sample, with gpu source_up 0 meanwhile.
            log.error("%s; the gpu source will retry at every sample", exc)
            return backend
        log.warning("no GPUs: %s; running with host sources only", exc)
        return None
    return backend


@register("gpu")
class GpuSource(Source):
    name = "gpu"
    families = (
        Family("fleetscope_gpu_info", "gauge", "GPU identity; the value is always 1.", ("gpu", "uuid", "name", "serial", "pci_bus_id", "driver")),
        Family("fleetscope_gpu_up", "gauge", "1 when the GPU answers; 0 when it has fallen off the bus.", G),
        Family("fleetscope_gpus_present", "gauge", "GPUs the driver reports on this node."),
        Family("fleetscope_gpus_expected", "gauge", "GPUs this node should have, from the agent's configuration."),
    ) + tuple(Family(metric, kind, help_, G) for _, metric, kind, help_ in _FIELDS)

    def __init__(self, *, backend=None, expected_gpus: int | None = None, **_: object) -> None:
        self.backend = backend
        self.expected = expected_gpus
        self.latest: tuple[GpuState, ...] = ()

    def collect(self):
        if self.backend is None:
            self.latest = ()
            raise NoData("no GPU backend")
        states = self.backend.read()
        self.latest = tuple(states)
        return list(self.readings(states))

    def readings(self, states: list[GpuState]):
        driver = getattr(self.backend, "driver_version", None) or ""
        yield reading("fleetscope_gpus_present", sum(1 for s in states if s.up))
        if self.expected is not None:
            yield reading("fleetscope_gpus_expected", self.expected)
        for s in states:
            ids = {"gpu": s.index, "uuid": s.uuid}
            yield reading("fleetscope_gpu_up", 1 if s.up else 0, **ids)
            if not s.up:
                continue
            yield reading(
                "fleetscope_gpu_info", 1, **ids, name=s.name or "", serial=s.serial or "", pci_bus_id=s.pci_bus_id or "", driver=driver
            )
            for field, metric, _, _ in _FIELDS:
                value = getattr(s, field)
                if value is not None:
                    yield reading(metric, value, **ids)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()
