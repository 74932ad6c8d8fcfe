"""A fake pynvml module at its function boundary: real pynvml errors and constants, fake devices.

Each fake device is a dict of what NVML would answer; a key set to NotSupported makes that
call raise NVMLError_NotSupported, and `lost=True` makes every call raise NVMLError_GpuIsLost.
"""

from __future__ import annotations

from types import SimpleNamespace

import pynvml as real

NotSupported = object()


def device(index: int, **overrides):
    d = {
        "uuid": f"GPU-fake-{index}",
        "name": b"NVIDIA H100 80GB HBM3",  # old bindings return bytes; the agent must decode
        "serial": "1650923001234",
        "pci": SimpleNamespace(busId=f"00000000:{0x18 + index:02X}:00.0"),
        "util": SimpleNamespace(gpu=87, memory=41),
        "mem": SimpleNamespace(used=60 * 2**30, free=20 * 2**30, total=80 * 2**30),
        "temp": 71,
        "power_mw": 652_500,
        "limit_mw": 700_000,
        "energy_mj": 123_456_789,
        "clock_sm_mhz": 1980,
        "clock_mem_mhz": 2619,
        "max_sm_mhz": 1980,
        "fan": NotSupported,  # SXM modules have no fan
        "pstate": 0,
        "procs": [SimpleNamespace(pid=4242, usedGpuMemory=2**30)],
        "lost": False,
    }
    d.update(overrides)
    return d


class FakeNvml:
    """Looks like the pynvml module to agent.nvml.Nvml."""

    def __init__(self, devices, init_error: Exception | None = None):
        self.devices = devices
        self.init_error = init_error
        self.calls: list[str] = []
        self.initialized = False
        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, getattr(real, name))

    def _answer(self, handle, key):
        d = self.devices[handle]
        if d["lost"]:
            raise real.NVMLError_GpuIsLost()
        value = d[key]
        if value is NotSupported:
            raise real.NVMLError_NotSupported()
        return value

    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self):
        self.initialized = False

    def nvmlSystemGetDriverVersion(self):
        return "570.124.06"

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, h):
        return self._answer(h, "uuid")

    def nvmlDeviceGetName(self, h):
        return self._answer(h, "name")

    def nvmlDeviceGetSerial(self, h):
        return self._answer(h, "serial")

    def nvmlDeviceGetPciInfo(self, h):
        return self._answer(h, "pci")

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._answer(h, "util")

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._answer(h, "mem")

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == real.NVML_TEMPERATURE_GPU
        return self._answer(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._answer(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._answer(h, "limit_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self._answer(h, "energy_mj")

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._answer(h, {real.NVML_CLOCK_SM: "clock_sm_mhz", real.NVML_CLOCK_MEM: "clock_mem_mhz"}[clock])

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        assert clock == real.NVML_CLOCK_SM
        return self._answer(h, "max_sm_mhz")

    def nvmlDeviceGetFanSpeed(self, h):
        return self._answer(h, "fan")

    def nvmlDeviceGetPerformanceState(self, h):
        return self._answer(h, "pstate")

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self._answer(h, "procs")
