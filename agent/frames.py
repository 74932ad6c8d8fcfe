"""Snapshot -> wire records: what the collector receives of one sample. No I/O.

Everything comes from the Snapshot's typed fields: GPU states, health verdicts, the host figures
that the host sources' families declare they feed (agent/sources/base.py, `feeding`), and the
inference servers' cumulative counts. host_frame is a pure function of one snapshot; a server frame
is what happened between two snapshots, so ServerFrames keeps each server model's previous reading.
"""

from __future__ import annotations

from agent.inference_servers import ModelReading, ServerReading, delta
from agent.sampler import Snapshot
from fleetscope.schema import GpuFrame, HistogramDelta, HostFrame, ServerFrame


def _ecc(gpu, kind: str) -> int | None:
    """Lifetime ECC errors of one kind (the aggregate counter; the volatile one where that is all there is)."""
    counts = gpu.ecc_errors
    value = counts.get((kind, "aggregate"), counts.get((kind, "volatile")))
    return int(value) if value is not None and value >= 0 else None


def host_frame(snapshot: Snapshot, node: str, labels: dict[str, str] | None = None) -> HostFrame:
    """The collector's view of one snapshot: a few host figures and every GPU's state."""

    host = snapshot.host
    total = host.get("memory_total_bytes")
    avail = host.get("memory_available_bytes")
    cpu = host.get("cpu_utilization_ratio")
    gpus = [
        GpuFrame(
            index=g.index,
            uuid=g.uuid,
            name=g.name,
            up=g.up,
            utilization_ratio=g.utilization_ratio,
            memory_used_bytes=g.memory_used_bytes,
            memory_total_bytes=g.memory_total_bytes,
            temperature_celsius=g.temperature_celsius,
            power_watts=g.power_watts,
            power_limit_watts=g.power_limit_watts,
            sm_clock_hertz=g.sm_clock_hertz,
            sm_clock_max_hertz=g.sm_clock_max_hertz,
            clock_event_mask=g.clock_event_mask,
            health=snapshot.health[g.uuid].state if g.uuid in snapshot.health else None,
            health_reasons=list(snapshot.health[g.uuid].reasons) if g.uuid in snapshot.health else [],
            xid_total=sum(g.xid_counts.values()) if g.xid_counts is not None else None,
            xid_counts={str(code): n for code, n in (g.xid_counts or {}).items() if 0 <= code < 100_000},
            ecc_corrected_total=_ecc(g, "corrected"),
            ecc_uncorrected_total=_ecc(g, "uncorrected"),
            remap_pending=g.remapped_rows.pending if g.remapped_rows is not None else None,
            remap_failure=g.remapped_rows.failure if g.remapped_rows is not None else None,
        )
        for g in snapshot.gpus
    ]
    return HostFrame(
        v=1,
        node=node,
        ts=snapshot.ts,
        cpu_utilization_ratio=min(1.0, max(0.0, cpu)) if cpu is not None else None,
        memory_used_bytes=int(total - avail) if total is not None and avail is not None else None,
        memory_total_bytes=int(total) if total is not None else None,
        load1=host.get("load1"),
        network_errors_total=host.get("network_errors_total"),
        infiniband_errors_total=host.get("infiniband_errors_total"),
        memory_stalled_seconds_total=host.get("memory_stalled_seconds_total"),
        network_receive_bytes_total=host.get("network_receive_bytes_total"),
        network_transmit_bytes_total=host.get("network_transmit_bytes_total"),
        disk_read_bytes_total=host.get("disk_read_bytes_total"),
        disk_written_bytes_total=host.get("disk_written_bytes_total"),
        gpus=gpus,
        sources_down=sorted(name for name, st in snapshot.status.items() if not st.up),
        labels=dict(labels or {}),
    )


class ServerFrames:
    """Inference servers' frames: per server model, the counts since its previous reading in a snapshot (the
    first reading of one is not an interval yet, and gives none). A sample whose inference source overran is
    not in any snapshot: the next reading's interval is longer, and nothing is lost."""

    def __init__(self) -> None:
        self._previous: dict[tuple[str, str], tuple[float, ModelReading]] = {}

    def frames(self, servers: tuple[ServerReading, ...], node: str) -> list[ServerFrame]:
        out = []
        for r in servers:
            key = (r.url, r.model)
            previous = self._previous.get(key)
            self._previous[key] = (r.ts, r.reading)
            if previous is not None and r.ts > previous[0]:
                out.append(_server_frame(r, previous[0], delta(r.reading, previous[1]), node))
        return out


def _server_frame(r: ServerReading, t0: float, d: ModelReading, node: str) -> ServerFrame:
    return ServerFrame(
        v=1, service=r.service, model=r.model, server=r.url, kind=r.kind, ts=r.ts,
        interval_s=max(r.ts - t0, 1e-6), node=node or None,
        histograms={name: HistogramDelta(le=[b if b != float("inf") else 1e300 for b in h.le], counts=h.counts,
                                         sum=h.sum, count=h.count)
                    for name, h in d.histograms.items()},
        gauges=d.gauges, counters=d.counters,
    )
