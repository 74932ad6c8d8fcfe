"""The per-GPU verdict: healthy, degraded or unhealthy, with reasons."""

from __future__ import annotations

import pytest

from agent.gpu.health import verdict
from agent.gpu.state import GpuState, NvLinkState, PcieState, RemappedRows


def gpu(**kw) -> GpuState:
    return GpuState(**{"index": 0, "uuid": "GPU-x", "utilization_ratio": 0.9, "temperature_celsius": 60.0,
                       "temperature_slowdown_celsius": 87.0, **kw})


def test_a_quiet_gpu_is_healthy():
    assert verdict(gpu(clock_event_mask=0x1, pcie=PcieState(generation=5, generation_max=5, width=16, width_max=16))).state == "healthy"


@pytest.mark.parametrize(
    "state, xids, expected, reason",
    [
        (GpuState(index=0, uuid="g", up=False), None, "unhealthy", "gpu_lost"),
        (gpu(), {79: 1}, "unhealthy", "xid_79"),
        (gpu(), {13: 4}, "degraded", "xid_13"),  # usually the application: worth a look, not a page
        (gpu(ecc_errors={("uncorrected", "volatile"): 1}), None, "unhealthy", "ecc_uncorrected"),
        (gpu(ecc_errors={("uncorrected", "aggregate"): 3, ("uncorrected", "volatile"): 0}), None, "healthy", None),
        (gpu(remapped_rows=RemappedRows(0, 1, False, True)), None, "unhealthy", "row_remap_failed"),
        (gpu(remapped_rows=RemappedRows(0, 1, True, False)), None, "degraded", "row_remap_pending"),
        (gpu(clock_event_mask=0x40), None, "degraded", "hw_thermal_slowdown"),
        (gpu(clock_event_mask=0x4), None, "healthy", None),  # a power cap the operator set is not a fault
        (gpu(temperature_celsius=83.0), None, "degraded", "temperature_near_slowdown"),
        (gpu(temperature_celsius=81.0), None, "healthy", None),
        (gpu(pcie=PcieState(width=8, width_max=16)), None, "degraded", "pcie_width_degraded"),
        (gpu(pcie=PcieState(generation=3, generation_max=5)), None, "degraded", "pcie_generation_degraded"),
        (GpuState(index=0, uuid="g", utilization_ratio=0.0, pcie=PcieState(generation=1, generation_max=5)), None, "healthy", None),
        (gpu(nvlinks=(NvLinkState(0, True), NvLinkState(1, False))), None, "degraded", "nvlink_down"),
    ],
)
def test_verdicts(state, xids, expected, reason):
    v = verdict(state, xids)
    assert v.state == expected
    if reason:
        assert reason in v.reasons
    else:
        assert v.reasons == ()


def test_unhealthy_lists_the_lesser_reasons_too():
    v = verdict(gpu(clock_event_mask=0x40), {48: 1})
    assert v.state == "unhealthy" and v.reasons == ("xid_48", "hw_thermal_slowdown")
