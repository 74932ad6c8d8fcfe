"""NVML backend: the only module that imports pynvml; every unsupported field becomes None.

Every call goes through `Nvml._query`, which maps NVML's "not supported"-type errors to None and
lets a lost GPU surface, as nvitop's `nvmlQuery` does. The pynvml module can be passed in, so tests
drive this code through a fake at the pynvml function boundary.

XID errors arrive as NVML events: each GPU gets its own event set, drained without waiting at
every sample, and the agent keeps a count per GPU and XID code (a counter, unlike
dcgm-exporter's last-value gauge, so a repeat of the same XID is visible).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from types import ModuleType
from typing import Any, Callable

from agent.gpu.state import (
    GpuProcess,
    GpuState,
    MigInstance,
    NvLinkState,
    PcieState,
    RemappedRows,
)

log = logging.getLogger("fleetscope.agent.gpu.nvml")

# GPM metric (percent) -> GpuState field (ratio)
GPM_METRICS = (
    ("NVML_GPM_METRIC_SM_UTIL", "sm_activity_ratio"),
    ("NVML_GPM_METRIC_SM_OCCUPANCY", "sm_occupancy_ratio"),
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "tensor_activity_ratio"),
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", "dram_activity_ratio"),
    ("NVML_GPM_METRIC_FP16_UTIL", "fp16_activity_ratio"),
    ("NVML_GPM_METRIC_FP32_UTIL", "fp32_activity_ratio"),
    ("NVML_GPM_METRIC_FP64_UTIL", "fp64_activity_ratio"),
)
MAX_EVENTS_PER_SAMPLE = 1000  # a storm must not stall the sampler; the rest waits for the next sample


class NvmlUnavailable(Exception):
    """NVML could not be initialised (no driver, no library, no GPU)."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
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
        self.cuda_driver_version: str | None = None
        # uuid of each index as last seen, so a GPU that falls off the bus keeps its identity
        self._uuids: dict[int, str] = {}
        self._event_sets: dict[int, Any] = {}  # index -> event set, for GPUs whose XIDs we can watch
        self._xids: dict[int, Counter[int]] = {}
        self._last_xid: dict[int, int] = {}
        self._util_since: dict[int, int] = {}
        self._gpm_supported: dict[int, bool] = {}
        self._gpm_samples: dict[int, Any] = {}  # per device: timestamp of the last process-utilisation sample seen
        self._not_supported = tuple(
            getattr(lib, name)
            for name in ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_NotFound",
                         "NVMLError_FunctionNotFound", "NVMLError_InvalidArgument")
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
            self.driver_version = _text(self._query(self.lib.nvmlSystemGetDriverVersion))
            cuda = self._query(self.lib.nvmlSystemGetCudaDriverVersion)
            if cuda:  # 12040 means 12.4
                self.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
            self._watch_xids()

    def _watch_xids(self) -> None:
        lib = self.lib
        for index in range(lib.nvmlDeviceGetCount()):
            try:
                handle = lib.nvmlDeviceGetHandleByIndex(index)
                event_set = lib.nvmlEventSetCreate()
                lib.nvmlDeviceRegisterEvents(handle, lib.nvmlEventTypeXidCriticalError, event_set)
            except lib.NVMLError as exc:
                log.warning("GPU %d: XID errors cannot be watched (%s); its XID counters are left out", index, exc)
                continue
            self._event_sets[index] = event_set
            self._xids[index] = Counter()

    def _drain_xids(self) -> None:
        lib = self.lib
        for index, event_set in self._event_sets.items():
            for _ in range(MAX_EVENTS_PER_SAMPLE):
                try:
                    data = lib.nvmlEventSetWait_v2(event_set, 0)
                except lib.NVMLError_Timeout:
                    break  # nothing pending
                except lib.NVMLError as exc:
                    log.debug("GPU %d: reading XID events failed: %s", index, exc)
                    break
                if data.eventType & lib.nvmlEventTypeXidCriticalError:
                    xid = int(data.eventData)
                    self._xids[index][xid] += 1
                    self._last_xid[index] = xid
                    log.error("GPU %d: XID %d", index, xid)

    def shutdown(self) -> None:
        with self._lock:
            if self._initialized:
                for event_set in self._event_sets.values():
                    try:
                        self.lib.nvmlEventSetFree(event_set)
                    except self.lib.NVMLError:
                        pass
                self._event_sets.clear()
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
        self._drain_xids()
        states = []
        for index in range(lib.nvmlDeviceGetCount()):
            xids = dict(self._xids[index]) if index in self._xids else None
            try:
                states.append(self._read_device(index, xids, self._last_xid.get(index)))
            except lib.NVMLError_GpuIsLost:
                log.error("GPU %d has fallen off the bus (NVML: GPU is lost)", index)
                states.append(GpuState(index=index, uuid=self._uuids.get(index, f"index-{index}"), up=False, xid_counts=xids,
                                       last_xid=self._last_xid.get(index)))
        return states

    def _read_device(self, index: int, xids: dict[int, int] | None, last_xid: int | None) -> GpuState:
        lib, q = self.lib, self._query
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(lib.nvmlDeviceGetUUID(handle)) or f"index-{index}"
        self._uuids[index] = uuid
        f: dict[str, Any] = {"index": index, "uuid": uuid, "xid_counts": xids, "last_xid": last_xid}

        f["name"] = _text(q(lib.nvmlDeviceGetName, handle))
        f["serial"] = _text(q(lib.nvmlDeviceGetSerial, handle))
        f["vbios"] = _text(q(lib.nvmlDeviceGetVbiosVersion, handle))
        pci = q(lib.nvmlDeviceGetPciInfo, handle)
        if pci is not None:
            f["pci_bus_id"] = _text(pci.busId)

        util = q(lib.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            f["utilization_ratio"] = util.gpu / 100.0
            f["memory_utilization_ratio"] = util.memory / 100.0
        mem = q(lib.nvmlDeviceGetMemoryInfo, handle, lib.nvmlMemory_v2) or q(lib.nvmlDeviceGetMemoryInfo, handle)
        if mem is not None:
            f.update(memory_used_bytes=int(mem.used), memory_free_bytes=int(mem.free), memory_total_bytes=int(mem.total))
            if getattr(mem, "reserved", None) is not None:
                f["memory_reserved_bytes"] = int(mem.reserved)

        f["temperature_celsius"] = _float(q(lib.nvmlDeviceGetTemperature, handle, lib.NVML_TEMPERATURE_GPU))
        f["memory_temperature_celsius"] = self._field(handle, lib.NVML_FI_DEV_MEMORY_TEMP)
        f["temperature_slowdown_celsius"] = _float(
            q(lib.nvmlDeviceGetTemperatureThreshold, handle, lib.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        f["temperature_shutdown_celsius"] = _float(
            q(lib.nvmlDeviceGetTemperatureThreshold, handle, lib.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN))

        f["power_watts"] = _scaled(q(lib.nvmlDeviceGetPowerUsage, handle), 1e-3)  # milliwatts
        f["power_limit_watts"] = _scaled(q(lib.nvmlDeviceGetEnforcedPowerLimit, handle), 1e-3)
        f["power_management_limit_watts"] = _scaled(q(lib.nvmlDeviceGetPowerManagementLimit, handle), 1e-3)
        f["energy_joules"] = _scaled(q(lib.nvmlDeviceGetTotalEnergyConsumption, handle), 1e-3)  # mJ since driver load

        f["sm_clock_hertz"] = _scaled(q(lib.nvmlDeviceGetClockInfo, handle, lib.NVML_CLOCK_SM), 1e6)  # MHz
        f["sm_clock_max_hertz"] = _scaled(q(lib.nvmlDeviceGetMaxClockInfo, handle, lib.NVML_CLOCK_SM), 1e6)
        f["memory_clock_hertz"] = _scaled(q(lib.nvmlDeviceGetClockInfo, handle, lib.NVML_CLOCK_MEM), 1e6)
        f["memory_clock_max_hertz"] = _scaled(q(lib.nvmlDeviceGetMaxClockInfo, handle, lib.NVML_CLOCK_MEM), 1e6)
        f["graphics_clock_hertz"] = _scaled(q(lib.nvmlDeviceGetClockInfo, handle, lib.NVML_CLOCK_GRAPHICS), 1e6)
        f["fan_speed_ratio"] = _scaled(q(lib.nvmlDeviceGetFanSpeed, handle), 0.01)  # GPUs without fans: NotSupported
        pstate = q(lib.nvmlDeviceGetPerformanceState, handle)
        f["pstate"] = int(pstate) if pstate is not None else None
        reasons = q(lib.nvmlDeviceGetCurrentClocksEventReasons, handle)
        f["clock_event_mask"] = int(reasons) if reasons is not None else None

        f.update(self._memory_health(handle))
        f.update(self._gpm(handle, index))
        f["pcie"] = self._pcie(handle)
        f["nvlinks"] = self._nvlinks(handle)
        f["processes"] = self._processes(handle, index)
        f["mig_enabled"], f["mig_instances"] = self._mig(handle)
        return GpuState(**f)

    def _mig(self, handle: Any) -> tuple[bool | None, tuple[MigInstance, ...]]:
        lib, q = self.lib, self._query
        mode = q(lib.nvmlDeviceGetMigMode, handle)  # (current, pending); NotSupported before Ampere
        if mode is None:
            return None, ()
        if not mode[0]:
            return False, ()
        instances = []
        for i in range(q(lib.nvmlDeviceGetMaxMigDeviceCount, handle) or 0):
            mig = q(lib.nvmlDeviceGetMigDeviceHandleByIndex, handle, i)
            if mig is None:  # a slot with no instance in it
                continue
            mem = q(lib.nvmlDeviceGetMemoryInfo, mig)
            name = _text(q(lib.nvmlDeviceGetName, mig)) or ""
            instances.append(MigInstance(
                uuid=_text(lib.nvmlDeviceGetUUID(mig)) or f"mig-{i}",
                gpu_instance=q(lib.nvmlDeviceGetGpuInstanceId, mig),
                compute_instance=q(lib.nvmlDeviceGetComputeInstanceId, mig),
                profile=name.rpartition(" MIG ")[2] if " MIG " in name else name,  # "... MIG 1g.10gb" -> "1g.10gb"
                memory_used_bytes=int(mem.used) if mem is not None else None,
                memory_total_bytes=int(mem.total) if mem is not None else None,
            ))
        return True, tuple(instances)

    def _processes(self, handle: Any, index: int) -> tuple[GpuProcess, ...]:
        lib, q = self.lib, self._query
        procs = q(lib.nvmlDeviceGetComputeRunningProcesses, handle) or []
        if not procs:
            return ()
        # Utilisation samples since the previous read; none (NotFound) when the processes were idle.
        samples = q(lib.nvmlDeviceGetProcessUtilization, handle, self._util_since.get(index, 0)) or []
        util = {int(s.pid): s for s in samples}
        if samples:
            self._util_since[index] = max(int(s.timeStamp) for s in samples)
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)  # None when the driver hides it (no permission)
            s = util.get(int(p.pid))
            out.append(GpuProcess(
                pid=int(p.pid), used_memory_bytes=int(used) if used is not None else None,
                sm_utilization_ratio=s.smUtil / 100.0 if s is not None else None,
                memory_utilization_ratio=s.memUtil / 100.0 if s is not None else None,
            ))
        return tuple(out)

    def _field(self, handle: Any, field_id: int) -> float | None:
        """One NVML field value, or None when the GPU does not report it."""
        return self._fields(handle, [field_id])[0]

    def _fields(self, handle: Any, ids: list) -> list[float | None]:
        """Several field values in one call (ids are field ids or (field id, scope) pairs); None where unsupported."""
        lib = self.lib
        values = self._query(lib.nvmlDeviceGetFieldValues, handle, ids)
        if not values:
            return [None] * len(ids)
        kinds = {lib.NVML_VALUE_TYPE_DOUBLE: "dVal", lib.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
                 lib.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal", lib.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
                 lib.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal"}
        out: list[float | None] = []
        for v in values:
            attr = kinds.get(v.valueType)
            out.append(float(getattr(v.value, attr)) if v.nvmlReturn == lib.NVML_SUCCESS and attr else None)
        return out

    def _gpm(self, handle: Any, index: int) -> dict[str, float]:
        """SM, tensor and DRAM activity from GPU performance monitoring, between this sample and the last."""
        lib, q = self.lib, self._query
        if index not in self._gpm_supported:
            support = q(lib.nvmlGpmQueryDeviceSupport, handle)
            self._gpm_supported[index] = bool(support is not None and support.isSupportedDevice)
        if not self._gpm_supported[index]:
            return {}
        try:
            sample = lib.nvmlGpmSampleAlloc()
            lib.nvmlGpmSampleGet(handle, sample)
        except lib.NVMLError as exc:
            log.debug("GPU %d: GPM sample failed: %s", index, exc)
            return {}
        previous, self._gpm_samples[index] = self._gpm_samples.get(index), sample
        if previous is None:
            return {}  # activity needs two samples: from the next read on
        request = lib.c_nvmlGpmMetricsGet_t()
        request.version = lib.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        request.sample1, request.sample2 = previous, sample
        for i, (metric_id, _) in enumerate(GPM_METRICS):
            request.metrics[i].metricId = getattr(lib, metric_id)
        try:
            lib.nvmlGpmMetricsGet(request)
        except lib.NVMLError as exc:
            log.debug("GPU %d: GPM metrics failed: %s", index, exc)
            return {}
        finally:
            lib.nvmlGpmSampleFree(previous)
        return {field: request.metrics[i].value / 100.0 for i, (_, field) in enumerate(GPM_METRICS)
                if request.metrics[i].nvmlReturn == lib.NVML_SUCCESS}

    def _memory_health(self, handle: Any) -> dict[str, Any]:
        lib, q = self.lib, self._query
        out: dict[str, Any] = {"ecc_errors": {}, "retired_pages": {}}
        for etype, ename in ((lib.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"), (lib.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected")):
            for ctype, cname in ((lib.NVML_VOLATILE_ECC, "volatile"), (lib.NVML_AGGREGATE_ECC, "aggregate")):
                count = q(lib.nvmlDeviceGetTotalEccErrors, handle, etype, ctype)
                if count is not None:
                    out["ecc_errors"][(ename, cname)] = int(count)
        for cause, cname in ((lib.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, "multiple_single_bit"),
                             (lib.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR, "double_bit")):
            pages = q(lib.nvmlDeviceGetRetiredPages, handle, cause)
            if pages is not None:
                out["retired_pages"][cname] = len(pages)
        pending = q(lib.nvmlDeviceGetRetiredPagesPendingStatus, handle)
        out["retired_pages_pending"] = bool(pending) if pending is not None else None
        rows = q(lib.nvmlDeviceGetRemappedRows, handle)  # Ampere and newer; older GPUs retire pages instead
        if rows is not None:
            corr, unc, pending_rows, failure = rows
            out["remapped_rows"] = RemappedRows(int(corr), int(unc), bool(pending_rows), bool(failure))
        return out

    def _pcie(self, handle: Any) -> PcieState | None:
        lib, q = self.lib, self._query
        pcie = PcieState(
            tx_bytes_per_second=_scaled(q(lib.nvmlDeviceGetPcieThroughput, handle, lib.NVML_PCIE_UTIL_TX_BYTES), 1024),  # KB/s
            rx_bytes_per_second=_scaled(q(lib.nvmlDeviceGetPcieThroughput, handle, lib.NVML_PCIE_UTIL_RX_BYTES), 1024),
            replays=q(lib.nvmlDeviceGetPcieReplayCounter, handle),
            generation=q(lib.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            generation_max=q(lib.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            width=q(lib.nvmlDeviceGetCurrPcieLinkWidth, handle),
            width_max=q(lib.nvmlDeviceGetMaxPcieLinkWidth, handle),
        )
        return None if pcie == PcieState() else pcie

    def _nvlinks(self, handle: Any) -> tuple[NvLinkState, ...]:
        lib, q = self.lib, self._query
        links = []
        present = [(link, state) for link in range(lib.NVML_NVLINK_MAX_LINKS)
                   if (state := q(lib.nvmlDeviceGetNvLinkState, handle, link)) is not None]  # PCIe-only GPUs: none
        if not present:
            return ()
        # Throughput counters (KiB) for every link in one field-values call.
        ids = [(fid, link) for link, _ in present
               for fid in (lib.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, lib.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX)]
        kib = self._fields(handle, ids)
        for n, (link, state) in enumerate(present):
            tx, rx = kib[2 * n], kib[2 * n + 1]
            errors = {
                name: q(lib.nvmlDeviceGetNvLinkErrorCounter, handle, link, counter)
                for name, counter in (("crc_flit_errors", lib.NVML_NVLINK_ERROR_DL_CRC_FLIT),
                                      ("crc_data_errors", lib.NVML_NVLINK_ERROR_DL_CRC_DATA),
                                      ("replay_errors", lib.NVML_NVLINK_ERROR_DL_REPLAY),
                                      ("recovery_errors", lib.NVML_NVLINK_ERROR_DL_RECOVERY))
            }
            links.append(NvLinkState(link=link, up=bool(state), tx_bytes=tx * 1024 if tx is not None else None,
                                     rx_bytes=rx * 1024 if rx is not None else None, **errors))
        return tuple(links)


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _scaled(value: Any, factor: float) -> float | None:
    return value * factor if value is not None else None
