"""A strict fake of the pynvml module at its function boundary: real pynvml errors and constants,
fake devices.

Each fake device is a dict of what NVML would answer; a key set to NotSupported makes that call
raise NVMLError_NotSupported. A device's `error` (an NVMLError class, e.g. NVMLError_ResetRequired)
makes every call on it raise that error, the handle lookup included; `lost=True` is the same with
NVMLError_GpuIsLost. `xid(index, code)` queues an XID event the way the driver does.

Strict where the real library is strict: every call before nvmlInit (or after nvmlShutdown) raises
NVMLError_Uninitialized, a lost GPU's events raise as its other calls do, every function the fake
offers exists in the real binding with a compatible signature (tests/agent/test_fake_pynvml.py),
and `fail(function, error, gpu=, times=)` makes any call raise any error, including the library's
NVMLLibraryMismatchError, for one GPU or all of them. `counts` counts every call by name.

Older drivers, per GPU: `lacks` (function names) raise NVMLError_FunctionNotFound as pynvml does when the
driver's library has no such symbol (before any other check, a lost GPU's included); `fields_unsupported`
(field ids) answer NVML_ERROR_NOT_SUPPORTED in a field-value batch; `fabric_versions` are the struct versions
nvmlDeviceGetGpuFabricInfoV accepts (any other: NVMLError_ArgumentVersionMismatch). `gpm_allocs` and `gpm_frees`
count GPM sample buffers given out and given back.

MIG: a device's `mig` lists its instances (dicts with uuid, gi, ci, name, mem and optionally gpm; a value set to
NotSupported is refused), a slot set to None being empty; a MIG handle is (gpu index, slot), and once its slot is
emptied (the instance destroyed) every call on it raises NVMLError_NotFound, as a stale handle does, as does
nvmlGpmMigSampleGet for a GPU instance id no instance has. `MIG_MODE_UNSUPPORTED` is what a MIG-enabled GPU refuses.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections import Counter
from types import SimpleNamespace

import pynvml as real

NotSupported = object()
# c_nvmlFieldValue_t's bytes: fieldId, scopeId, timestamp, latencyUsec, valueType, nvmlReturn, value (8 bytes)
_FIELD_VALUE = struct.Struct("=IIqqiiQ")
_VALUE_PACK = {real.NVML_VALUE_TYPE_DOUBLE: struct.Struct("=d"), real.NVML_VALUE_TYPE_UNSIGNED_INT: struct.Struct("=I"),
               real.NVML_VALUE_TYPE_UNSIGNED_LONG: struct.Struct("=Q"), real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: struct.Struct("=Q"),
               real.NVML_VALUE_TYPE_SIGNED_LONG_LONG: struct.Struct("=q"), real.NVML_VALUE_TYPE_SIGNED_INT: struct.Struct("=i"),
               real.NVML_VALUE_TYPE_UNSIGNED_SHORT: struct.Struct("=H")}
# Calls that need no initialised library.
_BEFORE_INIT = {"nvmlInit", "nvmlInitWithFlags", "nvmlShutdown"}
# What a GPU in MIG mode answers NotSupported (nvml.h: "On MIG-enabled GPUs, querying device utilization rates is not
# currently supported", and the same of process utilization; nvidia-smi dmon: "the utilization of encoder, decoder,
# jpeg, ofa, gpu, and memory"): device(i, mig_mode=(1, 1), **MIG_MODE_UNSUPPORTED).
MIG_MODE_UNSUPPORTED = {"util": NotSupported, "encoder": NotSupported, "decoder": NotSupported, "proc_util": NotSupported}


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
        "retired_pages": NotSupported,  # Hopper remaps rows instead: {cause: [addresses]}
        "retired_pending": NotSupported,
        "remapped_rows": (2, 1, 0, 0),
        "pcie_tx_kb": 1_000_000,
        "pcie_rx_kb": 2_000_000,
        "pcie_replay": 5,
        "pcie_gen": (5, 5),
        "pcie_width": (16, 16),
        "nvlinks": [True] * 18,
        "nvlink_errors": {},  # (link, counter) -> value; default 0
        "nvlink_ecc_total": 0,
        "nvlink_tx_kib": {link: 1000 * (link + 1) for link in range(18)},
        "nvlink_rx_kib": {link: 2000 * (link + 1) for link in range(18)},
        "gpm": {real.NVML_GPM_METRIC_SM_UTIL: 81.0, real.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 55.5,
                real.NVML_GPM_METRIC_DRAM_BW_UTIL: 40.0, real.NVML_GPM_METRIC_GRAPHICS_UTIL: 90.0,
                real.NVML_GPM_METRIC_PCIE_TX_PER_SEC: 3000.0, real.NVML_GPM_METRIC_PCIE_RX_PER_SEC: 4000.0},  # MiB/s; NotSupported before Hopper
        "encoder": (0, 167_000),
        "decoder": (12, 167_000),
        # (state, status, clique id, health summary, health mask); NotSupported on GPUs without NVSwitch
        "fabric": (real.NVML_GPU_FABRIC_STATE_COMPLETED, real.NVML_SUCCESS, 7, real.NVML_GPU_FABRIC_HEALTH_SUMMARY_HEALTHY, 0),
        "procs": [SimpleNamespace(pid=4242, usedGpuMemory=2**30)],
        "proc_util": [SimpleNamespace(pid=4242, smUtil=73, memUtil=20, timeStamp=1_000_000)],
        "mig_mode": (0, 0),
        "mig": [],  # MIG instances: dicts with uuid, gi, ci, name, mem
        "events": [],  # XID codes queued for this GPU's event set
        "events_supported": True,
        "lost": False,
        "error": None,  # an NVMLError class every call on this GPU raises
        # what an older driver lacks (defaults: a 570 driver, which has all of it)
        "lacks": frozenset(),  # function names: NVMLError_FunctionNotFound (e.g. nvmlDeviceGetGpuFabricInfoV before 550)
        "fields_unsupported": frozenset(),  # field ids answered NVML_ERROR_NOT_SUPPORTED (e.g. NVML_FI_DEV_NVLINK_GET_STATE)
        "fabric_versions": (real.nvmlGpuFabricInfo_v2, real.nvmlGpuFabricInfo_v3),  # struct versions FabricInfoV takes
    }
    d.update(overrides)
    return d


class _MetricsGet:
    """Stands in for c_nvmlGpmMetricsGet_t with the same fields."""

    def __init__(self):
        self.version = self.numMetrics = 0
        self.sample1 = self.sample2 = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)]


class FakeNvml:
    """Looks like the pynvml module to agent.gpu.nvml.Nvml."""

    def __init__(self, devices, init_error: Exception | None = None):
        self.devices = devices
        self.init_error = init_error
        self.counts: Counter[str] = Counter()
        self.utilization_since: list[int] = []  # the timestamps process utilisation was asked from
        self.initialized = False
        self.gpm_live: set[int] = set()  # ids of GPM samples allocated and not yet freed
        self.gpm_allocs = self.gpm_frees = 0  # GPM samples given out and given back, since the start
        self._faults: list[dict] = []
        for name in dir(real):
            if name.startswith(("NVMLError", "NVMLLibraryMismatchError", "NVML_", "nvmlEventType", "nvmlMemory_v2",
                                "nvmlClocksEventReason", "c_nvml", "nvmlGpuFabricInfo")):
                setattr(self, name, getattr(real, name))
        self.c_nvmlGpmMetricsGet_t = _MetricsGet  # samples here are Python objects, not ctypes pointers
        for name in dir(type(self)):
            if name.startswith("nvml"):
                setattr(self, name, self._guard(name, getattr(self, name)))
        # The C function behind pynvml's wrapper: counted, faulted and refused before init as the same call.
        self._c_field_values = self._guard("nvmlDeviceGetFieldValues", self._fill_field_values)

    # -- what tests drive ----------------------------------------------------------------------
    def xid(self, index: int, code: int) -> None:
        self.devices[index]["events"].append(code)

    def fail(self, function: str, error, *, gpu: int | None = None, times: int | None = None) -> None:
        """Make `function` ("*" for every device call) raise `error` (a class or an instance), on one GPU or all,
        `times` times or until `heal()`."""
        self._faults.append({"function": function, "error": error, "gpu": gpu, "times": times})

    def heal(self) -> None:
        self._faults.clear()


    # -- the guard every nvml* function passes through -----------------------------------------
    def _guard(self, name, method):
        @functools.wraps(method)
        def call(*args):
            self.counts[name] += 1
            if name not in _BEFORE_INIT and not self.initialized:
                raise real.NVMLError_Uninitialized()
            gpu = self._gpu_of(name, args)
            if gpu is not None and name in self.devices[gpu]["lacks"]:
                raise real.NVMLError_FunctionNotFound()  # pynvml's _nvmlGetFunctionPointer: before the device is asked
            for fault in self._faults:
                if fault["function"] in (name, "*") and (fault["gpu"] is None or fault["gpu"] == gpu) and fault["times"] != 0:
                    if fault["function"] == "*" and gpu is None:
                        continue  # system calls are not device calls
                    if fault["times"] is not None:
                        fault["times"] -= 1
                    error = fault["error"]
                    raise error() if isinstance(error, type) else error
            if gpu is not None and name not in ("nvmlEventSetCreate",):
                d = self.devices[gpu]
                if d["lost"]:
                    raise real.NVMLError_GpuIsLost()
                if d["error"] is not None:
                    raise d["error"]()
            return method(*args)

        return call

    def _gpu_of(self, name, args):
        if not args:
            return None
        first = args[0]
        if name == "nvmlDeviceGetHandleByIndex":
            return first if 0 <= first < len(self.devices) else None
        if name == "nvmlEventSetWait_v2":
            return first.device
        if isinstance(first, tuple):  # a MIG handle
            return first[0]
        if isinstance(first, int) and name.startswith(("nvmlDevice", "nvmlGpm")):
            return first
        return None

    def _mig_instance(self, handle):
        """The instance a MIG handle names; NotFound once its slot is empty (the instance was destroyed)."""
        instances = self.devices[handle[0]]["mig"]
        if handle[1] >= len(instances) or instances[handle[1]] is None:
            raise real.NVMLError_NotFound()
        return instances[handle[1]]

    def _answer(self, handle, key):
        if isinstance(handle, tuple):  # a MIG instance
            value = self._mig_instance(handle)[key]
            if value is NotSupported:
                raise real.NVMLError_NotSupported()
            return value
        value = self.devices[handle][key]
        if value is NotSupported:
            raise real.NVMLError_NotSupported()
        return value

    # system
    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self):
        if not self.initialized:
            raise real.NVMLError_Uninitialized()
        self.initialized = False

    def nvmlSystemGetDriverVersion(self):
        return "570.124.06"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12080

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.devices):
            raise real.NVMLError_InvalidArgument()
        return index

    # events: one set per device, so the set's handle is the device index
    def nvmlEventSetCreate(self):
        return SimpleNamespace(device=None, freed=False)

    def nvmlDeviceRegisterEvents(self, h, types, event_set):
        if not self.devices[h]["events_supported"]:
            raise real.NVMLError_NotSupported()
        assert types & real.nvmlEventTypeXidCriticalError
        event_set.device = h

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        assert timeout_ms == 0, "the sampler must never block on events"
        assert not event_set.freed, "waiting on a freed event set"
        queue = self.devices[event_set.device]["events"]
        if not queue:
            raise real.NVMLError_Timeout()
        return SimpleNamespace(eventType=real.nvmlEventTypeXidCriticalError, eventData=queue.pop(0), device=event_set.device)

    def nvmlEventSetFree(self, event_set):
        event_set.freed = True

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

    def nvmlDeviceGetEncoderUtilization(self, h):
        return list(self._answer(h, "encoder"))

    def nvmlDeviceGetDecoderUtilization(self, h):
        return list(self._answer(h, "decoder"))

    _LINK_ERRORS = {real.NVML_FI_DEV_NVLINK_ERROR_DL_CRC: real.NVML_NVLINK_ERROR_DL_CRC_FLIT,
                    real.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY: real.NVML_NVLINK_ERROR_DL_REPLAY,
                    real.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY: real.NVML_NVLINK_ERROR_DL_RECOVERY}
    _ECC_FIELDS = {
        real.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: (real.NVML_MEMORY_ERROR_TYPE_CORRECTED, real.NVML_VOLATILE_ECC),
        real.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: (real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, real.NVML_VOLATILE_ECC),
        real.NVML_FI_DEV_ECC_SBE_AGG_TOTAL: (real.NVML_MEMORY_ERROR_TYPE_CORRECTED, real.NVML_AGGREGATE_ECC),
        real.NVML_FI_DEV_ECC_DBE_AGG_TOTAL: (real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, real.NVML_AGGREGATE_ECC),
    }

    _PER_LINK = frozenset({real.NVML_FI_DEV_NVLINK_GET_STATE, real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                           real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, *_LINK_ERRORS})
    _REMAPPED = (real.NVML_FI_DEV_REMAPPED_COR, real.NVML_FI_DEV_REMAPPED_UNC, real.NVML_FI_DEV_REMAPPED_PENDING,
                 real.NVML_FI_DEV_REMAPPED_FAILURE)

    def _field_value(self, d, fid, scope):
        """What the driver answers for one field (scope: the link, for per-link fields), or NotSupported."""
        links = d["nvlinks"] if d["nvlinks"] is not NotSupported else ()
        if fid in d["fields_unsupported"]:
            return NotSupported
        if fid in self._PER_LINK:  # most of every call: answered first
            if scope >= len(links):
                return NotSupported
            if fid == real.NVML_FI_DEV_NVLINK_GET_STATE:
                return int(bool(links[scope]))
            if fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX:
                return d["nvlink_tx_kib"].get(scope, NotSupported)
            if fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX:
                return d["nvlink_rx_kib"].get(scope, NotSupported)
            return d["nvlink_errors"].get((scope, self._LINK_ERRORS[fid]), 0)
        ecc = d["ecc"]
        remapped = d["remapped_rows"]
        retired = d["retired_pages"]
        if fid == real.NVML_FI_DEV_MEMORY_TEMP:
            return d["mem_temp"]
        if fid == real.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
            return d["energy_mj"]
        if fid in self._ECC_FIELDS:
            return ecc.get(self._ECC_FIELDS[fid], NotSupported) if ecc is not NotSupported else NotSupported
        if fid in self._REMAPPED:
            return NotSupported if remapped is NotSupported else remapped[self._REMAPPED.index(fid)]
        if fid in (real.NVML_FI_DEV_RETIRED_SBE, real.NVML_FI_DEV_RETIRED_DBE):
            if retired is NotSupported:
                return NotSupported
            cause = (real.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS if fid == real.NVML_FI_DEV_RETIRED_SBE
                     else real.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
            return len(retired[cause])
        if fid == real.NVML_FI_DEV_RETIRED_PENDING:
            return NotSupported if d["retired_pending"] is NotSupported else int(d["retired_pending"])
        if fid == real.NVML_FI_DEV_PCIE_REPLAY_COUNTER:
            return d["pcie_replay"]
        if fid == real.NVML_FI_DEV_NVLINK_LINK_COUNT:
            return len(links) if links else NotSupported
        if fid == real.NVML_FI_DEV_NVLINK_ECC_DATA_ERROR_COUNT_TOTAL:
            return d["nvlink_ecc_total"] if links else NotSupported
        raise AssertionError(f"the fake does not know field {fid}")

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        # pynvml's own wrapper, line for line (a new ctypes array, each id set in Python), around the C function.
        values = (real.c_nvmlFieldValue_t * len(field_ids))()
        for i, field_id in enumerate(field_ids):
            try:
                (values[i].fieldId, values[i].scopeId) = field_id
            except TypeError:
                values[i].fieldId = field_id
        self._fill_field_values(h, values)
        return values

    def _fill_field_values(self, h, values):
        """The C function nvmlDeviceGetFieldValues: fills `values` in place (NVML_SUCCESS is returned by the caller)."""
        d = self.devices[h]
        types = d.get("field_types", {})  # field id -> NVML_VALUE_TYPE_*; unsigned long long where not given
        ull = real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
        out = []
        for fid, scope, *_ in _FIELD_VALUE.iter_unpack(values):
            value = self._field_value(d, fid, scope)
            kind = types.get(fid, ull)
            if value is NotSupported:
                out.append(_FIELD_VALUE.pack(fid, scope, 0, 0, kind, real.NVML_ERROR_NOT_SUPPORTED, 0))
            else:
                out.append(_FIELD_VALUE.pack(fid, scope, 1_700_000_000_000_000, 0, kind, real.NVML_SUCCESS, 0)[:32]
                           + _VALUE_PACK[kind].pack(value).ljust(8, b"\0"))
        raw = b"".join(out)
        ctypes.memmove(values, raw, len(raw))

    def _nvmlGetFunctionPointer(self, name):
        """pynvml's handle on a C function of the library; only nvmlDeviceGetFieldValues is offered. The function
        returns an NVML return code, as C does: the fake's errors for that call come back as their codes."""
        if name != "nvmlDeviceGetFieldValues":
            raise real.NVMLError(real.NVML_ERROR_FUNCTION_NOT_FOUND)
        guarded = self._c_field_values

        def c_function(handle, count, ref):
            assert type(ref).__name__ == "CArgObject", "the array must be passed by reference (ctypes.byref)"
            assert count.value == len(ref._obj), "the count must be the array's length"
            try:
                guarded(handle, ref._obj)
            except real.NVMLError as exc:
                return exc.value
            return real.NVML_SUCCESS

        return c_function

    # GPM: each sample is a counter snapshot; metrics are what the device dict says, once two samples exist
    def nvmlGpmQueryDeviceSupport(self, h):
        return SimpleNamespace(isSupportedDevice=1 if self._answer(h, "gpm") is not NotSupported else 0)

    def nvmlGpmSampleAlloc(self):
        sample = SimpleNamespace(device=None, mig=None)
        self.gpm_live.add(id(sample))
        self.gpm_allocs += 1
        return sample

    def nvmlGpmSampleGet(self, h, sample):
        assert id(sample) in self.gpm_live, "a freed GPM sample was used"
        sample.device, sample.mig = h, None
        return sample

    def nvmlGpmMigSampleGet(self, h, gpu_instance, sample):
        assert id(sample) in self.gpm_live, "a freed GPM sample was used"
        if not any(m and m["gi"] == gpu_instance for m in self.devices[h]["mig"]):
            raise real.NVMLError_NotFound()  # no such GPU instance (any more)
        sample.device, sample.mig = h, gpu_instance
        return sample

    def nvmlGpmSampleFree(self, sample):
        assert id(sample) in self.gpm_live, "a GPM sample freed twice"
        self.gpm_live.discard(id(sample))
        self.gpm_frees += 1

    def nvmlGpmMetricsGet(self, request):
        d = self.devices[request.sample2.device]
        gpm = d["gpm"]
        if request.sample2.mig is not None:
            mig = next((m for m in d["mig"] if m and m["gi"] == request.sample2.mig), None)
            gpm = (mig or {}).get("gpm", {})
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

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):  # the same call's name before driver 535
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

    def nvmlDeviceGetGpuFabricInfoV(self, h, ref):
        assert type(ref).__name__ == "CArgObject", "the fabric struct must be passed by reference (ctypes.byref)"
        info = ref._obj
        if getattr(info, "version", None) not in self.devices[h]["fabric_versions"]:
            raise real.NVMLError_ArgumentVersionMismatch()  # a struct newer (or older) than this driver's
        state, status, clique, summary, mask = self._answer(h, "fabric")
        info.state, info.status, info.cliqueId, info.healthMask = state, status, clique, mask
        if hasattr(info, "healthSummary"):
            info.healthSummary = summary
        return real.NVML_SUCCESS

    def nvmlDeviceGetGpuFabricInfo(self, h, ref):
        """The call before FabricInfoV (drivers 525 to 545, and 535 LTS): c_nvmlGpuFabricInfo_t, no version, no health."""
        assert type(ref).__name__ == "CArgObject", "the fabric struct must be passed by reference (ctypes.byref)"
        info = ref._obj
        assert not hasattr(info, "version"), "the unversioned call takes c_nvmlGpuFabricInfo_t"
        state, status, clique, _, _ = self._answer(h, "fabric")
        info.state, info.status, info.cliqueId = state, status, clique
        return real.NVML_SUCCESS

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
        return self._answer(mig, "gi")

    def nvmlDeviceGetComputeInstanceId(self, mig):
        return self._answer(mig, "ci")

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self._answer(h, "procs")

    def nvmlDeviceGetProcessUtilization(self, h, since):
        self.utilization_since.append(since)
        samples = [s for s in self._answer(h, "proc_util") if s.timeStamp > since]
        if not samples:
            raise real.NVMLError_NotFound()
        return samples
