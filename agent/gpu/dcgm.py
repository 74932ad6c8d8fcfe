"""`--compat dcgm`: dcgm-exporter's metric names, units and labels, so existing dashboards keep working.

dcgm-exporter exposes cumulative fields as counters without a `_total` suffix, which the
exposition format's linters refuse; we keep its exact names and type those fields "untyped",
which PromQL's rate() and increase() accept the same way. Like dcgm-exporter, the XID field is
the last XID code seen (use fleetscope_gpu_xid_errors_total to count repeats).
"""

from __future__ import annotations

from typing import Iterable

from agent.gpu.state import GpuState
from agent.sources.base import Family, Reading, reading

LABELS = ("gpu", "UUID", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION", "pci_bus_id")
MIB = 1024 * 1024

# (dcgm name, kind, help, function of GpuState -> value or None)
_FIELDS = (
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g: _pct(g.utilization_ratio)),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", lambda g: _pct(g.memory_utilization_ratio)),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", lambda g: _mib(g.memory_used_bytes)),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", lambda g: _mib(g.memory_free_bytes)),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).", lambda g: _mib(g.memory_reserved_bytes)),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g: g.temperature_celsius),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", lambda g: g.memory_temperature_celsius),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g: g.power_watts),
    ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "gauge", "Power management limit (in W).", lambda g: g.power_management_limit_watts),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "untyped", "Total energy consumption since boot (in mJ).",
     lambda g: g.energy_joules * 1000 if g.energy_joules is not None else None),
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g: _mhz(g.sm_clock_hertz)),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", lambda g: _mhz(g.memory_clock_hertz)),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "untyped", "Total number of PCIe retries.", lambda g: g.pcie.replays if g.pcie else None),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", "Current clock throttle reasons (bitmask).", lambda g: g.clock_event_mask),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "untyped", "Total number of single-bit volatile ECC errors.",
     lambda g: g.ecc_errors.get(("corrected", "volatile"))),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "untyped", "Total number of double-bit volatile ECC errors.",
     lambda g: g.ecc_errors.get(("uncorrected", "volatile"))),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "untyped", "Total number of single-bit persistent ECC errors.",
     lambda g: g.ecc_errors.get(("corrected", "aggregate"))),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "untyped", "Total number of double-bit persistent ECC errors.",
     lambda g: g.ecc_errors.get(("uncorrected", "aggregate"))),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "untyped", "Number of remapped rows for correctable errors.",
     lambda g: g.remapped_rows.correctable if g.remapped_rows else None),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "untyped", "Number of remapped rows for uncorrectable errors.",
     lambda g: g.remapped_rows.uncorrectable if g.remapped_rows else None),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed.",
     lambda g: int(g.remapped_rows.failure) if g.remapped_rows else None),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", lambda g: _last_xid(g)),
    ("DCGM_FI_PROF_SM_ACTIVE", "gauge", "The ratio of cycles an SM has at least 1 warp assigned.", lambda g: g.sm_activity_ratio),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "gauge", "The ratio of number of warps resident on an SM.", lambda g: g.sm_occupancy_ratio),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active.", lambda g: g.tensor_activity_ratio),
    ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge", "Ratio of cycles the device memory interface is active.", lambda g: g.dram_activity_ratio),
    ("DCGM_FI_PROF_PIPE_FP16_ACTIVE", "gauge", "Ratio of cycles the fp16 pipes are active.", lambda g: g.fp16_activity_ratio),
    ("DCGM_FI_PROF_PIPE_FP32_ACTIVE", "gauge", "Ratio of cycles the fp32 pipes are active.", lambda g: g.fp32_activity_ratio),
    ("DCGM_FI_PROF_PIPE_FP64_ACTIVE", "gauge", "Ratio of cycles the fp64 pipes are active.", lambda g: g.fp64_activity_ratio),
)

FAMILIES = tuple(Family(name, kind, help_, LABELS) for name, kind, help_, _ in _FIELDS)


def _pct(ratio: float | None) -> float | None:
    return ratio * 100 if ratio is not None else None


def _mib(value: int | None) -> float | None:
    return value / MIB if value is not None else None


def _mhz(hertz: float | None) -> float | None:
    return hertz / 1e6 if hertz is not None else None


def _last_xid(g: GpuState) -> int | None:
    # dcgm-exporter reports 0 until an XID happens.
    if g.xid_counts is None:
        return None
    return g.last_xid or 0


def dcgm_readings(states: Iterable[GpuState], hostname: str, driver: str) -> Iterable[Reading]:
    for g in states:
        if not g.up:
            continue  # dcgm-exporter drops a GPU it cannot read
        labels = {"gpu": g.index, "UUID": g.uuid, "device": f"nvidia{g.index}", "modelName": g.name or "",
                  "Hostname": hostname, "DCGM_FI_DRIVER_VERSION": driver, "pci_bus_id": g.pci_bus_id or ""}
        for name, _, _, get in _FIELDS:
            value = get(g)
            if value is not None:
                yield reading(name, value, **labels)
