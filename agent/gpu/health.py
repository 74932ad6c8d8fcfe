"""A verdict per GPU (healthy / degraded / unhealthy) with its reasons, from one sample: pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from agent.gpu.state import GpuState, clock_event_names
from agent.gpu.xid import describe

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
STATES = (HEALTHY, DEGRADED, UNHEALTHY)
# Clock events that mean something is wrong, as opposed to idling or a power cap the operator set.
TROUBLE_EVENTS = {"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown"}
TEMPERATURE_MARGIN_C = 5.0


@dataclass(frozen=True)
class Verdict:
    state: str
    reasons: tuple[str, ...]


def verdict(gpu: GpuState, new_xids: dict[int, int] | None = None) -> Verdict:
    """Judge one GPU. `new_xids` are XIDs seen within the recent window the caller keeps."""
    if not gpu.up:
        return Verdict(UNHEALTHY, ("gpu_lost",))
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
    if gpu.nvlinks and any(not link.up for link in gpu.nvlinks) and any(link.up for link in gpu.nvlinks):
        weak.append("nvlink_down")
    if bad:
        return Verdict(UNHEALTHY, tuple(bad + weak))
    if weak:
        return Verdict(DEGRADED, tuple(weak))
    return Verdict(HEALTHY, ())
