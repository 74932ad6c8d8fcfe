"""The collector's tables: their polars schemas and how a Batch becomes rows of each."""

from __future__ import annotations

import polars as pl

from fleetscope.schema import Batch, PauseEvent, RequestEvent, StepEvent

PHASES = pl.List(pl.Struct({"phase": pl.String, "seconds": pl.Float64}))
USER_METRICS = pl.List(pl.Struct({"name": pl.String, "value": pl.Float64}))

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "steps": {
        "ts": pl.Float64, "job": pl.String, "rank": pl.Int64, "local_rank": pl.Int64, "world_size": pl.Int64,
        "step": pl.Int64, "stage": pl.Int64, "duration_s": pl.Float64, "tokens": pl.Int64, "samples": pl.Int64, "flops_per_token": pl.Float64, "failed": pl.Boolean,
        "phases": PHASES, "metrics": USER_METRICS, "node": pl.String, "gpu_uuid": pl.String, "pid": pl.Int64,
        "agent_id": pl.String,
    },
    "requests": {
        "ts": pl.Float64, "service": pl.String, "model": pl.String, "status": pl.String, "e2e_s": pl.Float64,
        "queue_s": pl.Float64, "ttft_s": pl.Float64, "tpot_s": pl.Float64, "input_tokens": pl.Int64,
        "output_tokens": pl.Int64, "node": pl.String, "gpu_uuid": pl.String, "pid": pl.Int64, "agent_id": pl.String,
    },
    "pauses": {
        "ts": pl.Float64, "job": pl.String, "rank": pl.Int64, "reason": pl.String, "phase": pl.String,
        "duration_s": pl.Float64, "node": pl.String, "agent_id": pl.String,
    },
    "server_stats": {
        "ts": pl.Float64, "service": pl.String, "model": pl.String, "server": pl.String, "kind": pl.String,
        "node": pl.String, "interval_s": pl.Float64, "running": pl.Float64, "waiting": pl.Float64, "kv_cache": pl.Float64,
        "prompt_tokens": pl.Float64, "generation_tokens": pl.Float64, "requests_ok": pl.Float64, "requests_error": pl.Float64,
        "e2e_sum": pl.Float64, "e2e_count": pl.Float64, "queue_sum": pl.Float64, "queue_count": pl.Float64,
    },
    "server_histograms": {
        "ts": pl.Float64, "service": pl.String, "model": pl.String, "server": pl.String, "metric": pl.String,
        "le": pl.List(pl.Float64), "counts": pl.List(pl.Float64), "sum": pl.Float64, "count": pl.Float64,
    },
    "hosts": {
        "ts": pl.Float64, "node": pl.String, "cpu_utilization_ratio": pl.Float64, "memory_used_bytes": pl.Int64,
        "memory_total_bytes": pl.Int64, "load1": pl.Float64, "gpu_count": pl.Int64, "sources_down": pl.List(pl.String),
        "cluster": pl.String, "rack": pl.String, "network_errors_total": pl.Float64, "infiniband_errors_total": pl.Float64,
        "memory_stalled_seconds_total": pl.Float64, "network_receive_bytes_total": pl.Float64,
        "network_transmit_bytes_total": pl.Float64, "disk_read_bytes_total": pl.Float64, "disk_written_bytes_total": pl.Float64,
        "agent_id": pl.String,
    },
    "gpus": {
        "ts": pl.Float64, "node": pl.String, "index": pl.Int64, "uuid": pl.String, "name": pl.String, "up": pl.Boolean,
        "utilization_ratio": pl.Float64, "memory_used_bytes": pl.Int64, "memory_total_bytes": pl.Int64,
        "temperature_celsius": pl.Float64, "power_watts": pl.Float64, "power_limit_watts": pl.Float64,
        "sm_clock_hertz": pl.Float64, "sm_clock_max_hertz": pl.Float64, "clock_event_mask": pl.Int64, "health": pl.String,
        "health_reasons": pl.List(pl.String), "xid_total": pl.Int64,
    },
}
KINDS = tuple(SCHEMAS)


def empty(kind: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[kind])


def batch_rows(batch: Batch) -> dict[str, list[dict]]:
    """Split one batch into rows per table; the node comes from the event, else from the batch."""
    rows: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for ev in batch.events:
        if isinstance(ev, StepEvent):
            rows["steps"].append({
                "ts": ev.ts, "job": ev.job, "rank": ev.rank, "local_rank": ev.local_rank, "world_size": ev.world_size,
                "step": ev.step, "stage": ev.stage, "duration_s": ev.duration_s, "tokens": ev.tokens, "samples": ev.samples,
                "flops_per_token": ev.flops_per_token,
                "failed": ev.failed, "phases": [{"phase": k, "seconds": v} for k, v in ev.phases.items()],
                "metrics": [{"name": k, "value": v} for k, v in ev.metrics.items()],
                "node": ev.node or batch.node, "gpu_uuid": ev.gpu_uuid, "pid": ev.pid, "agent_id": batch.agent_id,
            })
        elif isinstance(ev, RequestEvent):
            rows["requests"].append({
                "ts": ev.ts, "service": ev.service, "model": ev.model, "status": ev.status, "e2e_s": ev.e2e_s,
                "queue_s": ev.queue_s, "ttft_s": ev.ttft_s, "tpot_s": ev.tpot_s, "input_tokens": ev.input_tokens,
                "output_tokens": ev.output_tokens, "node": ev.node or batch.node, "gpu_uuid": ev.gpu_uuid, "pid": ev.pid,
                "agent_id": batch.agent_id,
            })
        elif isinstance(ev, PauseEvent):
            rows["pauses"].append({
                "ts": ev.ts, "job": ev.job, "rank": ev.rank, "reason": ev.reason, "phase": ev.phase,
                "duration_s": ev.duration_s, "node": ev.node or batch.node, "agent_id": batch.agent_id,
            })
    for sf in batch.servers:
        row = {"ts": sf.ts, "service": sf.service, "model": sf.model, "server": sf.server, "kind": sf.kind,
               "node": sf.node or batch.node, "interval_s": sf.interval_s}
        for key in ("running", "waiting", "kv_cache"):
            row[key] = sf.gauges.get(key)
        for key in ("prompt_tokens", "generation_tokens", "requests_ok", "requests_error", "e2e_sum", "e2e_count",
                    "queue_sum", "queue_count"):
            row[key] = sf.counters.get(key)
        for metric, h in sf.histograms.items():
            # Histograms carry their own sums and counts; the counters only fill in for servers without them.
            row.setdefault(f"{metric}_sum", None)
            if metric in ("e2e", "queue") and row[f"{metric}_count"] is None:
                row[f"{metric}_sum"], row[f"{metric}_count"] = h.sum, h.count
            rows["server_histograms"].append({
                "ts": sf.ts, "service": sf.service, "model": sf.model, "server": sf.server, "metric": metric,
                "le": list(h.le), "counts": list(h.counts), "sum": h.sum, "count": h.count,
            })
        rows["server_stats"].append({k: v for k, v in row.items() if k in SCHEMAS["server_stats"]})
    for fr in batch.frames:
        rows["hosts"].append({
            "ts": fr.ts, "node": fr.node, "cpu_utilization_ratio": fr.cpu_utilization_ratio,
            "memory_used_bytes": fr.memory_used_bytes, "memory_total_bytes": fr.memory_total_bytes, "load1": fr.load1,
            "gpu_count": sum(1 for g in fr.gpus if g.up), "sources_down": list(fr.sources_down),
            "cluster": fr.labels.get("cluster"), "rack": fr.labels.get("rack"),
            "network_errors_total": fr.network_errors_total, "infiniband_errors_total": fr.infiniband_errors_total,
            "memory_stalled_seconds_total": fr.memory_stalled_seconds_total,
            "network_receive_bytes_total": fr.network_receive_bytes_total,
            "network_transmit_bytes_total": fr.network_transmit_bytes_total,
            "disk_read_bytes_total": fr.disk_read_bytes_total, "disk_written_bytes_total": fr.disk_written_bytes_total,
            "agent_id": batch.agent_id,
        })
        for g in fr.gpus:
            rows["gpus"].append({
                "ts": fr.ts, "node": fr.node, "index": g.index, "uuid": g.uuid, "name": g.name, "up": g.up,
                "utilization_ratio": g.utilization_ratio, "memory_used_bytes": g.memory_used_bytes,
                "memory_total_bytes": g.memory_total_bytes, "temperature_celsius": g.temperature_celsius,
                "power_watts": g.power_watts, "power_limit_watts": g.power_limit_watts, "sm_clock_hertz": g.sm_clock_hertz,
                "sm_clock_max_hertz": g.sm_clock_max_hertz, "clock_event_mask": g.clock_event_mask, "health": g.health,
                "health_reasons": list(g.health_reasons), "xid_total": g.xid_total,
            })
    return rows
