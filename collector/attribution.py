"""Probable causes of a slow rank or node: the telemetry of its GPU and host over the same window,
compared with its peers' (pure polars, no I/O).

Each cause comes with a score (0-1, how strongly the evidence points at it) and the evidence
itself; the list is sorted, strongest first, and says "no_hardware_signal" when nothing stands out.
"""

from __future__ import annotations

import polars as pl

THERMAL_BITS = 0x20 | 0x40  # sw and hw thermal slowdown
POWER_CAP_BIT = 0x4
HW_SLOWDOWN_BITS = 0x8 | 0x80  # hw slowdown, power brake


def _share(frame: pl.DataFrame, bits: int) -> float:
    masks = frame["clock_event_mask"].drop_nulls()
    return float(((masks & bits) > 0).mean()) if len(masks) else 0.0  # type: ignore[arg-type]


def _clock_ratio(frame: pl.DataFrame) -> float | None:
    busy = frame.filter((pl.col("utilization_ratio") > 0.5) & (pl.col("sm_clock_max_hertz") > 0))
    if busy.height == 0:
        return None
    return float((busy["sm_clock_hertz"] / busy["sm_clock_max_hertz"]).mean())  # type: ignore[arg-type]


def _increase(frame: pl.DataFrame, column: str) -> float:
    values = frame.sort("ts")[column].drop_nulls().to_list()
    # Counters only grow; a drop is a restart of the agent, after which its whole value is new.
    return float(sum(cur - prev if cur >= prev else cur for prev, cur in zip(values, values[1:])))


def gpu_causes(gpu: pl.DataFrame, peers: pl.DataFrame) -> list[dict]:
    """Causes seen on one GPU's frames, judged against its peers' frames over the same window."""
    causes: list[dict] = []
    if gpu.height == 0:
        return causes
    thermal, peers_thermal = _share(gpu, THERMAL_BITS), _share(peers, THERMAL_BITS)
    if thermal >= 0.2 and thermal > peers_thermal + 0.1:
        causes.append({"cause": "thermal_slowdown", "score": min(1.0, thermal),
                       "evidence": {"share_of_samples_throttled": round(thermal, 3), "peers_share": round(peers_thermal, 3),
                                    "max_temperature_celsius": gpu["temperature_celsius"].max()}})
    cap, peers_cap = _share(gpu, POWER_CAP_BIT), _share(peers, POWER_CAP_BIT)
    if cap >= 0.2 and cap > peers_cap + 0.1:
        causes.append({"cause": "power_cap", "score": min(1.0, cap) * 0.9,
                       "evidence": {"share_of_samples_capped": round(cap, 3), "power_limit_watts": gpu["power_limit_watts"].min()}})
    hw = _share(gpu, HW_SLOWDOWN_BITS)
    # NVML sets its hw_slowdown bit with hw_thermal_slowdown too: only a slowdown without heat is news.
    if hw >= 0.2 and hw > _share(peers, HW_SLOWDOWN_BITS) + 0.1 and not any(c["cause"] == "thermal_slowdown" for c in causes):
        causes.append({"cause": "hw_slowdown", "score": min(1.0, hw), "evidence": {"share_of_samples": round(hw, 3)}})
    clock, peers_clock = _clock_ratio(gpu), _clock_ratio(peers)
    if clock is not None and peers_clock is not None and clock < 0.92 * peers_clock and not causes:
        causes.append({"cause": "low_sm_clock", "score": min(1.0, (peers_clock - clock) / peers_clock * 3),
                       "evidence": {"sm_clock_of_max": round(clock, 3), "peers_sm_clock_of_max": round(peers_clock, 3)}})
    xids = _increase(gpu, "xid_total")
    if xids > 0:
        causes.append({"cause": "xid_errors", "score": 0.8, "evidence": {"xids_in_window": xids}})
    reasons = sorted({r for rs in gpu["health_reasons"].drop_nulls().to_list() for r in rs}
                     - {"hw_thermal_slowdown", "sw_thermal_slowdown", "hw_slowdown", "hw_power_brake_slowdown",
                        "temperature_near_slowdown"})
    for reason in reasons:
        causes.append({"cause": f"gpu_{reason}", "score": 0.7, "evidence": {"health": gpu["health"].drop_nulls().tail(1).to_list()}})
    return causes


def host_causes(host: pl.DataFrame, peers: pl.DataFrame) -> list[dict]:
    causes: list[dict] = []
    if host.height == 0:
        return causes
    for column, cause in (("network_errors_total", "nic_errors"), ("infiniband_errors_total", "infiniband_errors")):
        mine = _increase(host, column)
        theirs = max((_increase(g, column) for _, g in peers.group_by("node")), default=0.0)
        if mine > 0 and mine > 2 * theirs:
            causes.append({"cause": cause, "score": 0.6, "evidence": {"errors_in_window": mine, "worst_peer_node": theirs}})
    cpu = host["cpu_utilization_ratio"].drop_nulls()
    if len(cpu) and float(cpu.mean()) > 0.95:  # type: ignore[arg-type]
        causes.append({"cause": "cpu_saturation", "score": 0.5, "evidence": {"cpu_utilization_mean": round(float(cpu.mean()), 3)}})  # type: ignore[arg-type]
    stalled = host.sort("ts")
    span = (stalled["ts"].max() or 0) - (stalled["ts"].min() or 0)
    if span > 0:
        rate = _increase(stalled, "memory_stalled_seconds_total") / span
        if rate > 0.05:
            causes.append({"cause": "memory_pressure", "score": min(1.0, rate * 4), "evidence": {"memory_stalled_share": round(rate, 3)}})
    return causes


def probable_causes(*, node: str | None, gpu_uuid: str | None, peer_gpus: list[str], peer_nodes: list[str],
                    gpus: pl.DataFrame, hosts: pl.DataFrame, since: float, until: float,
                    data_vs_peers: float | None = None) -> list[dict]:
    """Rank the likely causes for a subject (a rank's GPU and node) over [since - 60 s, until]."""
    window_g = gpus.filter(pl.col("ts").is_between(since - 60, until))
    window_h = hosts.filter(pl.col("ts").is_between(since - 60, until))
    causes = []
    if gpu_uuid is not None:
        causes += gpu_causes(window_g.filter(pl.col("uuid") == gpu_uuid),
                             window_g.filter(pl.col("uuid").is_in([g for g in peer_gpus if g != gpu_uuid])))
    if node is not None:
        causes += host_causes(window_h.filter(pl.col("node") == node),
                              window_h.filter(pl.col("node").is_in([n for n in peer_nodes if n != node])))
    if data_vs_peers is not None and data_vs_peers >= 1.5:
        causes.append({"cause": "data_loader", "score": min(1.0, (data_vs_peers - 1) / 2),
                       "evidence": {"data_phase_vs_peers": round(data_vs_peers, 2)}})
    causes.sort(key=lambda c: -c["score"])
    return causes or [{"cause": "no_hardware_signal", "score": 0.0, "evidence": {}}]
