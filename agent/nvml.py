"""NVML backend: the only module that imports pynvml; every unsupported field becomes None.

Every call goes through `Nvml._query`, which maps NVML's "not supported"-type errors to None and
lets a lost GPU surface, as nvitop's `nvmlQuery` does. The pynvml module can be passed in, so tests
drive this code through a fake at the pynvml function boundary.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any, Callable

from agent.gpustate import GpuState

log = logging.getLogger("fleetscope.agent.nvml")

MIB = 1024 * 1024


class NvmlUnavailable(Exception):
    """NVML could not be initialised (no driver, no library, no GPU)."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """Reads every GPU on the node through NVML; one instance per agent."""

    def __init__(self, lib: ModuleType | None = None) -> None:
        if lib is None:
            import pynvml as lib  # noqa: PLC0415 - only here, so the agent starts without it
        self.lib = lib
        self._lock = threading.Lock()
        self._initialized = False
        self.driver_version: str | None = None
        # uuid of each index as last seen, so a GPU that falls off the bus keeps its identity
        self._uuids: dict[int, str] = {}
        self._not_supported = tuple(
            getattr(lib, name)
            for name in ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_NotFound", "NVMLError_FunctionNotFound")
            if hasattr(lib, name)
        )

    def init(self) -> None:
        with self._lock:
            if self._initialized:
                return
            try:
                self.lib.nvmlInit()
            except self.lib.NVMLError as exc:
                raise NvmlUnavailable(f"NVML did not initialise: {exc}") from exc
            self._initialized = True
            self.driver_version = self._query(self.lib.nvmlSystemGetDriverVersion)
            if self.driver_version is not None:
                self.driver_version = _text(self.driver_version)

    def shutdown(self) -> None:
        with self._lock:
            if self._initialized:
                try:
                    self.lib.nvmlShutdown()
                except self.lib.NVMLError:
                    pass
                self._initialized = False

    def _query(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except self._not_supported:
            return None

    def read(self) -> list[GpuState]:
        """One state per GPU index; a GPU that is lost is reported with up=False."""
        self.init()
        lib = self.lib
        states = []
        for index in range(lib.nvmlDeviceGetCount()):
            try:
                states.append(self._read_device(index))
            except lib.NVMLError_GpuIsLost:
                log.error("GPU %d has fallen off the bus (NVML: GPU is lost)", index)
                states.append(GpuState(index=index, uuid=self._uuids.get(index, f"index-{index}"), up=False))
        return states

    def _read_device(self, index: int) -> GpuState:
        lib, q = self.lib, self._query
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(lib.nvmlDeviceGetUUID(handle))
        self._uuids[index] = uuid
        fields: dict[str, Any] = {"index": index, "uuid": uuid}

        name = q(lib.nvmlDeviceGetName, handle)
        fields["name"] = _text(name) if name is not None else None
        serial = q(lib.nvmlDeviceGetSerial, handle)
        fields["serial"] = _text(serial) if serial is not None else None
        pci = q(lib.nvmlDeviceGetPciInfo, handle)
        if pci is not None:
            fields["pci_bus_id"] = _text(pci.busId)

        util = q(lib.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            fields["utilization_ratio"] = util.gpu / 100.0
            fields["memory_utilization_ratio"] = util.memory / 100.0
        mem = q(lib.nvmlDeviceGetMemoryInfo, handle)
        if mem is not None:
            fields.update(memory_used_bytes=int(mem.used), memory_free_bytes=int(mem.free), memory_total_bytes=int(mem.total))
        temp = q(lib.nvmlDeviceGetTemperature, handle, lib.NVML_TEMPERATURE_GPU)
        if temp is not None:
            fields["temperature_celsius"] = float(temp)
        power = q(lib.nvmlDeviceGetPowerUsage, handle)  # milliwatts
        if power is not None:
            fields["power_watts"] = power / 1000.0
        limit = q(lib.nvmlDeviceGetEnforcedPowerLimit, handle)
        if limit is not None:
            fields["power_limit_watts"] = limit / 1000.0
        energy = q(lib.nvmlDeviceGetTotalEnergyConsumption, handle)  # millijoules since driver load
        if energy is not None:
            fields["energy_joules"] = energy / 1000.0
        sm = q(lib.nvmlDeviceGetClockInfo, handle, lib.NVML_CLOCK_SM)  # MHz
        if sm is not None:
            fields["sm_clock_hertz"] = sm * 1e6
        sm_max = q(lib.nvmlDeviceGetMaxClockInfo, handle, lib.NVML_CLOCK_SM)
        if sm_max is not None:
            fields["sm_clock_max_hertz"] = sm_max * 1e6
        memclk = q(lib.nvmlDeviceGetClockInfo, handle, lib.NVML_CLOCK_MEM)
        if memclk is not None:
            fields["memory_clock_hertz"] = memclk * 1e6
        fan = q(lib.nvmlDeviceGetFanSpeed, handle)  # percent; GPUs without fans say NotSupported
        if fan is not None:
            fields["fan_speed_ratio"] = fan / 100.0
        pstate = q(lib.nvmlDeviceGetPerformanceState, handle)
        if pstate is not None:
            fields["pstate"] = int(pstate)
        procs = q(lib.nvmlDeviceGetComputeRunningProcesses, handle)
        if procs:
            fields["pids"] = tuple(int(p.pid) for p in procs)
        return GpuState(**fields)
