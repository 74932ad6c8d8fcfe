"""Every probable cause earns its place: each one injected under a slowed rank is ranked first, with its
evidence, and a score that grows with how far past its threshold the evidence is."""

from __future__ import annotations

import polars as pl
import pytest

from bench.traces import Trace, end_ts, generate
from collector.attribution import frame_samples
from collector.findings import analyse
from collector.tables import frame_from_rows
from fleetscope.vocabulary import MEMORY_STALLED_SHARE

SLOW_RANK, NODES = 5, 2  # rank 5 sits on node-000, GPU-trace-5
TRACE = Trace(ranks=16, steps=60, slow_rank=SLOW_RANK, slow_factor=0.12)
THERMAL, POWER_CAP, HW_SLOWDOWN = 0x20 | 0x40, 0x4, 0x8


def frames(steps: pl.DataFrame, gpu_fault: dict | None = None, host_fault=None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """GPU and host frames every 5 s over the trace: healthy, except the slow rank's GPU (`gpu_fault` fields)
    and its node (`host_fault(i)` fields at the i-th sample)."""
    gpus, hosts = [], []
    t0, t1 = float(steps["ts"].min()), end_ts(steps)
    for i, ts in enumerate(t0 + 5 * k for k in range(int((t1 - t0) // 5) + 2)):
        for rank in range(TRACE.ranks):
            row = {"ts": ts, "node": f"node-{rank // 8:03d}", "index": rank % 8, "uuid": f"GPU-trace-{rank}", "name": "H100",
                   "up": True, "utilization_ratio": 0.95, "memory_used_bytes": 1, "memory_total_bytes": 2,
                   "temperature_celsius": 65.0, "power_watts": 500.0, "power_limit_watts": 700.0, "sm_clock_hertz": 1.98e9,
                   "sm_clock_max_hertz": 1.98e9, "clock_event_mask": 0, "health": "healthy", "health_reasons": [],
                   "xid_total": 0}
            if rank == SLOW_RANK and gpu_fault:
                row.update({k: (v(i) if callable(v) else v) for k, v in gpu_fault.items()})
            gpus.append(row)
        for node in range(NODES):
            row = {"ts": ts, "node": f"node-{node:03d}", "cpu_utilization_ratio": 0.5, "memory_used_bytes": 1,
                   "memory_total_bytes": 2, "load1": 1.0, "gpu_count": 8, "network_errors_total": 0.0,
                   "infiniband_errors_total": 0.0, "memory_stalled_seconds_total": 0.0}
            if node == 0 and host_fault:
                row.update(host_fault(i, ts - t0))
            hosts.append(row)
    return frame_from_rows("gpus", gpus), frame_from_rows("hosts", hosts)


def straggler(gpu_fault=None, host_fault=None, steps=None):
    if steps is None:
        steps, _ = generate(TRACE)
    gpus, hosts = frames(steps, gpu_fault, host_fault)
    found, _ = analyse(steps, generate(TRACE)[1].clear(), end_ts(steps) + 1, samples=frame_samples(gpus, hosts))
    (f,) = found
    assert f.kind == "straggler" and f.subject["rank"] == SLOW_RANK
    return f


CAUSES = {
    "thermal_slowdown": ({"clock_event_mask": THERMAL, "temperature_celsius": 88.0, "sm_clock_hertz": 1.4e9}, None),
    "power_cap": ({"clock_event_mask": POWER_CAP, "power_watts": 700.0, "sm_clock_hertz": 1.6e9}, None),
    "hw_slowdown": ({"clock_event_mask": HW_SLOWDOWN, "sm_clock_hertz": 1.2e9}, None),
    "low_sm_clock": ({"sm_clock_hertz": 1.5e9}, None),
    "xid_errors": ({"xid_total": lambda i: i // 3}, None),
    "gpu_ecc_uncorrected": ({"health": "unhealthy", "health_reasons": ["ecc_uncorrected"]}, None),
    "gpu_row_remap_pending": ({"health": "degraded", "health_reasons": ["row_remap_pending"]}, None),
    "gpu_pcie_width_degraded": ({"health": "degraded", "health_reasons": ["pcie_width_degraded"]}, None),
    "gpu_nvlink_down": ({"health": "degraded", "health_reasons": ["nvlink_down"]}, None),
    "nic_errors": (None, lambda i, t: {"network_errors_total": 40.0 * i}),
    "infiniband_errors": (None, lambda i, t: {"infiniband_errors_total": 12.0 * i}),
    "cpu_saturation": (None, lambda i, t: {"cpu_utilization_ratio": 0.99}),
    "memory_pressure": (None, lambda i, t: {"memory_stalled_seconds_total": 0.3 * t}),
}


@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_each_cause_injected_under_a_slow_rank_is_ranked_first(cause):
    gpu_fault, host_fault = CAUSES[cause]
    f = straggler(gpu_fault, host_fault)
    first = f.causes[0]
    assert first["cause"] == cause, f.causes
    assert 0.5 <= first["score"] <= 1.0 and first["evidence"]


def test_a_data_loader_that_grew_is_ranked_first():
    steps, _ = generate(Trace(ranks=16, steps=60, slow_rank=SLOW_RANK, slow_factor=0.12, slow_phase="data"))
    f = straggler(steps=steps)
    assert f.causes[0]["cause"] == "data_loader" and f.causes[0]["evidence"]["data_phase_vs_peers"] > 1.5


def test_a_slow_rank_with_nothing_wrong_underneath_says_no_hardware_signal():
    f = straggler()
    assert f.causes == [{"cause": "no_hardware_signal", "score": 0.0, "evidence": {}}]


@pytest.mark.parametrize("weak, strong", [
    ({"clock_event_mask": lambda i: THERMAL if i % 3 == 0 else 0}, {"clock_event_mask": THERMAL}),
    ({"xid_total": lambda i: 1 if i > 5 else 0}, {"xid_total": lambda i: i}),
    ({"sm_clock_hertz": 1.75e9}, {"sm_clock_hertz": 1.1e9}),
])
def test_the_score_says_how_strong_the_evidence_is(weak, strong):
    weak_cause, strong_cause = straggler(weak).causes[0], straggler(strong).causes[0]
    assert weak_cause["cause"] == strong_cause["cause"]
    assert 0.5 <= weak_cause["score"] < strong_cause["score"] <= 1.0


def test_memory_pressure_below_the_shared_threshold_is_not_a_cause():
    below = MEMORY_STALLED_SHARE * 0.5
    f = straggler(host_fault=lambda i, t: {"memory_stalled_seconds_total": below * t})
    assert f.causes[0]["cause"] == "no_hardware_signal"
