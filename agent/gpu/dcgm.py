"""`--compat dcgm`: dcgm-exporter's metrics as it writes them, so dashboards built on it keep working.

"As it writes them" is read from dcgm-exporter 4.5.3-4.8.2 (its etc/default-counters.csv is
tests/agent/fixtures/dcgm-default-counters.csv; internal/pkg/collector/gpu_collector.go and
internal/pkg/rendermetrics/render_metrics.go) and from DCGM's dcgmlib/src/dcgm_fields.cpp:
- names, types and help text of its default counters. Its counters have no `_total`; the fast renderer types
  them counter as it does (promtool objects to the suffix), prometheus_client can only call them untyped.
- values: "%d" for DCGM's integer fields (MiB, MHz, C, %, mJ, counts), "%f" for its doubles (W, DCP ratios),
  converted as DCGM converts (MiB truncated, like its integer division).
- labels gpu, UUID, pci_bus_id, device, modelName, Hostname, DCGM_FI_DRIVER_VERSION; on the XID field also
  err_code and err_msg, dcgm-exporter's own text for the code. (Our renderer sorts labels; Prometheus does not care.)
- MIG: dcgm-exporter's default device option ("f") watches a MIG GPU's GPU instances instead of the GPU, each
  series labelled GPU_I_PROFILE and GPU_I_ID. DCGM gives an instance its own memory and DCP activity, the
  parent's value for device-wide fields (clocks, temperatures, power, errors), and no NVML utilisation.
  We do the same, and leave out the DCP fields the agent has only for the whole GPU. On a whole GPU's series
  the two labels are empty, which Prometheus treats as absent.
- Kubernetes: where the agent reads the kubelet's PodResources API (agent/kubernetes.py), every series also has
  dcgm-exporter's pod, namespace and container labels (internal/pkg/transformation/const.go), those of the
  container holding that GPU or GPU instance, empty where none (or several) does.
Not emitted: DCGM_FI_DEV_VGPU_LICENSE_STATUS (vGPU licensing; the agent does not read vGPUs), and
DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL unless the caller keeps an NvLinkBandwidth (DCGM's value is a rate over two reads).
Like dcgm-exporter, the XID field is the last XID code seen (fleetscope_gpu_xid_errors_total counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

from agent.gpu.state import GpuState, MigInstance
from agent.sources.base import Family, Reading

LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID", "Hostname",
          "DCGM_FI_DRIVER_VERSION")
XID = "DCGM_FI_DEV_XID_ERRORS"
XID_LABELS = LABELS + ("err_code", "err_msg")
NVLINK_BANDWIDTH = "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"
MIB = 1024 * 1024
INT, DOUBLE = True, False  # DCGM_FT_INT64 fields print as "%d", DCGM_FT_DOUBLE ones as "%f"


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # dcgm-exporter's type
    help: str
    integer: bool
    gpu: Callable[[GpuState], float | None]
    # The value on a MIG instance's series; None where that series has none.
    instance: Callable[[GpuState, MigInstance], float | None] | None


def _device(name: str, kind: str, help_: str, integer: bool, get: Callable[[GpuState], float | None]) -> _Field:
    """A device-wide field: DCGM gives a MIG instance its parent GPU's value."""
    return _Field(name, kind, help_, integer, get, lambda g, m: get(g))


def _gpu_only(name: str, kind: str, help_: str, integer: bool, get: Callable[[GpuState], float | None]) -> _Field:
    """No series for a MIG instance: DCGM has none (NVML utilisations) or one the agent does not read."""
    return _Field(name, kind, help_, integer, get, None)


def _own(name: str, kind: str, help_: str, integer: bool, get: Callable[[GpuState], float | None],
         get_instance: Callable[[MigInstance], float | None]) -> _Field:
    """A MIG instance has its own value."""
    return _Field(name, kind, help_, integer, get, lambda g, m: get_instance(m))


def _round(value: float | None, scale: float = 1) -> int | None:
    return round(value * scale) if value is not None else None


def _pct(ratio: float | None) -> int | None:
    return _round(ratio, 100)  # NVML's utilisations are whole percents; round away the ratio's float error


def _mib(value: int | None) -> int | None:
    return value // MIB if value is not None else None


def _mhz(hertz: float | None) -> int | None:
    return _round(hertz, 1e-6)


def _last_xid(g: GpuState) -> int | None:
    # dcgm-exporter reports 0 ("No Error") until an XID happens.
    if g.xid_counts is None:
        return None
    return g.last_xid or 0


_FIELDS = (
    # dcgm-exporter's default counters, in its order (DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL: see NvLinkBandwidth)
    _device("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", INT, lambda g: _mhz(g.sm_clock_hertz)),
    _device("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", INT, lambda g: _mhz(g.memory_clock_hertz)),
    _device("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", INT, lambda g: _round(g.memory_temperature_celsius)),
    _device("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", INT, lambda g: _round(g.temperature_celsius)),
    _device("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", DOUBLE, lambda g: g.power_watts),
    _device("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ).", INT,
            lambda g: _round(g.energy_joules, 1000)),
    _device("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.", INT,
            lambda g: g.pcie.replays if g.pcie else None),
    _gpu_only("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", INT, lambda g: _pct(g.utilization_ratio)),
    _gpu_only("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", INT, lambda g: _pct(g.memory_utilization_ratio)),
    _gpu_only("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", INT, lambda g: _pct(g.encoder_utilization_ratio)),
    _gpu_only("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", INT, lambda g: _pct(g.decoder_utilization_ratio)),
    _device(XID, "gauge", "Value of the last XID error encountered.", INT, _last_xid),
    _own("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", INT,
         lambda g: _mib(g.memory_free_bytes), lambda m: _mib(m.memory_free_bytes)),
    _own("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", INT,
         lambda g: _mib(g.memory_used_bytes), lambda m: _mib(m.memory_used_bytes)),
    _gpu_only("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).", INT, lambda g: _mib(g.memory_reserved_bytes)),
    _device("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors", INT,
            lambda g: g.remapped_rows.uncorrectable if g.remapped_rows else None),
    _device("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors", INT,
            lambda g: g.remapped_rows.correctable if g.remapped_rows else None),
    _device("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed", INT,
            lambda g: int(g.remapped_rows.failure) if g.remapped_rows else None),
    _own("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active.", DOUBLE,
         lambda g: g.gr_engine_activity_ratio, lambda m: m.gr_engine_activity_ratio),
    _gpu_only("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active.", DOUBLE,
              lambda g: g.tensor_activity_ratio),
    _gpu_only("DCGM_FI_PROF_DRAM_ACTIVE", "gauge",
              "Ratio of cycles the device memory interface is active sending or receiving data.", DOUBLE,
              lambda g: g.dram_activity_ratio),
    # NVML's PCIe throughput (sampled over 20 ms) stands in for DCGM's DCP counter of the same rate.
    _gpu_only("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge", "The rate of data transmitted over the PCIe bus - including both "
              "protocol headers and data payloads - in bytes per second.", INT,
              lambda g: _round(g.pcie.tx_bytes_per_second) if g.pcie else None),
    _gpu_only("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge", "The rate of data received over the PCIe bus - including both "
              "protocol headers and data payloads - in bytes per second.", INT,
              lambda g: _round(g.pcie.rx_bytes_per_second) if g.pcie else None),
    # Fields dcgm-exporter ships commented out in its CSVs; dashboards that enabled them find them here.
    _device("DCGM_FI_DEV_POWER_MGMT_LIMIT", "gauge", "Power management limit (in W).", DOUBLE,
            lambda g: g.power_management_limit_watts),
    _device("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", "Current clock throttle reasons (bitmask).", INT,
            lambda g: g.clock_event_mask),
    _device("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors.", INT,
            lambda g: g.ecc_errors.get(("corrected", "volatile"))),
    _device("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.", INT,
            lambda g: g.ecc_errors.get(("uncorrected", "volatile"))),
    _device("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "counter", "Total number of single-bit persistent ECC errors.", INT,
            lambda g: g.ecc_errors.get(("corrected", "aggregate"))),
    _device("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "counter", "Total number of double-bit persistent ECC errors.", INT,
            lambda g: g.ecc_errors.get(("uncorrected", "aggregate"))),
    _own("DCGM_FI_PROF_SM_ACTIVE", "gauge", "The ratio of cycles an SM has at least 1 warp assigned.", DOUBLE,
         lambda g: g.sm_activity_ratio, lambda m: m.sm_activity_ratio),
    _gpu_only("DCGM_FI_PROF_SM_OCCUPANCY", "gauge", "The ratio of number of warps resident on an SM.", DOUBLE,
              lambda g: g.sm_occupancy_ratio),
    _gpu_only("DCGM_FI_PROF_PIPE_FP64_ACTIVE", "gauge", "Ratio of cycles the fp64 pipes are active.", DOUBLE,
              lambda g: g.fp64_activity_ratio),
    _gpu_only("DCGM_FI_PROF_PIPE_FP32_ACTIVE", "gauge", "Ratio of cycles the fp32 pipes are active.", DOUBLE,
              lambda g: g.fp32_activity_ratio),
    _gpu_only("DCGM_FI_PROF_PIPE_FP16_ACTIVE", "gauge", "Ratio of cycles the fp16 pipes are active.", DOUBLE,
              lambda g: g.fp16_activity_ratio),
)

POD_LABELS = ("pod", "namespace", "container")


def _families(extra: tuple[str, ...] = ()) -> tuple[Family, ...]:
    return (
        *(Family(f.name, f.kind, f.help, (XID_LABELS if f.name == XID else LABELS) + extra, "%d" if f.integer else "%f")
          for f in _FIELDS),
        Family(NVLINK_BANDWIDTH, "counter", "Total number of NVLink bandwidth counters for all lanes.", LABELS + extra, "%d"),
    )


FAMILIES = _families()
POD_FAMILIES = _families(POD_LABELS)  # on Kubernetes


class NvLinkBandwidth:
    """DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL as DCGM computes it: a rate, whatever dcgm-exporter's "counter" says.

    DCGM reads NVML's NVLink throughput counters (KiB) of all links, rx plus tx, and divides the increase since
    its previous read by the seconds between the reads and by 1000: roughly MB/s, truncated to an integer
    (DcgmCacheManager::ReadAndCacheNvLinkBandwidth). A GPU's first read gives 0, as in DCGM. It needs the
    previous read and the time between, which a GpuState does not carry, so the GPU source keeps one of these.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}  # uuid -> (time, KiB)

    def update(self, states: Iterable[GpuState], now: float) -> dict[str, int]:
        """Each GPU's rate since the last update, by uuid; GPUs without NVLink counters are left out."""
        rates = {}
        for g in states:
            kib = _nvlink_kib(g)
            if kib is None:
                continue
            last = self._last.get(g.uuid)
            self._last[g.uuid] = (now, kib)
            if last is None or now <= last[0] or kib < last[1]:
                rates[g.uuid] = 0  # nothing to difference against yet, or the counters restarted
            else:
                rates[g.uuid] = int((kib - last[1]) / (now - last[0]) / 1000)
        return rates


def _nvlink_kib(g: GpuState) -> float | None:
    counted = [n for link in g.nvlinks for n in (link.tx_bytes, link.rx_bytes) if n is not None]
    return sum(counted) / 1024 if counted else None


def dcgm_readings(states: Iterable[GpuState], hostname: str, driver: str,
                  nvlink_bandwidth: Mapping[str, int] | None = None,
                  pod_labels: Callable[[GpuState, MigInstance | None], tuple] | None = None) -> Iterator[Reading]:
    """dcgm-exporter's series for these GPUs; `nvlink_bandwidth` is NvLinkBandwidth.update's result, if kept;
    `pod_labels(gpu, instance or None)` gives a series' pod, namespace and container on Kubernetes."""
    for g in states:
        if not g.up:
            continue  # dcgm-exporter drops a GPU it cannot read
        gpu = (("gpu", str(g.index)), ("UUID", g.uuid), ("pci_bus_id", g.pci_bus_id or ""), ("device", f"nvidia{g.index}"),
               ("modelName", g.name or ""), ("Hostname", hostname), ("DCGM_FI_DRIVER_VERSION", driver))
        entities: list[tuple[MigInstance | None, tuple]] = [
            (m, gpu + (("GPU_I_PROFILE", m.profile), ("GPU_I_ID", "" if m.gpu_instance is None else str(m.gpu_instance))))
            for m in g.mig_instances] or [(None, gpu)]
        if pod_labels is not None:
            entities = [(m, labels + pod_labels(g, m)) for m, labels in entities]
        for f in _FIELDS:
            for m, labels in entities:
                value = f.gpu(g) if m is None else f.instance(g, m) if f.instance else None
                if value is None:
                    continue
                if f.name == XID:
                    labels = labels + (("err_code", str(value)), ("err_msg", xid_message(value)))
                yield Reading(f.name, float(value), labels)
        rate = nvlink_bandwidth.get(g.uuid) if nvlink_bandwidth else None
        if rate is not None:
            for _, labels in entities:
                yield Reading(NVLINK_BANDWIDTH, float(rate), labels)


def xid_message(code: int) -> str:
    """dcgm-exporter's err_msg for an XID code."""
    return _XID_MESSAGES.get(code, "Unknown Error")


# dcgm-exporter's text for each XID code (internal/pkg/collector/xid_errors.go at 4.5.3-4.8.2, Apache-2.0,
# after NVIDIA's XID catalogue), kept verbatim, typos included, because dashboards match on it.
_XID_MESSAGES = {
    0: "No Error", 1: "Invalid or corrupted push buffer stream", 2: "Invalid or corrupted push buffer stream",
    3: "Invalid or corrupted push buffer stream", 4: "Invalid or corrupted push buffer stream", 5: "Unused",
    6: "Invalid or corrupted push buffer stream", 7: "Invalid or corrupted push buffer address",
    8: "GPU stopped processing", 9: "Driver error programming GPU", 10: "Unused",
    11: "Invalid or corrupted push buffer stream", 12: "Driver error handling GPU exception",
    13: "Graphics Engine Exception", 14: "Unused", 15: "Unused", 16: "Display engine hung", 17: "Unused",
    18: "Bus mastering disabled in PCI Config Space", 19: "Display Engine error",
    20: "Invalid or corrupted Mpeg push buffer", 21: "Invalid or corrupted Motion Estimation push buffer",
    22: "Invalid or corrupted Video Processor push buffer", 23: "Unused", 24: "GPU semaphore timeout",
    25: "Invalid or illegal push buffer stream", 26: "Framebuffer timeout", 27: "Video processor exception",
    28: "Video processor exception", 29: "Video processor exception", 30: "GPU semaphore access error",
    31: "GPU memory page fault", 32: "Invalid or corrupted push buffer stream", 33: "Internal micro-controller error",
    34: "Video processor exception", 35: "Video processor exception", 36: "Video processor exception",
    37: "Driver firmware error", 38: "Driver firmware error", 39: "Unused", 40: "Unused", 41: "Unused",
    42: "Video processor exception", 43: "GPU stopped processing", 44: "Graphics Engine fault during context switch",
    45: "Preemptive cleanup, due to previous errors -- Most likely to see when running multiple cuda",
    46: "GPU stopped processing", 47: "Video processor exception", 48: "Double Bit ECC Error", 49: "Unused",
    50: "Unused", 51: "Unused", 52: "Unused", 53: "Unused", 54: "Auxiliary power is not connected to the GPU board",
    55: "Unused", 56: "Display Engine error", 57: "Error programming video memory interface",
    58: "Unstable video memory interface detected", 59: "Internal micro-controller error",
    60: "Video processor exception", 61: "Internal micro-controller breakpoint/warning",
    62: "Internal micro-controller halt", 63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure", 65: "Video processor exception",
    66: "Illegal access by driver", 67: "Illegal access by driver", 68: "NVDEC0 Exception",
    69: "Graphics Engine class error", 70: "CE3: Unknown Error", 71: "CE4: Unknown Error", 72: "CE5: Unknown Error",
    73: "NVENC2 Error", 74: "NVLINK Error", 75: "CE6: Unknown Error", 76: "CE7: Unknown Error",
    77: "CE8: Unknown Error", 78: "vGPU Start Error", 79: "GPU has fallen off the bus",
    80: "Corrupted data sent to GPU", 81: "VGA Subsystem Error", 82: "NVJPG0 Error", 83: "NVDEC1 Error",
    84: "NVDEC2 Error", 85: "CE9: Unknown Error", 86: "OFA Exception", 87: "Reserved", 88: "NVDEC3 Error",
    89: "NVDEC4 Error", 90: "Reserved", 91: "Reserved", 92: "High single-bit ECC error rate",
    93: "Non-fatal violation of provisioned InfoROM wear limit", 94: "Contained ECC error",
    95: "Uncontained ECC error", 96: "NVDEC5 Error", 97: "NVDEC6 Error", 98: "NVDEC7 Error", 99: "NVJPG1 Error",
    100: "NVJPG2 Error", 101: "NVJPG3 Error", 102: "NVJPG4 Error", 103: "NVJPG5 Error", 104: "NVJPG6 Error",
    105: "NVJPG7 Error", 106: "SMBPBI Test Message", 107: "SMBPBI Test Message Silent", 108: "Reserved",
    109: "Context Switch Timeout Error", 110: "Security Fault Error", 111: "Display Bundle Error Event",
    112: "Display Supervisor Error", 113: "DP Link Training Error", 114: "Display Pipeline Underflow Error",
    115: "Display Core Channel Error", 116: "Display Window Channel Error", 117: "Display Cursor Channel Error",
    118: "Display Pixel Pipeline Error", 119: "GSP RPC Timeout", 120: "GSP Error", 121: "C2C Link Error",
    122: "SPI PMU RPC Read Failure", 123: "SPI PMU RPC Write Failure", 124: "SPI PMU RPC Erase Failure",
    125: "Inforom FS Failure", 126: "Robust Channel CE10 Error", 127: "Robust Channel CE11 Error",
    128: "Robust Channel CE12 Error", 129: "Robust Channel CE13 Error", 130: "Robust Channel CE14 Error",
    131: "Robust Channel CE15 Error", 132: "Robust Channel CE16 Error", 133: "Robust Channel CE17 Error",
    134: "Robust Channel CE18 Error", 135: "Robust Channel CE19 Error", 136: "ALI Training Fail",
    137: "NVLink Privilege Error", 138: "Robust Channel DLA Error", 139: "Robust Channel OFA1 Error",
    140: "Unrecovered ECC Error", 141: "Robust Channel Fast Path Error", 142: "Robust Channel NVENVC3 Error",
    143: "GPU Initialization Failure", 144: "NVLINK: Saw Error", 145: "NVLINK: RLW Error", 146: "NVLINK: TLW Error",
    147: "NVLINK: TREX Error", 148: "NVLINK: NVLPW_CTRL Error", 149: "NVLINK: NETIR Error", 150: "NVLINK: MSE Error",
    151: "Robust Channel Key rotation Error", 152: "Robust Channel DLA SMMU Error",
    153: "Robust Channel DLA timeout Error", 154: "GPU Recovery Action Changed", 155: "NVLINK: SW Defined Error",
    156: "Resource Retirement Event", 157: "Resource Retirement Failure", 158: "GPU Fatal Timeout",
    159: "Robust Channel CHI Non-Data Error", 160: "Channel Retirement Event", 161: "Channel Retirement Failure",
    162: "Power Smoothing HW Circuitry Reengaged", 163: "Power Smoothing HW Circuitry Disengaged",
    164: "Power Smoothing HW Circuitry Low Lifetime", 165: "Power Smoothing HW Circuitry Lifetime Exhausted",
    166: "NVLINK Secure Crypto Error", 167: "PCIE Fatal Timeout",
    168: "Reduced GPU Memory Capacity (Errors found in write protection region)",
    169: "Internal micro-controller halt", 170: "NVLINK: Interrupt seen in CC mode", 171: "Uncorrectable DRAM Error",
    172: "Uncorrectable SRAM Error",
}
