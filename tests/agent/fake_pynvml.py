"""A fake pynvml module at its function boundary: real pynvml errors and constants, fake devices.

Each fake device is a dict of what NVML would answer; a key set to NotSupported makes that
call raise NVMLError_NotSupported, and `lost=True` makes every call raise NVMLError_GpuIsLost.
`xid(index, code)` queues an XID event the way the driver does.
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
        "vbios": "96.00.74.00.0D",
        "pci": SimpleNamespace(busId=f"00000000:{0x18 + index:02X}:00.0"),
        "util": SimpleNamespace(gpu=87, memory=41),
        "mem": SimpleNamespace(used=60 * 2**30, free=19 * 2**30, total=80 * 2**30, reserved=2**30),
        "temp": 71,
        "mem_temp": 78,
        "thresholds": {real.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 87, real.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 92},
        "power_mw": 652_500,
        "limit_mw": 700_000,
        "pm_limit_mw": 700_000,
        "energy_mj": 123_456_789,
        "clocks": {real.NVML_CLOCK_SM: 1980, real.NVML_CLOCK_MEM: 2619, real.NVML_CLOCK_GRAPHICS: 1980},
        "max_clocks": {real.NVML_CLOCK_SM: 1980, real.NVML_CLOCK_MEM: 2619},
        "fan": NotSupported,  # SXM modules have no fan
        "pstate": 0,
        "clock_events": 0,
        "ecc": {(real.NVML_MEMORY_ERROR_TYPE_CORRECTED, real.NVML_VOLATILE_ECC): 3,
                (real.NVML_MEMORY_ERROR_TYPE_CORRECTED, real.NVML_AGGREGATE_ECC): 10,
                (real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, real.NVML_VOLATILE_ECC): 0,
                (real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, real.NVML_AGGREGATE_ECC): 1},
        "retired_pages": NotSupported,  # Hopper remaps rows instead
        "retired_pending": NotSupported,
        "remapped_rows": (2, 1, 0, 0),
        "pcie_tx_kb": 1_000_000,
        "pcie_rx_kb": 2_000_000,
        "pcie_replay": 5,
        "pcie_gen": (5, 5),
        "pcie_width": (16, 16),
        "nvlinks": [True] * 18,
        "nvlink_errors": {},  # (link, counter) -> value; default 0
        "nvlink_tx_kib": {link: 1000 * (link + 1) for link in range(18)},
        "nvlink_rx_kib": {link: 2000 * (link + 1) for link in range(18)},
        "gpm": {real.NVML_GPM_METRIC_SM_UTIL: 81.0, real.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 55.5,
                real.NVML_GPM_METRIC_DRAM_BW_UTIL: 40.0},  # NotSupported before Hopper
        "procs": [SimpleNamespace(pid=4242, usedGpuMemory=2**30)],
        "proc_util": [SimpleNamespace(pid=4242, smUtil=73, memUtil=20, timeStamp=1_000_000)],
        "mig_mode": (0, 0),
        "mig": [],  # MIG instances: dicts with uuid, gi, ci, name, mem
        "events": [],  # XID codes queued for this GPU's event set
        "events_supported": True,
        "lost": False,
    }
    d.update(overrides)
    return d


class FakeNvml:
    """Looks like the pynvml module to agent.gpu.nvml.Nvml."""

    def __init__(self, devices, init_error: Exception | None = None):
        self.devices = devices
        self.init_error = init_error
        self.calls: list[str] = []
        self.initialized = False
        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_", "nvmlEventType", "nvmlMemory_v2", "nvmlClocksEventReason", "c_nvmlGpm")):
                setattr(self, name, getattr(real, name))

    def xid(self, index: int, code: int) -> None:
        self.devices[index]["events"].append(code)

    def _answer(self, handle, key):
        if isinstance(handle, tuple):  # a MIG instance
            return self.devices[handle[0]]["mig"][handle[1]][key]
        d = self.devices[handle]
        if d["lost"]:
            raise real.NVMLError_GpuIsLost()
        value = d[key]
        if value is NotSupported:
            raise real.NVMLError_NotSupported()
        return value

    # system
    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self):
        self.initialized = False

    def nvmlSystemGetDriverVersion(self):
        return "570.124.06"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12080

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    # events: one set per device, so the set's handle is the device index
    def nvmlEventSetCreate(self):
        return SimpleNamespace(device=None)

    def nvmlDeviceRegisterEvents(self, h, types, event_set):
        if not self.devices[h]["events_supported"]:
            raise real.NVMLError_NotSupported()
        assert types & real.nvmlEventTypeXidCriticalError
        event_set.device = h

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        assert timeout_ms == 0, "the sampler must never block on events"
        queue = self.devices[event_set.device]["events"]
        if not queue:
            raise real.NVMLError_Timeout()
        return SimpleNamespace(eventType=real.nvmlEventTypeXidCriticalError, eventData=queue.pop(0), device=event_set.device)

    def nvmlEventSetFree(self, event_set):
        pass

    # identity
    def nvmlDeviceGetUUID(self, h):
        return self._answer(h, "uuid")

    def nvmlDeviceGetName(self, h):
        return self._answer(h, "name")

    def nvmlDeviceGetSerial(self, h):
        return self._answer(h, "serial")

    def nvmlDeviceGetVbiosVersion(self, h):
        return self._answer(h, "vbios")

    def nvmlDeviceGetPciInfo(self, h):
        return self._answer(h, "pci")

    # telemetry
    def nvmlDeviceGetUtilizationRates(self, h):
        return self._answer(h, "util")

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        return self._answer(h, "mem")

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == real.NVML_TEMPERATURE_GPU
        return self._answer(h, "temp")

    def nvmlDeviceGetTemperatureThreshold(self, h, which):
        return self._answer(h, "thresholds")[which]

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        out = []
        for fid in field_ids:
            fid, scope = fid if isinstance(fid, tuple) else (fid, None)
            if fid == real.NVML_FI_DEV_MEMORY_TEMP:
                value = self.devices[h]["mem_temp"]
            elif fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX:
                value = self.devices[h]["nvlink_tx_kib"].get(scope, NotSupported)
            elif fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX:
                value = self.devices[h]["nvlink_rx_kib"].get(scope, NotSupported)
            else:
                raise AssertionError(f"unexpected field {fid}")
            ok = value is not NotSupported
            out.append(SimpleNamespace(
                nvmlReturn=real.NVML_SUCCESS if ok else real.NVML_ERROR_NOT_SUPPORTED,
                valueType=real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, value=SimpleNamespace(ullVal=value if ok else 0)))
        return out

    # GPM: each sample is a counter snapshot; metrics are what the device dict says, once two samples exist
    def nvmlGpmQueryDeviceSupport(self, h):
        return SimpleNamespace(isSupportedDevice=1 if self._answer(h, "gpm") is not NotSupported else 0)

    def nvmlGpmSampleAlloc(self):
        self.calls.append("gpm_alloc")
        return real.c_nvmlGpmSample_t()

    def nvmlGpmSampleGet(self, h, sample):
        self.calls.append("gpm_get")
        return sample

    def nvmlGpmSampleFree(self, sample):
        self.calls.append("gpm_free")

    def nvmlGpmMetricsGet(self, request):
        gpm = self.devices[0]["gpm"]
        for i in range(request.numMetrics):
            metric = request.metrics[i]
            if metric.metricId in gpm:
                metric.value, metric.nvmlReturn = gpm[metric.metricId], real.NVML_SUCCESS
            else:
                metric.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
        return request

    def nvmlDeviceGetPowerUsage(self, h):
        return self._answer(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._answer(h, "limit_mw")

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return self._answer(h, "pm_limit_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self._answer(h, "energy_mj")

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._answer(h, "clocks")[clock]

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        return self._answer(h, "max_clocks")[clock]

    def nvmlDeviceGetFanSpeed(self, h):
        return self._answer(h, "fan")

    def nvmlDeviceGetPerformanceState(self, h):
        return self._answer(h, "pstate")

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._answer(h, "clock_events")

    # memory health
    def nvmlDeviceGetTotalEccErrors(self, h, etype, ctype):
        return self._answer(h, "ecc")[(etype, ctype)]

    def nvmlDeviceGetRetiredPages(self, h, cause):
        return self._answer(h, "retired_pages")[cause]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._answer(h, "retired_pending")

    def nvmlDeviceGetRemappedRows(self, h):
        return self._answer(h, "remapped_rows")

    # PCIe and NVLink
    def nvmlDeviceGetPcieThroughput(self, h, counter):
        return self._answer(h, "pcie_tx_kb" if counter == real.NVML_PCIE_UTIL_TX_BYTES else "pcie_rx_kb")

    def nvmlDeviceGetPcieReplayCounter(self, h):
        return self._answer(h, "pcie_replay")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return self._answer(h, "pcie_gen")[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self._answer(h, "pcie_gen")[1]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return self._answer(h, "pcie_width")[0]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self._answer(h, "pcie_width")[1]

    def nvmlDeviceGetNvLinkState(self, h, link):
        links = self._answer(h, "nvlinks")
        if link >= len(links):
            raise real.NVMLError_InvalidArgument()
        return 1 if links[link] else 0

    def nvmlDeviceGetNvLinkErrorCounter(self, h, link, counter):
        return self._answer(h, "nvlink_errors").get((link, counter), 0)

    # MIG: a MIG handle is (gpu index, slot)
    def nvmlDeviceGetMigMode(self, h):
        return self._answer(h, "mig_mode")

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, i):
        if i >= len(self.devices[h]["mig"]) or self.devices[h]["mig"][i] is None:
            raise real.NVMLError_NotFound()
        return (h, i)

    def nvmlDeviceGetGpuInstanceId(self, mig):
        return self.devices[mig[0]]["mig"][mig[1]]["gi"]

    def nvmlDeviceGetComputeInstanceId(self, mig):
        return self.devices[mig[0]]["mig"][mig[1]]["ci"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self._answer(h, "procs")

    def nvmlDeviceGetProcessUtilization(self, h, since):
        self.calls.append(f"process_utilization_since:{since}")
        samples = [s for s in self._answer(h, "proc_util") if s.timeStamp > since]
        if not samples:
            raise real.NVMLError_NotFound()
        return samples
