"""NVML gateway: the only module that imports pynvml. One bad GPU never hides the others.

Every call goes through `_Gpu.call`, which sorts NVML's errors into what they mean:
- absent (NotSupported, NotFound, InvalidArgument, NoData, ...): the field is None, never 0; a call
  a GPU answered NotSupported is not asked again for that handle;
- hidden (NoPermission): the field is None and the GPU records what was hidden (`hidden`), logged once;
- mismatch (FunctionNotFound, NVMLLibraryMismatchError, LibRmVersionMismatch): the field is None and
  the backend reports a problem (`problems`) that the exporter shows as a source error, logged once;
  except for the optional newer calls (`optional=True`: nvmlDeviceGetGpuFabricInfoV, from driver 550, and
  nvmlDeviceGetCurrentClocksEventReasons, from 535), whose FunctionNotFound (or a refused struct version,
  ArgumentVersionMismatch) means "this driver does not have it": logged once at info, and the caller falls
  back to the older call, remembered per handle;
- the GPU is unreadable (GpuIsLost, ResetRequired, GpuNotFound): that GPU is reported up=False with
  the reason, and the next sample acquires its handle again;
- the library is gone (Uninitialized, DriverNotLoaded, LibraryNotFound): NVML is initialised again,
  with backoff, and the source reports the error meanwhile;
- anything else (Unknown, NotReady, Timeout, ...): the field is None and the error is counted; a GPU
  none of whose vital fields could be read is reported up=False with the commonest error as reason.

Cost: values that cannot change while a handle lives (name, serial, VBIOS, PCI address,
thresholds, maximum clocks and link widths, which NVLinks exist) are read once per handle, power
limits once a minute, and the health counters and states that move only when something breaks (ECC,
retired pages, remapped rows, PCIe replays, each NVLink's state and error counters, the fabric state)
every COUNTERS_REFRESH_S (30 s, dcgm-exporter's default collection interval), at once after a handle is
acquired, and again at the next sample when that read failed; XIDs, which announce those breakages, are
drained at every sample. Counters come in batched field-value calls, each request array built once per
handle and filled in place by NVML's C function (pynvml's wrapper rebuilds it in Python at every
call); only NVLinks that exist are asked about (on drivers whose batch lacks the link-state field, half of
the links' states per sample through nvmlDeviceGetNvLinkState; a missing state is unknown, never down); GPM samples are two
buffers per GPU allocated once and freed at shutdown or when the handle goes; PCIe throughput, which
blocks about 20 ms per call, comes from GPM where the GPU has it and otherwise from a background
thread, never from the sampler's own path.

MIG: the instances of a GPU in MIG mode (handle, UUID, GPU and compute instance ids, profile) are listed and kept
with the GPU's handle; each sample reads only their memory and, once per GPU instance, their GPM activity (two GPM
buffers per GPU instance, given back when it goes). The instances are re-listed every minute (MIG_RELIST_S), so
one created meanwhile is seen within a minute; at once when a call on an instance's handle fails (a destroyed
instance is dropped in that sample), when the GPU's MIG mode changes and when its handle is acquired again; and
at every sample while none is listed. A change of MIG mode also forgets what the GPU refused (NotSupported) in the
other mode: in MIG mode NVML refuses device, encoder, decoder and process utilisation.

XIDs come from two places, deduplicated: NVML events (one event set per GPU, drained without
waiting) and the kernel log (agent/gpu/kmsg.py), which also holds XIDs from before the agent
started and codes NVML does not deliver. Per GPU and code the count is the kernel log's records from
before the agent started plus the larger of what each source saw since.
"""

from __future__ import annotations

import ctypes
import logging
import re
import struct
import sys
import threading
import time
from collections import Counter, deque
from types import ModuleType
from typing import Any

from agent.gpu.health import XID_WINDOW_S
from agent.gpu.kmsg import normalize_bus_id
from fleetscope.vocabulary import HEALTH_REASONS
from agent.gpu.state import (
    FabricState,
    GpuProcess,
    GpuState,
    MigInstance,
    NvLinkState,
    PcieState,
    RemappedRows,
)
from agent.threads import Thread

log = logging.getLogger("fleetscope.agent.nvml")

# GPM metric (percent, or bytes/s for PCIe) -> GpuState field
GPM_METRICS = (
    ("NVML_GPM_METRIC_SM_UTIL", "sm_activity_ratio"),
    ("NVML_GPM_METRIC_SM_OCCUPANCY", "sm_occupancy_ratio"),
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "tensor_activity_ratio"),
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", "dram_activity_ratio"),
    ("NVML_GPM_METRIC_FP16_UTIL", "fp16_activity_ratio"),
    ("NVML_GPM_METRIC_FP32_UTIL", "fp32_activity_ratio"),
    ("NVML_GPM_METRIC_FP64_UTIL", "fp64_activity_ratio"),
    ("NVML_GPM_METRIC_GRAPHICS_UTIL", "gr_engine_activity_ratio"),
    ("NVML_GPM_METRIC_PCIE_TX_PER_SEC", "pcie_tx"),
    ("NVML_GPM_METRIC_PCIE_RX_PER_SEC", "pcie_rx"),
)
MIG_GPM_METRICS = (("NVML_GPM_METRIC_GRAPHICS_UTIL", "gr_engine_activity_ratio"), ("NVML_GPM_METRIC_SM_UTIL", "sm_activity_ratio"))
MAX_EVENTS_PER_SAMPLE = 1000  # a storm must not stall the sampler; the rest waits for the next sample
MAX_FIELDS_PER_CALL = 64
_new = tuple.__new__
# c_nvmlFieldValue_t as NVML lays it out: fieldId, scopeId, timestamp, latencyUsec, valueType, nvmlReturn, and the
# 8-byte value union read as an unsigned 64-bit integer (its narrower members are its low bytes on x86 and ARM).
_FIELD_VALUE = struct.Struct("=IIqqiiQ")
# Its last three members only (valueType, nvmlReturn, value), the 24 bytes before them skipped: what a sample reads.
_FIELD_TAIL = struct.Struct("=24xiiQ")
assert _FIELD_TAIL.size == _FIELD_VALUE.size
_DOUBLE, _U64 = struct.Struct("=d"), struct.Struct("=Q")
LIMITS_REFRESH_S = 60.0  # power limits change when someone sets them: read this often, not at every sample
# ECC, retired pages, remapped rows, PCIe replays, NVLink states and error counters, fabric state: read this often.
# They are 78 of an 18-link GPU's 123 field values; the alerts on them look over 5-10 minutes, and the XIDs that
# announce the same faults (48, 63, 64, 74, 94, 95) are drained at every sample.
COUNTERS_REFRESH_S = 30.0
MIG_RELIST_S = 60.0  # MIG instances are listed again this often (and at once when one of their calls fails)
INIT_BACKOFF_S = (1.0, 300.0)  # first retry after 1 s, doubling up to 5 min

_ABSENT = ("NotSupported", "NotFound", "InvalidArgument", "NoData", "ArgumentVersionMismatch", "Deprecated",
           "InsufficientSize", "VgpuEccNotSupported")
_GPU_FATAL = ("GpuIsLost", "ResetRequired", "GpuNotFound")
_LIBRARY_GONE = ("Uninitialized", "DriverNotLoaded", "LibraryNotFound")
_MISMATCH = ("FunctionNotFound", "LibRmVersionMismatch")
_DECLINED = ("FunctionNotFound", "ArgumentVersionMismatch")  # an optional call this driver does not have (in that version)
CLOCK_EVENTS, CLOCK_EVENTS_OLD = "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"
_REASONS = {"GpuIsLost": "gpu_lost", "Unknown": "unknown_error"}
_MIG_KEPT = ("NotSupported", "NoPermission")  # errors of an instance's call that do not mean the instances changed
_MIG_UNREAD = -1  # _Gpu.mig_mode before the GPU's MIG mode was first read


def reason_of(exc: BaseException) -> str:
    """A stable snake_case reason for an NVML error: NVMLError_ResetRequired -> "reset_required"."""
    name = type(exc).__name__
    if name == "NVMLLibraryMismatchError":
        return "library_mismatch"
    name = name.removeprefix("NVMLError_")
    if name in _REASONS:
        return _REASONS[name]
    if name == "NVMLError":  # an error code pynvml has no class for
        return f"nvml_error_{getattr(exc, 'value', 'unknown')}"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def unreadable_reason(reason: str) -> str:
    """The health reason of a GPU none of whose vital fields could be read, from the commonest error's reason:
    one of fleetscope.vocabulary's (so alerts, runbooks and the console know it), else "nvml_error"."""
    return reason if reason in HEALTH_REASONS else "nvml_error"


class NvmlUnavailable(Exception):
    """NVML cannot be used now (no driver, no library, no GPU); `absent` when there is simply no NVIDIA stack."""

    def __init__(self, message: str, *, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


class _Unreadable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _LibraryGone(Exception):
    pass


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Gpu:
    """One GPU handle and what is known about it while the handle lives."""

    def __init__(self, nvml: Nvml, index: int, handle: Any, uuid: str) -> None:
        self.nvml, self.lib, self.index, self.handle, self.uuid = nvml, nvml.lib, index, handle, uuid
        self.unsupported: set[tuple] = set()
        self._refused: set[str] = set()  # the names in `unsupported`
        self.hidden: set[str] = set()
        self.errors: Counter[str] = Counter()  # this sample's errors by reason
        self.static: dict[str, Any] = {}
        self.links: tuple[int, ...] = ()
        # The field values read at every sample, and the health counters read every COUNTERS_REFRESH_S (Nvml._field_ids)
        self.field_ids: tuple[list, list] = ([], [])
        # the same as field-value requests, built once per handle (Nvml._field_arrays); empty: pynvml's wrapper is used
        self.field_arrays: tuple[list[Any], list[Any]] = ([], [])
        self.counters: list[float | None] = []  # the health counters' values as last read
        self.fabric: FabricState | None = None  # the fabric state as last read
        self.counters_due = float("-inf")  # when the health counters and the fabric state are read again
        self.event_set: Any = None
        self.gpm: list[Any] = []  # two sample buffers, used in turn
        self.gpm_have_previous = False
        self.gpm_turn = 0
        self.mig_gpm: dict[int, list[Any]] = {}  # gpu instance id -> [buffers, have_previous, turn]
        self.mig_mode: int = _MIG_UNREAD  # the current MIG mode as last read
        self.mig_list: list[_MigEntry] | None = None  # the instances as last listed (None: list them)
        self.mig_due = float("-inf")  # when they are listed again
        self.mig_slots: int | None = None  # nvmlDeviceGetMaxMigDeviceCount, once read
        self.failed: str | None = None  # the kind of the last NVML error `call` caught (callers reset it)
        self.util_since = 0
        self.declined: str | None = None  # why the last optional call was declined (an NVML error kind), if it was
        self.fabric_calls: tuple[tuple[str, Any], ...] | None = None  # (function, struct) still to try, best first
        self.clock_events = CLOCK_EVENTS  # or CLOCK_EVENTS_OLD on drivers before 535
        self.link_states: dict[int, bool] = {}  # link -> up, from nvmlDeviceGetNvLinkState, on drivers without the field
        self.link_turn = 0  # which half of those links (even or odd) is asked again this sample
        self.limits: tuple[float | None, float | None] = (None, None)  # enforced and management power limits, watts
        self.limits_due = float("-inf")

    # -- every NVML call of this GPU -----------------------------------------------------------
    def call(self, name: str, *args: Any, what: str | None = None, func: Any = None, optional: bool = False) -> Any:
        """`func` (default: pynvml's function `name`) with `args`, its NVML errors sorted as the module says.

        `optional`: a newer call with an older fallback; if the driver (or the binding) does not have it, or refuses
        its struct version, the call answers None with `declined` set to why, and the caller falls back."""
        # Twenty-odd calls per GPU per sample: the key of a call is built only for a function refused before.
        if name in self._refused and self._key(name, args) in self.unsupported:
            return None
        if func is None:
            func = getattr(self.lib, name, None)
        if func is None:  # a binding older than the call
            if optional:
                return self._decline(name, "FunctionNotFound", "missing from pynvml")
            self.nvml.mismatch(f"{name} missing from pynvml", "function_not_found")
            self._unsupported(name, args)
            return None
        try:
            return func(*args)
        except self.nvml.errors.library_mismatch as exc:
            self.nvml.mismatch(f"{name}: {exc}")
            self._unsupported(name, args)
            return None
        except self.lib.NVMLError as exc:
            kind = self.failed = type(exc).__name__.removeprefix("NVMLError_")
            if kind == "NotSupported":
                self._unsupported(name, args)
                return None
            if optional and kind in _DECLINED:
                return self._decline(name, kind, reason_of(exc))
            if kind in _ABSENT:
                return None
            if kind == "NoPermission":
                self.hide(f"{what or name}:no_permission", name)
                return None
            if kind in _MISMATCH:
                self.nvml.mismatch(f"{name}: {reason_of(exc)}", reason_of(exc).replace("lib_rm_version_mismatch", "library_mismatch"))
                self._unsupported(name, args)
                return None
            if kind in _GPU_FATAL:
                raise _Unreadable(reason_of(exc)) from exc
            if kind in _LIBRARY_GONE:
                raise _LibraryGone(reason_of(exc)) from exc
            reason = reason_of(exc)
            self.errors[reason] += 1
            self.nvml.count_error(self, name, reason)
            return None

    @staticmethod
    def _key(name: str, args: tuple) -> tuple:
        """A call as `unsupported` holds it: its name and its int or str arguments after the handle."""
        return (name, *(a for a in args[1:] if isinstance(a, (int, str))))

    def _decline(self, name: str, kind: str, why: str) -> None:
        self.declined = kind
        if ("declined", name, kind) not in self.nvml._logged:
            self.nvml._logged.add(("declined", name, kind))
            log.info("NVML: this driver does not offer %s%s (%s); an older form of the call is used instead",
                     "this struct version of " if kind == "ArgumentVersionMismatch" else "", name, why)

    def forget_refusals(self) -> None:
        """Ask again what this handle refused (a change of MIG mode changes what a GPU answers)."""
        self.unsupported.clear()
        self._refused.clear()

    def drop_mig_gpm(self, keep: frozenset[int] | set[int] = frozenset()) -> None:
        """Give back the GPM samples of the GPU instances not in `keep`."""
        gone = [gi for gi in self.mig_gpm if gi not in keep]
        if gone:
            self.give_back([b for gi in gone for b in self.mig_gpm.pop(gi)[0]])

    def _unsupported(self, name: str, args: tuple) -> None:
        """This call (with these arguments) is not asked again for this handle."""
        self.unsupported.add(self._key(name, args))
        self._refused.add(name)

    def hide(self, what: str, name: str) -> None:
        if what not in self.hidden:
            self.hidden.add(what)
            log.warning("GPU %d: NVML refuses %s to this user (NoPermission); %s stays hidden. "
                        "Run the agent with the rights to read it to see it.", self.index, name, what.partition(":")[0])

    def free(self) -> None:
        """Give back the native objects of this handle (event set, GPM samples); errors here change nothing."""
        lib = self.lib
        buffers = list(self.gpm) + [b for entry in self.mig_gpm.values() for b in entry[0]]
        self.gpm, self.mig_gpm = [], {}
        self.give_back(buffers)
        if self.event_set is not None:
            try:
                lib.nvmlEventSetFree(self.event_set)
            except Exception as exc:  # noqa: BLE001
                log.debug("GPU %d: freeing the event set: %s", self.index, exc)
            self.event_set = None

    def give_back(self, samples: list[Any]) -> None:
        """Free GPM samples; one NVML cannot free now (it went away) is kept and freed once it answers again."""
        for sample in samples:
            try:
                self.lib.nvmlGpmSampleFree(sample)
            except Exception as exc:  # noqa: BLE001 - freeing must go on whatever one call says
                log.debug("GPU %d: freeing a GPM sample: %s; tried again once NVML answers", self.index, exc)
                self.nvml.orphans.append(sample)


class _MigEntry:
    """One MIG instance as listed: what does not change while it lives (`whole`: all of it was read)."""

    __slots__ = ("compute_instance", "gpu_instance", "handle", "profile", "uuid", "whole")

    def __init__(self, handle: Any, uuid: str, gpu_instance: int | None, compute_instance: int | None, profile: str,
                 whole: bool) -> None:
        self.handle, self.uuid, self.profile, self.whole = handle, uuid, profile, whole
        self.gpu_instance, self.compute_instance = gpu_instance, compute_instance


class _Errors:
    def __init__(self, lib: ModuleType) -> None:
        mismatch = getattr(lib, "NVMLLibraryMismatchError", None)
        self.library_mismatch: tuple[type[BaseException], ...] = (mismatch,) if isinstance(mismatch, type) else ()


class Nvml:
    """Reads every GPU on the node through NVML; one instance per agent."""

    def __init__(self, lib: ModuleType | None = None, *, kernel_log: Any = None, clock=time.monotonic,
                 pcie_interval_s: float = 5.0) -> None:
        if lib is None:
            import pynvml as lib  # only here, so the agent starts without it
        self.lib = lib
        self.errors = _Errors(lib)
        # Lookups that depend on the binding only, made once instead of at every read.
        self._value_attr = {lib.NVML_VALUE_TYPE_DOUBLE: "dVal", lib.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
                            lib.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal", lib.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
                            lib.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
                            getattr(lib, "NVML_VALUE_TYPE_SIGNED_INT", -1): "siVal"}
        self._value_mask = self._value_masks(lib)
        self._wide_kinds = frozenset(k for k, m in self._value_mask.items() if m == 0xFFFFFFFFFFFFFFFF)
        self._raw_fields = self._raw_fields_usable(lib)
        self._gpm_wanted = {metrics: [(getattr(lib, name), field) for name, field in metrics if hasattr(lib, name)]
                            for metrics in (GPM_METRICS, MIG_GPM_METRICS)}
        # Fabric info, best first: FabricInfoV with the newest struct the binding has, then older structs (a driver
        # refuses a struct newer than its own: ArgumentVersionMismatch), then the unversioned call of drivers before 550.
        fabric_calls: list[tuple[str, Any]] = []
        for struct_name in ("c_nvmlGpuFabricInfo_v3_t", "c_nvmlGpuFabricInfo_v2_t", "c_nvmlGpuFabricInfoV_t"):
            struct_type = getattr(lib, struct_name, None)
            if struct_type is not None and all(struct_type is not t for _, t in fabric_calls):
                fabric_calls.append(("nvmlDeviceGetGpuFabricInfoV", struct_type))
        if getattr(lib, "c_nvmlGpuFabricInfo_t", None) is not None:
            fabric_calls.append(("nvmlDeviceGetGpuFabricInfo", lib.c_nvmlGpuFabricInfo_t))
        self._fabric_calls = tuple(fabric_calls)
        self._fabric_names = (
            {getattr(lib, f"NVML_GPU_FABRIC_STATE_{s.upper()}", -1): s for s in ("not_started", "in_progress", "completed")},
            {getattr(lib, f"NVML_GPU_FABRIC_HEALTH_SUMMARY_{s.upper()}", -1): s
             for s in ("healthy", "unhealthy", "limited_capacity")},
        )
        self.clock = clock
        self._lock = threading.Lock()
        self._initialized = False
        self._init_failures = 0
        self._next_init_at = 0.0
        self._init_error: NvmlUnavailable | None = None
        self.driver_version: str | None = None
        self.cuda_driver_version: str | None = None
        self._gpus: dict[int, _Gpu] = {}
        self.orphans: list[Any] = []  # GPM samples a library that had gone away could not free
        self._down: dict[int, str] = {}  # index -> reason, while a GPU cannot be read
        self._uuids: dict[int, str] = {}  # uuid of each index as last seen, so a GPU that goes away keeps its identity
        self._bus_ids: dict[int, str] = {}
        self._problems: dict[str, str] = {}  # problem -> detail, for the source's status
        self._logged: set[tuple] = set()
        self.error_counts: Counter[tuple[str, str, str]] = Counter()  # (uuid, call, reason) -> errors since start
        # XIDs: per index, code -> count from NVML events since start; kernel-log counts before/after start
        self._nvml_xids: dict[int, Counter[int]] = {}
        self._kernel = kernel_log
        self._kernel_before: dict[str, Counter[int]] = {}
        self._kernel_after: dict[str, Counter[int]] = {}
        self._recent: dict[str, deque[tuple[float, int]]] = {}  # bus id or index key -> (wall time, code)
        self._last_xid: dict[str, int] = {}
        self._started_boot_us = int(time.monotonic() * 1e6)
        self._pcie_interval_s = pcie_interval_s
        self._pcie: dict[int, tuple[float | None, float | None]] = {}
        self._pcie_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- problems the source reports ---------------------------------------------------------
    @property
    def problems(self) -> tuple[str, ...]:
        out = set(self._problems)
        kernel_problem = getattr(self._kernel, "problem", None)
        if kernel_problem:
            out.add(kernel_problem)
        return tuple(sorted(out))

    def mismatch(self, detail: str, problem: str = "library_mismatch") -> None:
        if (problem, detail) not in self._logged:
            self._logged.add((problem, detail))
            log.error("NVML driver/library mismatch: %s (update nvidia-ml-py or the driver so they match); "
                      "the field stays empty", detail)
        self._problems[problem] = detail

    def count_error(self, gpu: _Gpu, call: str, reason: str) -> None:
        self.error_counts[(gpu.uuid, call, reason)] += 1
        if (gpu.index, call, reason) not in self._logged:
            self._logged.add((gpu.index, call, reason))
            log.warning("GPU %d: %s failed with %s; that field is left out while it fails", gpu.index, call, reason)

    # -- initialisation with backoff -----------------------------------------------------------
    def init(self) -> None:
        with self._lock:
            self._init_locked(force=True)

    def _init_locked(self, force: bool = False) -> None:
        if self._initialized:
            return
        now = self.clock()
        if not force and now < self._next_init_at and self._init_error is not None:
            raise self._init_error
        lib = self.lib
        try:
            lib.nvmlInit()
        except (lib.NVMLError, *self.errors.library_mismatch) as exc:
            self._init_failures += 1
            delay = min(INIT_BACKOFF_S[1], INIT_BACKOFF_S[0] * 2 ** (self._init_failures - 1))
            self._next_init_at = now + delay
            absent = type(exc).__name__ == "NVMLError_LibraryNotFound"
            self._init_error = NvmlUnavailable(f"NVML did not initialise ({reason_of(exc)}: {exc}); next try in {delay:.0f} s",
                                               absent=absent)
            if self._init_failures == 1 or self._init_failures % 10 == 0:
                log.log(logging.INFO if absent else logging.ERROR, "%s", self._init_error)
            raise self._init_error from exc
        if self._init_failures:
            log.info("NVML initialised after %d failed tries", self._init_failures)
        self._initialized, self._init_failures, self._init_error = True, 0, None
        orphans, self.orphans = self.orphans, []
        for sample in orphans:
            try:
                lib.nvmlGpmSampleFree(sample)
            except Exception as exc:  # noqa: BLE001
                log.debug("freeing a GPM sample kept from before NVML went away: %s", exc)
        try:
            self.driver_version = _text(lib.nvmlSystemGetDriverVersion())
            cuda = lib.nvmlSystemGetCudaDriverVersion()
            if cuda:  # 12040 means 12.4
                self.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except (lib.NVMLError, *self.errors.library_mismatch) as exc:
            log.warning("NVML driver version: %s", exc)

    def _lose_library(self, why: str) -> None:
        """NVML went away under us (driver unloaded or reloaded): drop every handle and initialise again later."""
        log.error("NVML stopped answering (%s); it is initialised again with backoff", why)
        for gpu in self._gpus.values():
            gpu.free()
        self._gpus.clear()
        try:
            self.lib.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - it is gone already
            pass
        self._initialized = False
        self._init_failures = 1
        self._next_init_at = self.clock() + INIT_BACKOFF_S[0]
        self._init_error = NvmlUnavailable(f"NVML stopped answering: {why}")

    def shutdown(self) -> None:
        self._stop.set()
        if self._pcie_thread is not None:
            self._pcie_thread.join(timeout=5)
        with self._lock:
            for gpu in self._gpus.values():
                gpu.free()
            self._gpus.clear()
            if self._initialized:
                try:
                    self.lib.nvmlShutdown()
                except self.lib.NVMLError:
                    pass
                self._initialized = False
            if self._kernel is not None:
                self._kernel.close()

    # -- one sample ----------------------------------------------------------------------------
    def read(self) -> list[GpuState]:
        """One state per GPU index; a GPU that cannot be read is reported with up=False and why."""
        with self._lock:
            self._init_locked()
            try:
                count = self.lib.nvmlDeviceGetCount()
            except (self.lib.NVMLError, *self.errors.library_mismatch) as exc:
                if type(exc).__name__.removeprefix("NVMLError_") in _LIBRARY_GONE:
                    self._lose_library(reason_of(exc))
                raise NvmlUnavailable(f"NVML cannot count the GPUs: {reason_of(exc)}") from exc
            self._poll_kernel()
            states = []
            for index in range(count):
                try:
                    states.append(self._read_index(index))
                except _LibraryGone as exc:
                    self._lose_library(str(exc))
                    raise NvmlUnavailable(f"NVML stopped answering: {exc}") from exc
            for index in [i for i in self._gpus if i >= count]:  # GPUs that left the count
                self._gpus.pop(index).free()
            self._problems = {k: v for k, v in self._problems.items() if k in ("library_mismatch", "function_not_found")}
        if self._pcie_thread is None and any(g.static.get("pcie_from_thread") for g in self._gpus.values()):
            self._pcie_thread = Thread(target=self._pcie_loop, name="nvml-pcie", daemon=True)
            self._pcie_thread.start()
        return states

    def _acquire(self, index: int) -> _Gpu:
        lib = self.lib
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(lib.nvmlDeviceGetUUID(handle)) or f"index-{index}"
        except self.errors.library_mismatch as exc:
            raise _Unreadable("library_mismatch") from exc
        except lib.NVMLError as exc:
            if type(exc).__name__.removeprefix("NVMLError_") in _LIBRARY_GONE:
                raise _LibraryGone(reason_of(exc)) from exc
            raise _Unreadable(reason_of(exc)) from exc
        old = self._gpus.pop(index, None)
        if old is not None:
            old.free()
        gpu = _Gpu(self, index, handle, uuid)
        self._uuids[index] = uuid
        try:
            self._read_static(gpu)
            self._watch_xids(gpu)
        except BaseException:  # _Unreadable, _LibraryGone, ...: the GPU is not kept, so what it holds is given back now
            gpu.free()
            raise
        return gpu

    def _read_index(self, index: int) -> GpuState:
        gpu = self._gpus.get(index)
        try:
            if gpu is None:
                gpu = self._gpus[index] = self._acquire(index)
            self._drain_xids(gpu)
            state = self._read_device(gpu)
        except _Unreadable as exc:
            if self._down.get(index) != exc.reason:
                log.error("GPU %d (%s) cannot be read: %s; the other GPUs go on, and its handle is acquired again "
                          "at the next sample", index, self._uuids.get(index, "?"), exc.reason)
            self._down[index] = exc.reason
            dropped = self._gpus.pop(index, None)
            if dropped is not None:
                dropped.free()
            return self._down_state(index, exc.reason)
        if index in self._down:
            log.info("GPU %d (%s) answers again", index, gpu.uuid)
            del self._down[index]
        return state

    def _down_state(self, index: int, reason: str) -> GpuState:
        key = self._bus_ids.get(index)
        return GpuState(index=index, uuid=self._uuids.get(index, f"index-{index}"), up=False, error=reason,
                        xid_counts=self._xid_counts(index, key), last_xid=self._last_xid.get(key or f"i{index}"),
                        recent_xids=self._recent_xids(key or f"i{index}"))

    # -- what does not change while a handle lives ---------------------------------------------
    def _read_static(self, gpu: _Gpu) -> None:
        lib, c, h, s = self.lib, gpu.call, gpu.handle, gpu.static
        s["name"] = _text(c("nvmlDeviceGetName", h))
        s["serial"] = _text(c("nvmlDeviceGetSerial", h))
        s["vbios"] = _text(c("nvmlDeviceGetVbiosVersion", h))
        pci = c("nvmlDeviceGetPciInfo", h)
        s["pci_bus_id"] = _text(pci.busId) if pci is not None else None
        if s["pci_bus_id"]:
            try:
                self._bus_ids[gpu.index] = normalize_bus_id(s["pci_bus_id"])
            except ValueError:
                log.warning("GPU %d: PCI address %r not understood; its kernel-log XIDs cannot be matched", gpu.index, s["pci_bus_id"])
        s["temperature_slowdown_celsius"] = _float(c("nvmlDeviceGetTemperatureThreshold", h, lib.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        s["temperature_shutdown_celsius"] = _float(c("nvmlDeviceGetTemperatureThreshold", h, lib.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN))
        s["sm_clock_max_hertz"] = _scaled(c("nvmlDeviceGetMaxClockInfo", h, lib.NVML_CLOCK_SM), 1e6)
        s["memory_clock_max_hertz"] = _scaled(c("nvmlDeviceGetMaxClockInfo", h, lib.NVML_CLOCK_MEM), 1e6)
        s["pcie_generation_max"] = c("nvmlDeviceGetMaxPcieLinkGeneration", h)
        s["pcie_width_max"] = c("nvmlDeviceGetMaxPcieLinkWidth", h)
        support = c("nvmlGpmQueryDeviceSupport", h)
        s["gpm"] = bool(support is not None and support.isSupportedDevice)
        if s["gpm"]:
            gpu.gpm = self._gpm_buffers(gpu)
            s["gpm"] = bool(gpu.gpm)
        s["pcie_from_thread"] = not s["gpm"]
        # NVLinks: which exist, asked once; then state, throughput and errors of those only, in field-value batches.
        count = self._fields(gpu, [lib.NVML_FI_DEV_NVLINK_LINK_COUNT])[0]
        if count:
            gpu.links = tuple(range(int(count)))
        else:  # drivers without the link-count field: probe the link states once
            gpu.links = tuple(link for link in range(lib.NVML_NVLINK_MAX_LINKS)
                              if c("nvmlDeviceGetNvLinkState", h, link) is not None)
        gpu.field_ids = self._field_ids(gpu)
        gpu.field_arrays = ((self._field_arrays(gpu.field_ids[0]), self._field_arrays(gpu.field_ids[1]))
                            if self._raw_fields else ([], []))

    def _field_ids(self, gpu: _Gpu) -> tuple[list, list]:
        """The field values of every sample (memory temperature, energy, each link's throughput), and the health
        counters read every COUNTERS_REFRESH_S (ECC, retired pages, remapped rows, PCIe replays, the NVLink ECC total
        and each link's state and error counters); per-link ids are (field id, link) pairs."""
        lib = self.lib
        every: list = [lib.NVML_FI_DEV_MEMORY_TEMP, lib.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION]
        counters: list = [lib.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, lib.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
                          lib.NVML_FI_DEV_ECC_SBE_AGG_TOTAL, lib.NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
                          lib.NVML_FI_DEV_RETIRED_SBE, lib.NVML_FI_DEV_RETIRED_DBE, lib.NVML_FI_DEV_RETIRED_PENDING,
                          lib.NVML_FI_DEV_REMAPPED_COR, lib.NVML_FI_DEV_REMAPPED_UNC, lib.NVML_FI_DEV_REMAPPED_PENDING,
                          lib.NVML_FI_DEV_REMAPPED_FAILURE, lib.NVML_FI_DEV_PCIE_REPLAY_COUNTER]
        if gpu.links:
            counters.append(lib.NVML_FI_DEV_NVLINK_ECC_DATA_ERROR_COUNT_TOTAL)
            for link in gpu.links:
                every.extend(((lib.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link),
                              (lib.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link)))
                counters.extend((fid, link) for fid in (
                    lib.NVML_FI_DEV_NVLINK_GET_STATE, lib.NVML_FI_DEV_NVLINK_ERROR_DL_CRC,
                    lib.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY, lib.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY))
        return every, counters

    def _gpm_buffers(self, gpu: _Gpu) -> list[Any]:
        """Two GPM sample buffers, or none (then nothing is held)."""
        buffers: list[Any] = []
        try:
            for _ in range(2):
                sample = gpu.call("nvmlGpmSampleAlloc")
                if sample is None:
                    break
                buffers.append(sample)
            else:
                return buffers
        except BaseException:  # NVML went away between the two: the first is given back, then the error goes on
            gpu.give_back(buffers)
            raise
        gpu.give_back(buffers)
        return []

    # -- XIDs ------------------------------------------------------------------------------------
    def _watch_xids(self, gpu: _Gpu) -> None:
        lib = self.lib
        event_set = gpu.call("nvmlEventSetCreate")
        if event_set is None:
            return
        try:
            lib.nvmlDeviceRegisterEvents(gpu.handle, lib.nvmlEventTypeXidCriticalError, event_set)
        except (lib.NVMLError, *self.errors.library_mismatch) as exc:
            if ("xid_events", gpu.index) not in self._logged:
                self._logged.add(("xid_events", gpu.index))
                log.warning("GPU %d: XID events cannot be watched through NVML (%s); the kernel log is read instead",
                            gpu.index, reason_of(exc))
            if type(exc).__name__ == "NVMLError_NoPermission":
                gpu.hidden.add("xid_events:no_permission")
            try:
                lib.nvmlEventSetFree(event_set)
            except lib.NVMLError:
                pass
            return
        gpu.event_set = event_set
        self._nvml_xids.setdefault(gpu.index, Counter())

    def _drain_xids(self, gpu: _Gpu) -> None:
        if gpu.event_set is None:
            return
        lib = self.lib
        for _ in range(MAX_EVENTS_PER_SAMPLE):
            try:
                data = lib.nvmlEventSetWait_v2(gpu.event_set, 0)
            except self.errors.library_mismatch as exc:
                self.mismatch(f"nvmlEventSetWait_v2: {exc}")
                return
            except lib.NVMLError as exc:
                kind = type(exc).__name__.removeprefix("NVMLError_")
                if kind == "Timeout":
                    return  # nothing pending
                if kind in _GPU_FATAL:
                    raise _Unreadable(reason_of(exc)) from exc
                if kind in _LIBRARY_GONE:
                    raise _LibraryGone(reason_of(exc)) from exc
                log.debug("GPU %d: reading XID events failed: %s", gpu.index, exc)
                return
            if data.eventType & lib.nvmlEventTypeXidCriticalError:
                code = int(data.eventData)
                self._nvml_xids[gpu.index][code] += 1
                key = self._bus_ids.get(gpu.index, f"i{gpu.index}")
                self._last_xid[key] = code
                self._recent.setdefault(key, deque()).append((time.time(), code))
                log.error("GPU %d: XID %d (NVML event)", gpu.index, code)

    def _poll_kernel(self) -> None:
        if self._kernel is None:
            return
        now_wall, now_boot_us = time.time(), time.monotonic() * 1e6
        for x in self._kernel.poll():
            side = self._kernel_before if x.boot_us < self._started_boot_us else self._kernel_after
            side.setdefault(x.bus_id, Counter())[x.code] += 1
            self._last_xid[x.bus_id] = x.code
            when = now_wall - (now_boot_us - x.boot_us) / 1e6
            if when >= now_wall - XID_WINDOW_S:
                self._recent.setdefault(x.bus_id, deque()).append((when, x.code))
            if x.boot_us >= self._started_boot_us:
                log.error("GPU %s: XID %d (kernel log): %s", x.bus_id, x.code, x.message)

    def _xid_counts(self, index: int, bus_id: str | None) -> dict[int, int] | None:
        nvml = self._nvml_xids.get(index)
        kernel_ok = self._kernel is not None and not getattr(self._kernel, "problem", None)
        if nvml is None and not kernel_ok:
            return None  # nothing watches this GPU's XIDs
        before = self._kernel_before.get(bus_id or "", Counter())
        after = self._kernel_after.get(bus_id or "", Counter())
        nvml = nvml or Counter()
        return {code: before[code] + max(after[code], nvml[code]) for code in set(before) | set(after) | set(nvml)}

    def _recent_xids(self, key: str) -> dict[int, int]:
        events = self._recent.get(key)
        if not events:
            return {}
        horizon = time.time() - XID_WINDOW_S
        while events and events[0][0] < horizon:
            events.popleft()
        return dict(Counter(code for _, code in events))

    # -- the values of one sample ----------------------------------------------------------------
    def _read_device(self, gpu: _Gpu) -> GpuState:
        lib, c, h, s = self.lib, gpu.call, gpu.handle, gpu.static
        gpu.errors.clear()
        index = gpu.index
        key = self._bus_ids.get(index, f"i{index}")
        f: dict[str, Any] = {
            "index": index, "uuid": gpu.uuid, "name": s["name"], "serial": s["serial"], "vbios": s["vbios"],
            "pci_bus_id": s["pci_bus_id"], "temperature_slowdown_celsius": s["temperature_slowdown_celsius"],
            "temperature_shutdown_celsius": s["temperature_shutdown_celsius"], "sm_clock_max_hertz": s["sm_clock_max_hertz"],
            "memory_clock_max_hertz": s["memory_clock_max_hertz"],
            "xid_counts": self._xid_counts(index, self._bus_ids.get(index)), "last_xid": self._last_xid.get(key),
            "recent_xids": self._recent_xids(key),
        }
        util = c("nvmlDeviceGetUtilizationRates", h)
        if util is not None:
            f["utilization_ratio"] = util.gpu / 100.0
            f["memory_utilization_ratio"] = util.memory / 100.0
        mem = c("nvmlDeviceGetMemoryInfo", h, lib.nvmlMemory_v2)
        if mem is None and ("nvmlDeviceGetMemoryInfo", lib.nvmlMemory_v2) in gpu.unsupported:
            mem = c("nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            f.update(memory_used_bytes=int(mem.used), memory_free_bytes=int(mem.free), memory_total_bytes=int(mem.total))
            if getattr(mem, "reserved", None) is not None:
                f["memory_reserved_bytes"] = int(mem.reserved)
        f["temperature_celsius"] = _float(c("nvmlDeviceGetTemperature", h, lib.NVML_TEMPERATURE_GPU))
        f["power_watts"] = _scaled(c("nvmlDeviceGetPowerUsage", h), 1e-3)  # milliwatts
        now = self.clock()
        if now >= gpu.limits_due:  # set by an administrator (or a BMC's power capping): read once a minute
            gpu.limits = (_scaled(c("nvmlDeviceGetEnforcedPowerLimit", h), 1e-3),
                          _scaled(c("nvmlDeviceGetPowerManagementLimit", h), 1e-3))
            if None not in gpu.limits:  # a failed read is tried again at the next sample
                gpu.limits_due = now + LIMITS_REFRESH_S
        f["power_limit_watts"], f["power_management_limit_watts"] = gpu.limits
        f["sm_clock_hertz"] = _scaled(c("nvmlDeviceGetClockInfo", h, lib.NVML_CLOCK_SM), 1e6)  # MHz
        f["memory_clock_hertz"] = _scaled(c("nvmlDeviceGetClockInfo", h, lib.NVML_CLOCK_MEM), 1e6)
        f["graphics_clock_hertz"] = _scaled(c("nvmlDeviceGetClockInfo", h, lib.NVML_CLOCK_GRAPHICS), 1e6)
        f["fan_speed_ratio"] = _scaled(c("nvmlDeviceGetFanSpeed", h), 0.01)  # GPUs without fans: NotSupported, asked once
        pstate = c("nvmlDeviceGetPerformanceState", h)
        f["pstate"] = int(pstate) if pstate is not None else None
        if gpu.clock_events == CLOCK_EVENTS:
            gpu.declined = None
            reasons = c(CLOCK_EVENTS, h, optional=True)
            if gpu.declined is not None:  # a driver before 535: the same mask under its older name, from now on
                gpu.clock_events = CLOCK_EVENTS_OLD
                reasons = c(CLOCK_EVENTS_OLD, h)
        else:
            reasons = c(CLOCK_EVENTS_OLD, h)
        f["clock_event_mask"] = int(reasons) if reasons is not None else None
        enc, dec = c("nvmlDeviceGetEncoderUtilization", h), c("nvmlDeviceGetDecoderUtilization", h)
        f["encoder_utilization_ratio"] = enc[0] / 100.0 if enc is not None else None
        f["decoder_utilization_ratio"] = dec[0] / 100.0 if dec is not None else None

        values = self._values(gpu, 0)
        if now >= gpu.counters_due:  # the health counters and the fabric state: every COUNTERS_REFRESH_S
            errors = gpu.errors.total()
            gpu.counters = self._values(gpu, 1)
            gpu.fabric = self._fabric(gpu)
            if gpu.errors.total() == errors:  # a read that failed (not one refused) is tried again at the next sample
                gpu.counters_due = now + COUNTERS_REFRESH_S
        f.update(self._counters(gpu, values, gpu.counters))
        gpm = self._gpm(gpu)
        pcie_tx, pcie_rx = gpm.pop("pcie_tx", None), gpm.pop("pcie_rx", None)
        f.update(gpm)
        if s["pcie_from_thread"]:
            pcie_tx, pcie_rx = self._pcie.get(index, (None, None))
        pcie = PcieState(tx_bytes_per_second=pcie_tx, rx_bytes_per_second=pcie_rx, replays=f.pop("pcie_replays"),
                         generation=c("nvmlDeviceGetCurrPcieLinkGeneration", h), generation_max=s["pcie_generation_max"],
                         width=c("nvmlDeviceGetCurrPcieLinkWidth", h), width_max=s["pcie_width_max"])
        f["pcie"] = None if pcie == PcieState() else pcie
        f["fabric"] = gpu.fabric
        f["processes"] = self._processes(gpu)
        f["mig_enabled"], f["mig_instances"] = self._mig(gpu)

        vital = ("utilization_ratio", "memory_used_bytes", "temperature_celsius", "power_watts")
        if gpu.errors and all(f.get(name) is None for name in vital):
            raise _Unreadable(unreadable_reason(gpu.errors.most_common(1)[0][0]))
        f["hidden"] = tuple(sorted(gpu.hidden))
        return GpuState(**f)

    def _fields(self, gpu: _Gpu, ids: list) -> list[float | None]:
        """Field values in batches (ids are field ids or (field id, scope) pairs); None where unsupported."""
        success = self.lib.NVML_SUCCESS
        out: list[float | None] = []
        kinds = self._value_attr
        for start in range(0, len(ids), MAX_FIELDS_PER_CALL):
            chunk = ids[start:start + MAX_FIELDS_PER_CALL]
            values = gpu.call("nvmlDeviceGetFieldValues", gpu.handle, chunk)
            if not values:
                out.extend([None] * len(chunk))
                continue
            # a hundred-odd values per GPU per sample: one comprehension, no method lookups per value
            out += [float(getattr(v.value, kinds[v.valueType])) if v.nvmlReturn == success and v.valueType in kinds
                    else None for v in values]
        return out

    # -- the sample's field values without pynvml's per-value Python ------------------------------
    # pynvml's nvmlDeviceGetFieldValues builds a new ctypes array at every call and sets each field id in a Python
    # loop (about 190 us for a GPU's 123 values); the gateway reads the same ids at every sample, so it builds each
    # array once per handle, lets NVML's C function fill it in place, and reads it back in one struct pass.
    @staticmethod
    def _raw_fields_usable(lib: Any) -> bool:
        """Whether this binding exposes what the raw path needs, laid out as _FIELD_VALUE reads it."""
        struct_type = getattr(lib, "c_nvmlFieldValue_t", None)
        if struct_type is None or sys.byteorder != "little" or not callable(getattr(lib, "_nvmlGetFunctionPointer", None)):
            return False
        try:
            return (ctypes.sizeof(struct_type) == _FIELD_VALUE.size and struct_type.valueType.offset == 24
                    and struct_type.nvmlReturn.offset == 28 and struct_type.value.offset == 32)
        except (AttributeError, TypeError):
            return False

    @staticmethod
    def _value_masks(lib: Any) -> dict[int, int]:
        """Value type -> the bits of the 8-byte union that hold it (0: a double, reinterpreted)."""
        masks = {getattr(lib, "NVML_VALUE_TYPE_DOUBLE", -1): 0, getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_INT", -1): 0xFFFFFFFF,
                 getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_LONG", -1): 0xFFFFFFFFFFFFFFFF,
                 getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", -1): 0xFFFFFFFFFFFFFFFF,
                 getattr(lib, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", -1): -1, getattr(lib, "NVML_VALUE_TYPE_SIGNED_INT", -1): -2,
                 getattr(lib, "NVML_VALUE_TYPE_UNSIGNED_SHORT", -1): 0xFFFF}
        masks.pop(-1, None)
        return masks

    def _field_arrays(self, ids: list) -> list[Any]:
        """ids as c_nvmlFieldValue_t arrays of at most MAX_FIELDS_PER_CALL, field and scope ids set."""
        arrays = []
        for start in range(0, len(ids), MAX_FIELDS_PER_CALL):
            chunk = ids[start:start + MAX_FIELDS_PER_CALL]
            array = (self.lib.c_nvmlFieldValue_t * len(chunk))()
            for entry, fid in zip(array, chunk):
                entry.fieldId, entry.scopeId = fid if isinstance(fid, tuple) else (fid, 0)
            arrays.append(array)
        return arrays

    def _fill_fields(self, handle: Any, array: Any) -> Any:
        """NVML's nvmlDeviceGetFieldValues on a prepared array: raises as pynvml's wrapper does."""
        lib = self.lib
        fn = lib._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")  # NVMLError_FunctionNotFound on an old driver
        ret = fn(handle, ctypes.c_int32(len(array)), ctypes.byref(array))
        if ret != lib.NVML_SUCCESS:
            raise lib.NVMLError(ret)
        return array

    def _values(self, gpu: _Gpu, which: int) -> list[float | None]:
        """The values of gpu.field_ids[which] (0: every sample's, 1: the health counters), in order."""
        arrays = gpu.field_arrays[which]
        return self._sample_values(gpu, arrays) if arrays else self._fields(gpu, gpu.field_ids[which])

    def _sample_values(self, gpu: _Gpu, arrays: list[Any]) -> list[float | None]:
        """The values of prepared field-value arrays, in order; None where NVML has none (that field only) or the
        call failed. A 64-bit unsigned value answered with success (nearly all of them) is read in the comprehension
        itself; any other goes through _decode."""
        masks, fill, wide = self._value_mask, self._fill_fields, self._wide_kinds
        out: list[float | None] = []
        for array in arrays:
            if gpu.call("nvmlDeviceGetFieldValues", gpu.handle, array, func=fill) is None:
                out += [None] * len(array)
                continue
            out += [float(raw) if kind in wide and ret == 0 else _decode(masks, kind, ret, raw)
                    for kind, ret, raw in _FIELD_TAIL.iter_unpack(array)]
        return out

    def _counters(self, gpu: _Gpu, v: list[float | None], c: list[float | None]) -> dict[str, Any]:
        """GpuState's fields from this sample's field values `v` and the health counters `c` as last read (both in
        the order of _field_ids)."""
        mem_temp, energy_mj = v[:2]
        (sbe_vol, dbe_vol, sbe_agg, dbe_agg, retired_sbe, retired_dbe, retired_pending,
         remap_cor, remap_unc, remap_pending, remap_failure, replays) = c[:12]
        ecc = {}
        for (kind, counter), value in ((("corrected", "volatile"), sbe_vol), (("uncorrected", "volatile"), dbe_vol),
                                       (("corrected", "aggregate"), sbe_agg), (("uncorrected", "aggregate"), dbe_agg)):
            if value is not None:
                ecc[(kind, counter)] = int(value)
        retired = {}
        if retired_sbe is not None:
            retired["multiple_single_bit"] = int(retired_sbe)
        if retired_dbe is not None:
            retired["double_bit"] = int(retired_dbe)
        out: dict[str, Any] = {
            "memory_temperature_celsius": mem_temp,
            "energy_joules": energy_mj * 1e-3 if energy_mj is not None else None,
            "ecc_errors": ecc, "retired_pages": retired,
            "retired_pages_pending": bool(retired_pending) if retired_pending is not None else None,
            "remapped_rows": (RemappedRows(int(remap_cor), int(remap_unc or 0), bool(remap_pending), bool(remap_failure))
                              if remap_cor is not None else None),
            "pcie_replays": int(replays) if replays is not None else None,
            "nvlinks": (), "nvlink_ecc_data_errors": None,
        }
        if gpu.links:
            ecc_total = c[12]
            out["nvlink_ecc_data_errors"] = int(ecc_total) if ecc_total is not None else None
            links = []
            for n, link in enumerate(gpu.links):
                tx, rx = v[2 + 2 * n:4 + 2 * n]
                state, crc, replay, recovery = c[13 + 4 * n:17 + 4 * n]
                if state is None:
                    if tx is None:
                        continue  # a link slot this GPU does not have after all
                    # a driver without the state field (NVML_FI_DEV_NVLINK_GET_STATE): a missing state is unknown,
                    # not down; the link's own call says
                    state = self._link_state(gpu, link)
                    if state is None:
                        continue  # up or down cannot be told: left out rather than reported down
                # positional, all eight fields, through tuple.__new__: 18 links a GPU, and a named tuple's own __new__
                # is Python (keywords cost four times as much again)
                links.append(_new(NvLinkState, (link, bool(state), tx * 1024 if tx is not None else None,
                                                rx * 1024 if rx is not None else None,
                                                int(crc) if crc is not None else None, None,  # crc_data_errors: not read
                                                int(replay) if replay is not None else None,
                                                int(recovery) if recovery is not None else None)))
            out["nvlinks"] = tuple(links)
            if gpu.link_states:
                gpu.link_turn ^= 1
        return out

    @staticmethod
    def _link_state(gpu: _Gpu, link: int) -> bool | None:
        """A link's state where the field-value batch has none: nvmlDeviceGetNvLinkState, for half the links at each
        sample (even, then odd), so an 18-link GPU stays within the call budget; a link not asked this sample keeps
        the state read one sample before, and a link never read yet is asked at once. None: cannot be told (the call
        failed, or NotSupported, which is then not asked again for this handle and link)."""
        known = gpu.link_states
        if link % 2 != gpu.link_turn and link in known:
            return known[link]
        state = gpu.call("nvmlDeviceGetNvLinkState", gpu.handle, link)
        if state is None:
            known.pop(link, None)
            return None
        known[link] = bool(state)
        return known[link]

    def _gpm(self, gpu: _Gpu) -> dict[str, float]:
        """SM, tensor, DRAM, graphics-engine and PCIe activity between this sample and the last (Hopper and newer)."""
        if not gpu.gpm:
            return {}
        sample = gpu.gpm[gpu.gpm_turn]
        if gpu.call("nvmlGpmSampleGet", gpu.handle, sample, what="gpm") is None:
            gpu.gpm_have_previous = False
            return {}
        previous = gpu.gpm[1 - gpu.gpm_turn]
        ready = gpu.gpm_have_previous
        gpu.gpm_have_previous, gpu.gpm_turn = True, 1 - gpu.gpm_turn
        if not ready:
            return {}  # activity needs two samples: from the next read on
        return self._gpm_metrics(gpu, previous, sample, GPM_METRICS)

    def _gpm_metrics(self, gpu: _Gpu, first: Any, second: Any, metrics: tuple) -> dict[str, float]:
        lib = self.lib
        request = lib.c_nvmlGpmMetricsGet_t()
        request.version = lib.NVML_GPM_METRICS_GET_VERSION
        wanted = self._gpm_wanted[metrics]
        request.numMetrics = len(wanted)
        request.sample1, request.sample2 = first, second
        for i, (metric_id, _) in enumerate(wanted):
            request.metrics[i].metricId = metric_id
        if gpu.call("nvmlGpmMetricsGet", request) is None:
            return {}
        out = {}
        for i, (_, field) in enumerate(wanted):
            if request.metrics[i].nvmlReturn == lib.NVML_SUCCESS:
                value = float(request.metrics[i].value)
                out[field] = value * 2**20 if field.startswith("pcie_") else value / 100.0  # PCIe in MiB/s, the rest percent
        return out

    def _fabric(self, gpu: _Gpu) -> FabricState | None:
        lib = self.lib
        if gpu.static.get("no_fabric"):
            return None
        calls = gpu.fabric_calls
        if calls is None:
            calls = gpu.fabric_calls = self._fabric_calls
        while True:
            if not calls:  # this driver has no fabric call this binding can make: not asked again for this handle
                gpu.static["no_fabric"] = True
                return None
            name, struct_type = calls[0]
            info = struct_type()
            gpu.declined = None
            if gpu.call(name, gpu.handle, ctypes.byref(info), optional=True) is not None:
                break
            if gpu.declined is None:  # NotSupported (no fabric: not asked again), or an error of this sample
                gpu.static["no_fabric"] = name in gpu._refused
                return None
            # refused: the next struct, or the older call; a function the driver lacks is not tried with another struct
            calls = gpu.fabric_calls = tuple(
                c for c in calls[1:] if not (gpu.declined == "FunctionNotFound" and c[0] == name))
        state = int(info.state)
        if state == lib.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED:  # no NVSwitch fabric: not asked again for this handle
            gpu.static["no_fabric"] = True
            return None
        states, summary = self._fabric_names
        status = None
        if state == lib.NVML_GPU_FABRIC_STATE_COMPLETED:
            status = "success" if int(info.status) == lib.NVML_SUCCESS else reason_of(lib.NVMLError(int(info.status)))
        mask = int(getattr(info, "healthMask", 0))
        shift, width = lib.NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_DEGRADED_BW, lib.NVML_GPU_FABRIC_HEALTH_MASK_WIDTH_DEGRADED_BW
        degraded = (mask >> shift) & width
        return FabricState(
            state=states.get(state, f"state_{state}"), status=status, clique_id=int(info.cliqueId),
            health=summary.get(int(getattr(info, "healthSummary", 0))),
            degraded_bandwidth={lib.NVML_GPU_FABRIC_HEALTH_MASK_DEGRADED_BW_TRUE: True,
                                lib.NVML_GPU_FABRIC_HEALTH_MASK_DEGRADED_BW_FALSE: False}.get(degraded),
        )

    def _processes(self, gpu: _Gpu) -> tuple[GpuProcess, ...]:
        procs = gpu.call("nvmlDeviceGetComputeRunningProcesses", gpu.handle, what="processes") or []
        if not procs:
            return ()
        # Utilisation samples since the previous read; none (NotFound) when the processes were idle.
        samples = gpu.call("nvmlDeviceGetProcessUtilization", gpu.handle, gpu.util_since, what="process_utilization") or []
        util = {int(s.pid): s for s in samples}
        if samples:
            gpu.util_since = max(int(s.timeStamp) for s in samples)
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)  # None when the driver hides it (no permission)
            if used is None:
                gpu.hide("process_memory:no_permission", "usedGpuMemory")
            u = util.get(int(p.pid))
            out.append(GpuProcess(
                pid=int(p.pid), used_memory_bytes=int(used) if used is not None else None,
                sm_utilization_ratio=u.smUtil / 100.0 if u is not None else None,
                memory_utilization_ratio=u.memUtil / 100.0 if u is not None else None,
            ))
        return tuple(out)

    def _mig(self, gpu: _Gpu) -> tuple[bool | None, tuple[MigInstance, ...]]:
        """MIG mode and instances: the instances as listed (see the module's docstring for when they are listed
        again), with this sample's memory and GPM activity."""
        c, h = gpu.call, gpu.handle
        mode = c("nvmlDeviceGetMigMode", h)  # (current, pending); NotSupported before Ampere
        if mode is None:  # refused (then for good), or this sample's error: what is listed stays for the next
            return None, ()
        current = int(mode[0])
        if current != gpu.mig_mode:
            if gpu.mig_mode != _MIG_UNREAD:  # what the GPU answers depends on its mode
                log.info("GPU %d: MIG mode %s; its instances are listed again", gpu.index, "on" if current else "off")
                gpu.forget_refusals()
            gpu.mig_mode, gpu.mig_list = current, None
            gpu.drop_mig_gpm()
        if not current:
            return False, ()
        listed = not gpu.mig_list or self.clock() >= gpu.mig_due  # none listed yet (or none there): asked each sample
        entries = self._mig_listing(gpu) if listed else gpu.mig_list
        memory: dict[str, Any] = {}
        for entry in entries:
            gpu.failed = None
            memory[entry.uuid] = c("nvmlDeviceGetMemoryInfo", entry.handle)
            if gpu.failed is not None and gpu.failed not in _MIG_KEPT and not listed:
                # the instance went (NotFound, InvalidArgument) or its handle is stale: list them now, once
                listed, entries = True, self._mig_listing(gpu)
                for again in entries:
                    if memory.get(again.uuid) is None:
                        memory[again.uuid] = c("nvmlDeviceGetMemoryInfo", again.handle)
                break
        activity: dict[int | None, dict[str, float]] = {}
        if gpu.static.get("gpm"):
            for entry in entries:
                gi = entry.gpu_instance
                if gi is not None and gi not in activity:  # GPM is per GPU instance: once for its compute instances
                    activity[gi] = self._mig_gpm(gpu, gi)
        instances = []
        for entry in entries:
            mem = memory.get(entry.uuid)
            instances.append(MigInstance(
                uuid=entry.uuid, gpu_instance=entry.gpu_instance, compute_instance=entry.compute_instance,
                profile=entry.profile,
                memory_used_bytes=_int(getattr(mem, "used", None)),
                memory_free_bytes=_int(getattr(mem, "free", None)),
                memory_total_bytes=_int(getattr(mem, "total", None)),
                **activity.get(entry.gpu_instance, {}),
            ))
        return True, tuple(instances)

    def _mig_listing(self, gpu: _Gpu) -> list[_MigEntry]:
        """The GPU's MIG instances and what does not change while each lives, kept until MIG_RELIST_S from now
        (until the next sample if a value could not be read); GPM samples of GPU instances that went are given back.
        An instance listed before (the same UUID) keeps what was read of it: a listing costs a handle and a UUID
        per instance, and its name and ids only for a new one."""
        c, h = gpu.call, gpu.handle
        if gpu.mig_slots is None:
            gpu.mig_slots = c("nvmlDeviceGetMaxMigDeviceCount", h)
        known = {e.uuid: e for e in gpu.mig_list or () if e.whole}
        entries: list[_MigEntry] = []
        for i in range(gpu.mig_slots or 0):
            mig = c("nvmlDeviceGetMigDeviceHandleByIndex", h, i, what="mig_instances")
            if mig is None:  # a slot with no instance in it, or hidden
                continue
            gpu.failed = None
            uuid = _text(c("nvmlDeviceGetUUID", mig))
            whole = gpu.failed is None or gpu.failed in _MIG_KEPT  # False: failed now, not refused; read again soon
            old = known.get(uuid) if uuid else None
            if old is not None:
                entries.append(_MigEntry(mig, old.uuid, old.gpu_instance, old.compute_instance, old.profile, True))
                continue
            values = []
            for function in ("nvmlDeviceGetName", "nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId"):
                gpu.failed = None
                values.append(c(function, mig))
                whole = whole and (gpu.failed is None or gpu.failed in _MIG_KEPT)
            name = _text(values[0]) or ""
            profile = name.rpartition(" MIG ")[2] if " MIG " in name else name  # "... MIG 1g.10gb" -> "1g.10gb"
            entries.append(_MigEntry(mig, uuid or f"mig-{i}", values[1], values[2], profile, whole))
        # GPM samples: given back for GPU instances that went; started over for one made anew under the same id
        before: dict[int | None, set[str]] = {}
        after: dict[int | None, set[str]] = {}
        for old in gpu.mig_list or ():
            before.setdefault(old.gpu_instance, set()).add(old.uuid)
        for new in entries:
            after.setdefault(new.gpu_instance, set()).add(new.uuid)
        gpu.drop_mig_gpm({gi for gi in after if gi is not None})
        for gi, kept in gpu.mig_gpm.items():
            if gi in before and not before[gi] & after[gi]:
                kept[1] = False
        gpu.mig_list = entries
        gpu.mig_due = self.clock() + (MIG_RELIST_S if all(e.whole for e in entries) else 0.0)
        return entries

    def _mig_gpm(self, gpu: _Gpu, gi: int) -> dict[str, float]:
        entry = gpu.mig_gpm.get(gi)
        if entry is None:
            buffers = self._gpm_buffers(gpu)
            if not buffers:
                return {}
            entry = gpu.mig_gpm[gi] = [buffers, False, 0]
        buffers, ready, turn = entry
        gpu.failed = None
        if gpu.call("nvmlGpmMigSampleGet", gpu.handle, gi, buffers[turn], what="mig_activity") is None:
            entry[1] = False
            if gpu.failed is not None and gpu.failed not in _MIG_KEPT:
                gpu.mig_due = float("-inf")  # the GPU instance may have gone: listed again at the next sample
            return {}
        entry[1], entry[2] = True, 1 - turn
        return self._gpm_metrics(gpu, buffers[1 - turn], buffers[turn], MIG_GPM_METRICS) if ready else {}

    # -- PCIe throughput off the sampler's path ---------------------------------------------------
    def _pcie_loop(self) -> None:
        """nvmlDeviceGetPcieThroughput blocks ~20 ms per call: read it here, for GPUs without GPM."""
        lib = self.lib
        while not self._stop.wait(self._pcie_interval_s):
            for gpu in list(self._gpus.values()):
                if not gpu.static.get("pcie_from_thread") or gpu.index in self._down:
                    continue
                try:
                    tx = lib.nvmlDeviceGetPcieThroughput(gpu.handle, lib.NVML_PCIE_UTIL_TX_BYTES)
                    rx = lib.nvmlDeviceGetPcieThroughput(gpu.handle, lib.NVML_PCIE_UTIL_RX_BYTES)
                except (lib.NVMLError, *self.errors.library_mismatch):
                    self._pcie.pop(gpu.index, None)
                    continue
                self._pcie[gpu.index] = (tx * 1024.0, rx * 1024.0)  # KB/s


def _decode(masks: dict[int, int], kind: int, ret: int, raw: int) -> float | None:
    """One field value from its value type, return code and the 8 bytes of its union read as an unsigned integer."""
    mask = masks.get(kind) if ret == 0 else None
    if mask is None:
        return None
    if mask > 0:
        return float(raw & mask)
    if mask == 0:
        return _DOUBLE.unpack(_U64.pack(raw))[0]
    if mask == -1:  # signed 64-bit
        return float(raw - (1 << 64) if raw >> 63 else raw)
    raw &= 0xFFFFFFFF  # signed 32-bit
    return float(raw - (1 << 32) if raw >> 31 else raw)


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


def _scaled(value: Any, factor: float) -> float | None:
    return value * factor if value is not None else None
