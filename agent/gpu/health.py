"""A verdict per GPU (healthy / degraded / unhealthy) with its reasons, from one sample: pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from agent.gpu.state import GpuState, clock_event_names
from agent.gpu.xid import describe

from fleetscope.vocabulary import DEGRADED, HEALTHY, TEMPERATURE_MARGIN_C, TROUBLE_EVENTS, UNHEALTHY
from fleetscope.vocabulary import HEALTH_STATES as STATES

__all__ = ["DEGRADED", "HEALTHY", "STATES", "UNHEALTHY", "XID_WINDOW_S", "Verdict", "verdict"]

XID_WINDOW_S = 3600.0  # an XID keeps its GPU's verdict down this long after it happened


@dataclass(frozen=True)
class Verdict:
    state: str
    reasons: tuple[str, ...]


def verdict(gpu: GpuState, new_xids: dict[int, int] | None = None) -> Verdict:
    """Judge one GPU. `new_xids` are XIDs seen within the recent window the caller keeps."""
    if not gpu.up:
        return Verdict(UNHEALTHY, (gpu.error or "gpu_lost",))
    bad: list[str] = []
    weak: list[str] = []
    for code in sorted(new_xids or {}):
        (bad if describe(code).severity == "page" else weak).append(f"xid_{code}")
    if gpu.ecc_errors.get(("uncorrected", "volatile"), 0) > 0:
        bad.append("ecc_uncorrected")
    rows = gpu.remapped_rows
    if rows is not None and rows.failure:
        bad.append("row_remap_failed")
    if rows is not None and rows.pending:
        weak.append("row_remap_pending")
    if gpu.retired_pages_pending:
        weak.append("page_retirement_pending")
    if gpu.clock_event_mask is not None:
        weak.extend(name for name in clock_event_names(gpu.clock_event_mask) if name in TROUBLE_EVENTS)
    if (gpu.temperature_celsius is not None and gpu.temperature_slowdown_celsius is not None
            and gpu.temperature_celsius >= gpu.temperature_slowdown_celsius - TEMPERATURE_MARGIN_C):
        weak.append("temperature_near_slowdown")
    pcie = gpu.pcie
    if pcie is not None and pcie.width is not None and pcie.width_max is not None and pcie.width < pcie.width_max:
        weak.append("pcie_width_degraded")
    # A lower PCIe generation is normal at idle (the link saves power); only under load is it a fault.
    if (pcie is not None and pcie.generation is not None and pcie.generation_max is not None
            and pcie.generation < pcie.generation_max and (gpu.utilization_ratio or 0) > 0.5):
        weak.append("pcie_generation_degraded")
    if gpu.nvlinks and not any(link.up for link in gpu.nvlinks):
        bad.append("nvlink_all_down")  # e.g. the fabric manager stopped: no peer-to-peer, NCCL fails or crawls
    elif any(not link.up for link in gpu.nvlinks):
        weak.append("nvlink_down")
    fabric = gpu.fabric
    if fabric is not None:
        if fabric.state != "completed":
            bad.append("fabric_not_ready")  # CUDA will not start on an HGX GPU whose fabric registration is not done
        elif fabric.status not in (None, "success"):
            bad.append("fabric_registration_failed")
        if fabric.health == "unhealthy":
            bad.append("fabric_unhealthy")
        elif fabric.health == "limited_capacity" or fabric.degraded_bandwidth:
            weak.append("fabric_degraded_bandwidth")
    if bad:
        return Verdict(UNHEALTHY, tuple(bad + weak))
    if weak:
        return Verdict(DEGRADED, tuple(weak))
    return Verdict(HEALTHY, ())
