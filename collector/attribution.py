"""Probable causes of a slow rank or node: the telemetry of its GPU and host over the same window,
compared with its peers' (pure polars, no I/O).

The inputs are *samples* (collector.rollups): raw frames and per-minute rollups alike, each row
weighted by the samples it stands for. Each cause comes with its evidence and a score that says how far
past its threshold the evidence is: 0.5 just past it, 1.0 at what is unmistakable (`_strength`), the
same scale for every cause. The list is sorted, strongest first, and says "no_hardware_signal" when
nothing stands out.
"""

from __future__ import annotations

from typing import Callable

import polars as pl

from collector.rollups import counter_increase
from fleetscope.vocabulary import MEMORY_STALLED_SHARE

# kind ("gpus" | "hosts"), since, until, (key column, values) -> samples
SampleSource = Callable[[str, float, float, tuple[str, list]], pl.DataFrame]


def _strength(value: float, threshold: float, full: float) -> float:
    """0.5 for evidence just past its threshold, rising linearly to 1.0 at `full` and beyond."""
    return round(0.5 + 0.5 * min(1.0, max(0.0, (value - threshold) / (full - threshold))), 3)


def _share(frame: pl.DataFrame, column: str) -> float:
    rows = frame.filter(pl.col(column).is_not_null())
    weight = rows["samples"].sum()
    return float((rows[column] * rows["samples"]).sum() / weight) if weight else 0.0


def _clock_ratio(frame: pl.DataFrame) -> float | None:
    busy = frame.filter(pl.col("busy_clock_ratio").is_not_null() & (pl.col("busy_samples") > 0))
    weight = busy["busy_samples"].sum()
    if not weight:
        return None
    return float((busy["busy_clock_ratio"] * busy["busy_samples"]).sum() / weight)


def _increase(frame: pl.DataFrame, column: str) -> float:
    """A counter's increase over the samples (collector.rollups.counter_increase): a drop is a restart of the agent,
    after which its whole value is new; a rollup that keeps its span's first value and increase within (the GPU
    counters') adds what was counted inside its minute or hour, a restart within it included, which its last value
    alone would lose."""
    frame = frame.sort("ts")
    spans = [frame.get_column(c).to_list() if c in frame.columns else None for c in (f"{column}_first", f"{column}_within")]
    return float(counter_increase(frame.get_column("ts").to_list(), frame.get_column(column).to_list(), *spans)[0])


_SLOWDOWN_REASONS = {"hw_thermal_slowdown", "sw_thermal_slowdown", "hw_slowdown", "hw_power_brake_slowdown",
                     "temperature_near_slowdown"}


def gpu_causes(gpu: pl.DataFrame, peers: pl.DataFrame) -> list[dict]:
    """Causes seen on one GPU's samples, judged against its peers' samples over the same window."""
    causes: list[dict] = []
    if gpu.height == 0:
        return causes
    thermal, peers_thermal = _share(gpu, "thermal_share"), _share(peers, "thermal_share")
    if thermal >= 0.2 and thermal > peers_thermal + 0.1:
        causes.append({"cause": "thermal_slowdown", "score": _strength(thermal, 0.2, 0.8),
                       "evidence": {"share_of_samples_throttled": round(thermal, 3), "peers_share": round(peers_thermal, 3),
                                    "max_temperature_celsius": gpu["temperature_max_celsius"].max()}})
    cap, peers_cap = _share(gpu, "power_cap_share"), _share(peers, "power_cap_share")
    if cap >= 0.2 and cap > peers_cap + 0.1:
        causes.append({"cause": "power_cap", "score": _strength(cap, 0.2, 0.8),
                       "evidence": {"share_of_samples_capped": round(cap, 3), "power_limit_watts": gpu["power_limit_watts"].min()}})
    hw = _share(gpu, "hw_slowdown_share")
    # NVML sets its hw_slowdown bit with hw_thermal_slowdown too: only a slowdown without heat is news.
    if hw >= 0.2 and hw > _share(peers, "hw_slowdown_share") + 0.1 and not any(c["cause"] == "thermal_slowdown" for c in causes):
        causes.append({"cause": "hw_slowdown", "score": _strength(hw, 0.2, 0.8), "evidence": {"share_of_samples": round(hw, 3)}})
    clock, peers_clock = _clock_ratio(gpu), _clock_ratio(peers)
    if clock is not None and peers_clock is not None and clock < 0.92 * peers_clock and not causes:
        causes.append({"cause": "low_sm_clock", "score": _strength((peers_clock - clock) / peers_clock, 0.08, 0.4),
                       "evidence": {"sm_clock_of_max": round(clock, 3), "peers_sm_clock_of_max": round(peers_clock, 3)}})
    xids = _increase(gpu, "xid_total")
    if xids > 0:
        causes.append({"cause": "xid_errors", "score": _strength(xids, 1, 5), "evidence": {"xids_in_window": xids}})
    reasons = sorted({str(r) for rs in gpu["health_reasons"].drop_nulls().to_list() for r in rs} - _SLOWDOWN_REASONS)
    troubled = _share(gpu, "unhealthy_share") + _share(gpu, "degraded_share")  # of the window's samples
    for reason in reasons:
        causes.append({"cause": f"gpu_{reason}", "score": _strength(troubled, 0.0, 0.8),
                       "evidence": {"health": gpu["health"].drop_nulls().tail(1).to_list(),
                                    "share_of_samples_not_healthy": round(troubled, 3)}})
    return causes


def host_causes(host: pl.DataFrame, peers: pl.DataFrame) -> list[dict]:
    causes: list[dict] = []
    if host.height == 0:
        return causes
    for column, cause in (("network_errors_total", "nic_errors"), ("infiniband_errors_total", "infiniband_errors")):
        mine = _increase(host, column)
        theirs = max((_increase(g, column) for _, g in peers.group_by("node")), default=0.0)
        if mine > 0 and mine > 2 * theirs:
            causes.append({"cause": cause, "score": _strength((mine + 1) / (theirs + 1), 2, 50),
                           "evidence": {"errors_in_window": mine, "worst_peer_node": theirs}})
    cpu = _share(host, "cpu_utilization_ratio")
    if cpu > 0.95:
        causes.append({"cause": "cpu_saturation", "score": _strength(cpu, 0.95, 1.0), "evidence": {"cpu_utilization_mean": round(cpu, 3)}})
    stalled = host.sort("ts")
    span = (stalled["ts"].max() or 0) - (stalled["ts"].min() or 0)
    if span > 0:
        rate = _increase(stalled, "memory_stalled_seconds_total") / span
        if rate > MEMORY_STALLED_SHARE:
            causes.append({"cause": "memory_pressure", "score": _strength(rate, MEMORY_STALLED_SHARE, 0.5),
                           "evidence": {"memory_stalled_share": round(rate, 3)}})
    return causes


def probable_causes(*, node: str | None, gpu_uuid: str | None, peer_gpus: list[str], peer_nodes: list[str],
                    samples: SampleSource, since: float, until: float, data_vs_peers: float | None = None) -> list[dict]:
    """Rank the likely causes for a subject (a rank's GPU and node) over [since - 60 s, until]."""
    causes = []
    if gpu_uuid is not None:
        window = samples("gpus", since - 60, until, ("uuid", sorted({gpu_uuid, *peer_gpus})))
        causes += gpu_causes(window.filter(pl.col("uuid") == gpu_uuid), window.filter(pl.col("uuid") != gpu_uuid))
    if node is not None:
        window = samples("hosts", since - 60, until, ("node", sorted({node, *peer_nodes})))
        causes += host_causes(window.filter(pl.col("node") == node), window.filter(pl.col("node") != node))
    if data_vs_peers is not None and data_vs_peers >= 1.5:
        causes.append({"cause": "data_loader", "score": _strength(data_vs_peers, 1.5, 4.0),
                       "evidence": {"data_phase_vs_peers": round(data_vs_peers, 2)}})
    causes.sort(key=lambda c: -c["score"])
    return causes or [{"cause": "no_hardware_signal", "score": 0.0, "evidence": {}}]


def frame_samples(gpus: pl.DataFrame, hosts: pl.DataFrame) -> SampleSource:
    """A sample source over raw GPU and host frames (tests, benches, and callers holding frames)."""
    from collector.rollups import as_gpu_samples, as_host_samples

    def source(kind: str, since: float, until: float, keys: tuple[str, list]) -> pl.DataFrame:
        frame, convert = (gpus, as_gpu_samples) if kind == "gpus" else (hosts, as_host_samples)
        rows = frame.filter(pl.col("ts").is_between(since, until) & pl.col(keys[0]).is_in(keys[1]))
        return convert(rows)

    return source
