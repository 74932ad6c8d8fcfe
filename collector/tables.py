"""The collector's tables: their compact polars schemas, and how a Batch becomes a frame of each.

One schema per table serves the hot tier (memory) and the warm tier (Parquet): names are
categoricals, durations 32-bit floats, ranks 32-bit ints, and a step's phases are columns
(`phase_<name>_s` for the usual five, DDP's `sync_arrival_s`), with any other phase or number the
workload reports in a list beside them. Frames are built column by column straight from the
decoded structs: no per-row dicts on the ingest path.
"""

from __future__ import annotations

import json
from typing import Iterable

import msgspec
import polars as pl

from fleetscope.vocabulary import HEALTH_STATES

from fleetscope.schema import Batch, PauseEvent, RequestEvent, StepEvent

_encode = msgspec.json.Encoder().encode
CAT = pl.Categorical()
F32, F64, I16, I32, I64 = pl.Float32, pl.Float64, pl.Int16, pl.Int32, pl.Int64

# Phases that get a column of their own; any other name goes to `phases_other`.
PHASES = ("data", "forward", "backward", "optimizer", "comm")
PHASE_COLUMNS = tuple(f"phase_{p}_s" for p in PHASES)
_KNOWN_PHASES, _KNOWN_METRICS = frozenset(PHASES), frozenset({"sync_arrival_s"})
# Other phases and numbers as a JSON object each ({"loss": 2.31}): building lists of structs from Python
# costs ten times the rest of a step row; only the per-rank breakdown ever reads them.
OTHER = pl.String

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "steps": {
        "ts": F64, "job": CAT, "rank": I32, "local_rank": I32, "world_size": I32, "step": I64, "stage": I32,
        "duration_s": F32, "tokens": I64, "samples": I64, "flops_per_token": F64, "failed": pl.Boolean,
        "process_start_ts": F64, "restored_step": I64,  # on a run's first step: goodput's incarnations
        "incarnation": I32,  # the job's incarnation the row belongs to, as the goodput ledger numbers them (not sent)
        **{c: F32 for c in PHASE_COLUMNS}, "sync_arrival_s": F32,
        "phases_other": OTHER, "metrics_other": OTHER,
        "node": CAT, "gpu_uuid": CAT, "pid": I32, "agent_id": CAT,
        "slurm": CAT,  # the Slurm job's ids (schema.SlurmIds) as JSON, null outside Slurm: collector/slurm.py
        "pod": CAT,  # the Kubernetes pod (schema.PodIds) as JSON, null outside Kubernetes: collector/pods.py
    },
    "requests": {
        "ts": F64, "service": CAT, "model": CAT, "status": pl.Enum(["ok", "error", "cancelled"]), "e2e_s": F64,
        "queue_s": F64, "ttft_s": F64, "tpot_s": F64, "input_tokens": I64, "output_tokens": I64,
        "node": CAT, "gpu_uuid": CAT, "pid": I32, "agent_id": CAT,
        "pod": CAT,  # as in steps
        "slurm": CAT,  # as in steps (added later: null in older files)
    },
    "pauses": {
        "ts": F64, "job": CAT, "rank": I32, "reason": CAT, "phase": pl.Enum(["begin", "end"]),
        "duration_s": F32, "node": CAT, "agent_id": CAT,
        "slurm": CAT, "pod": CAT,  # as in steps (added later: null in older files)
        "world_size": I32, "local_rank": I32, "pid": I32, "gpu_uuid": CAT,  # as sent (added later, as above)
    },
    "server_stats": {
        "ts": F64, "service": CAT, "model": CAT, "server": CAT, "kind": CAT, "node": CAT, "interval_s": F32,
        "running": F64, "waiting": F64, "kv_cache": F64, "prompt_tokens": F64, "generation_tokens": F64,
        "requests_ok": F64, "requests_error": F64, "e2e_sum": F64, "e2e_count": F64, "queue_sum": F64, "queue_count": F64,
        # added with the servers' finish reasons, preemptions and prefix cache: null in older files
        "requests_aborted": F64, "preemptions": F64, "prefix_cache_queries": F64, "prefix_cache_hits": F64,
    },
    "server_histograms": {
        "ts": F64, "service": CAT, "model": CAT, "server": CAT, "metric": CAT,
        "le": pl.List(F64), "counts": pl.List(F64), "sum": F64, "count": F64,
        "node": CAT,  # the replica's node, for per-replica quantiles: null in older files
    },
    "hosts": {
        "ts": F64, "node": CAT, "cpu_utilization_ratio": F32, "memory_used_bytes": I64, "memory_total_bytes": I64,
        "load1": F32, "gpu_count": I16, "sources_down": pl.List(CAT), "cluster": CAT, "rack": CAT,
        "network_errors_total": F64, "infiniband_errors_total": F64, "memory_stalled_seconds_total": F64,
        "network_receive_bytes_total": F64, "network_transmit_bytes_total": F64, "disk_read_bytes_total": F64,
        "disk_written_bytes_total": F64, "agent_id": CAT,
    },
    "gpus": {
        "ts": F64, "node": CAT, "index": I16, "uuid": CAT, "name": CAT, "up": pl.Boolean,
        "utilization_ratio": F32, "memory_used_bytes": I64, "memory_total_bytes": I64, "temperature_celsius": F32,
        "power_watts": F32, "power_limit_watts": F32, "sm_clock_hertz": F32, "sm_clock_max_hertz": F32,
        "clock_event_mask": I64, "health": pl.Enum(list(HEALTH_STATES)), "health_reasons": pl.List(CAT),
        "xid_total": I64, "xid_counts": CAT, "ecc_corrected_total": I64, "ecc_uncorrected_total": I64,
        "remap_pending": pl.Boolean, "remap_failure": pl.Boolean,
    },
}
KINDS = tuple(SCHEMAS)


def as_f64(column: str) -> pl.Expr:
    """A 32-bit float column as the decimal it was sent as (0.7, not 0.699999988), for reports."""
    return pl.col(column).cast(F64).round_sig_figs(7)


def empty(kind: str) -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMAS[kind])


def _frame(kind: str, columns: dict[str, list | None], n: int) -> pl.DataFrame:
    """The table's frame from one list per column (None: every row null), in the schema's dtypes and order."""
    return pl.DataFrame([_series(name, columns[name], dtype, n) for name, dtype in SCHEMAS[kind].items()])


# Per batch most columns are all null (optional fields nobody sent) and a few categoricals hold one value
# (the agent, the node, the job): those are made without a pass over Python objects, a third of the cost.
_NULLS: dict[tuple[str, pl.DataType, int], pl.Series] = {}


def _series(name: str, values: list | None, dtype: pl.DataType, n: int) -> pl.Series:
    if values is None or values[0] is None and values.count(None) == n:  # (counting None among floats is slow)
        key = (name, dtype, n)
        series = _NULLS.get(key)
        if series is None:  # shared by the frames of every batch of this size: polars copies on write
            if len(_NULLS) > 1024:
                _NULLS.clear()
            series = _NULLS[key] = pl.Series(name, [None] * n, dtype=dtype)
        return series
    if dtype == CAT and n > 1 and values.count(values[0]) == n:
        return pl.Series(name, values[:1], dtype=dtype).new_from_index(0, n)
    return pl.Series(name, values, dtype=dtype)


def _json(value: dict) -> str:
    return _encode(value).decode()


_SLURM_TEXT: dict = {}  # SlurmIds (or PodIds) -> its JSON: a job has a few, sent with every step


def _slurm_text(ids) -> str | None:
    if ids is None:
        return None
    text = _SLURM_TEXT.get(ids)
    if text is None:
        text = _encode(ids).decode()
        if len(_SLURM_TEXT) > 4096:
            _SLURM_TEXT.clear()
        _SLURM_TEXT[ids] = text
    return text


def _texts(values: list) -> list | None:
    """Slurm or pod ids as JSON text (None when no row has any)."""
    return [_slurm_text(v) for v in values] if any(values) else None


def _steps(events: list[StepEvent], batch: Batch) -> pl.DataFrame:
    node, n = batch.node, len(events)
    columns: dict[str, list | None] = {
        "ts": [e.ts for e in events], "job": [e.job for e in events], "rank": [e.rank for e in events],
        "local_rank": [e.local_rank for e in events], "world_size": [e.world_size for e in events],
        "step": [e.step for e in events], "stage": [e.stage for e in events], "duration_s": [e.duration_s for e in events],
        "tokens": [e.tokens for e in events], "samples": [e.samples for e in events],
        "flops_per_token": [e.flops_per_token for e in events], "failed": [e.failed for e in events],
        "process_start_ts": [e.process_start_ts for e in events], "restored_step": [e.restored_step for e in events],
        "incarnation": None,  # the store's goodput ledger tells (Store._tag)
    }
    # The names a batch's rows use, once: a phase nobody reported is a null column, and the JSON of the
    # others is looked for only when a row has one.
    phases = [e.phases for e in events]
    phase_names = set().union(*phases)
    for name, column in zip(PHASES, PHASE_COLUMNS):
        columns[column] = [p.get(name) for p in phases] if name in phase_names else None
    metrics = [e.metrics for e in events]
    metric_names = set().union(*metrics)
    columns["sync_arrival_s"] = [m.get("sync_arrival_s") for m in metrics] if "sync_arrival_s" in metric_names else None
    columns["phases_other"] = None if phase_names <= _KNOWN_PHASES else [
        None if p.keys() <= _KNOWN_PHASES else _json({k: v for k, v in p.items() if k not in _KNOWN_PHASES}) for p in phases]
    columns["metrics_other"] = None if metric_names <= _KNOWN_METRICS else [
        None if m.keys() <= _KNOWN_METRICS else _json({k: v for k, v in m.items() if k not in _KNOWN_METRICS}) for m in metrics]
    columns.update(node=[e.node or node for e in events], gpu_uuid=[e.gpu_uuid for e in events],
                   pid=[e.pid for e in events], agent_id=[batch.agent_id] * n, slurm=_texts([e.slurm for e in events]),
                   pod=_texts([e.pod for e in events]))
    return _frame("steps", columns, n)


def _requests(events: list[RequestEvent], batch: Batch) -> pl.DataFrame:
    node = batch.node
    columns = {name: [getattr(e, name) for e in events]
               for name in ("ts", "service", "model", "status", "e2e_s", "queue_s", "ttft_s", "tpot_s", "input_tokens",
                            "output_tokens", "gpu_uuid", "pid")}
    columns["node"] = [e.node or node for e in events]
    columns["agent_id"] = [batch.agent_id] * len(events)
    columns["pod"] = _texts([e.pod for e in events])
    columns["slurm"] = _texts([e.slurm for e in events])
    return _frame("requests", columns, len(events))


def _pauses(events: list[PauseEvent], batch: Batch) -> pl.DataFrame:
    node = batch.node
    columns = {name: [getattr(e, name) for e in events]
               for name in ("ts", "job", "rank", "reason", "phase", "duration_s", "world_size", "local_rank", "pid", "gpu_uuid")}
    columns["node"] = [e.node or node for e in events]
    columns["agent_id"] = [batch.agent_id] * len(events)
    columns["slurm"] = _texts([e.slurm for e in events])
    columns["pod"] = _texts([e.pod for e in events])
    return _frame("pauses", columns, len(events))


_STAT_COUNTERS = ("prompt_tokens", "generation_tokens", "requests_ok", "requests_error", "e2e_sum", "e2e_count",
                  "queue_sum", "queue_count", "requests_aborted", "preemptions", "prefix_cache_queries", "prefix_cache_hits")


def _servers(batch: Batch) -> dict[str, pl.DataFrame]:
    stats, hists = [], []
    for sf in batch.servers:
        row = {"ts": sf.ts, "service": sf.service, "model": sf.model, "server": sf.server, "kind": sf.kind,
               "node": sf.node or batch.node, "interval_s": sf.interval_s}
        for key in ("running", "waiting", "kv_cache"):
            row[key] = sf.gauges.get(key)
        for key in _STAT_COUNTERS:
            row[key] = sf.counters.get(key)
        for metric, h in sf.histograms.items():
            # Histograms carry their own sums and counts; the counters only fill in for servers without them.
            if metric in ("e2e", "queue") and row[f"{metric}_count"] is None:
                row[f"{metric}_sum"], row[f"{metric}_count"] = h.sum, h.count
            hists.append({"ts": sf.ts, "service": sf.service, "model": sf.model, "server": sf.server, "metric": metric,
                          "le": list(h.le), "counts": list(h.counts), "sum": h.sum, "count": h.count,
                          "node": row["node"]})
        stats.append(row)
    out = {}
    if stats:
        out["server_stats"] = pl.DataFrame(stats, schema=SCHEMAS["server_stats"])
    if hists:
        out["server_histograms"] = pl.DataFrame(hists, schema=SCHEMAS["server_histograms"])
    return out


_HOST_FIELDS = ("ts", "node", "cpu_utilization_ratio", "memory_used_bytes", "memory_total_bytes", "load1",
                "network_errors_total", "infiniband_errors_total", "memory_stalled_seconds_total",
                "network_receive_bytes_total", "network_transmit_bytes_total", "disk_read_bytes_total",
                "disk_written_bytes_total")
_GPU_FIELDS = ("index", "uuid", "name", "up", "utilization_ratio", "memory_used_bytes", "memory_total_bytes",
               "temperature_celsius", "power_watts", "power_limit_watts", "sm_clock_hertz", "sm_clock_max_hertz",
               "clock_event_mask", "health", "health_reasons", "xid_total", "ecc_corrected_total", "ecc_uncorrected_total",
               "remap_pending", "remap_failure")


def _frames(batch: Batch) -> dict[str, pl.DataFrame]:
    frames = batch.frames
    hosts = {name: [getattr(f, name) for f in frames] for name in _HOST_FIELDS}
    hosts["gpu_count"] = [sum(1 for g in f.gpus if g.up) for f in frames]
    hosts["sources_down"] = [f.sources_down or None for f in frames]
    hosts["cluster"] = [f.labels.get("cluster") for f in frames]
    hosts["rack"] = [f.labels.get("rack") for f in frames]
    hosts["agent_id"] = [batch.agent_id] * len(frames)
    pairs = [(f, g) for f in frames for g in f.gpus]
    gpus = {name: [getattr(g, name) for _, g in pairs] for name in _GPU_FIELDS}
    gpus["health_reasons"] = [r or None for r in gpus["health_reasons"]]
    gpus["xid_counts"] = [_json(g.xid_counts) if g.xid_counts else None for _, g in pairs]
    gpus["ts"] = [f.ts for f, _ in pairs]
    gpus["node"] = [f.node for f, _ in pairs]
    out = {"hosts": _frame("hosts", hosts, len(frames))}
    if pairs:
        out["gpus"] = _frame("gpus", gpus, len(pairs))
    return out


def batch_frames(batch: Batch) -> dict[str, pl.DataFrame]:
    """One frame per table that the batch has rows for; the node comes from the event, else from the batch."""
    out: dict[str, pl.DataFrame] = {}
    if batch.events:
        by_type: dict[type, list] = {StepEvent: [], RequestEvent: [], PauseEvent: []}
        for ev in batch.events:
            by_type[type(ev)].append(ev)
        for kind, cls, build in (("steps", StepEvent, _steps), ("requests", RequestEvent, _requests),
                                 ("pauses", PauseEvent, _pauses)):
            if by_type[cls]:
                out[kind] = build(by_type[cls], batch)  # type: ignore[operator]
    if batch.servers:
        out.update(_servers(batch))
    if batch.frames:
        out.update(_frames(batch))
    return out


def frame_from_rows(kind: str, rows: Iterable[dict]) -> pl.DataFrame:
    """A table from row dicts (tests, benches, old files); a step's `phases` and `metrics` may be given as
    dicts (as on the wire) and land in their columns. Missing columns are null."""
    rows = list(rows)
    if kind == "steps":
        rows = [_step_row(r) for r in rows]
    schema = SCHEMAS[kind]
    return pl.DataFrame([{c: r.get(c) for c in schema} for r in rows], schema=schema)


def _step_row(row: dict) -> dict:
    if "phases" not in row and "metrics" not in row:
        return row
    row = dict(row)
    phases, metrics = row.pop("phases", None) or {}, row.pop("metrics", None) or {}
    if isinstance(phases, list):  # the older list-of-structs form
        phases = {p["phase"]: p["seconds"] for p in phases}
    if isinstance(metrics, list):
        metrics = {m["name"]: m["value"] for m in metrics}
    for name, column in zip(PHASES, PHASE_COLUMNS):
        row.setdefault(column, phases.get(name))
    row.setdefault("sync_arrival_s", metrics.get("sync_arrival_s"))
    other = {k: v for k, v in phases.items() if k not in _KNOWN_PHASES}
    row.setdefault("phases_other", _json(other) if other else None)
    others = {k: v for k, v in metrics.items() if k not in _KNOWN_METRICS}
    row.setdefault("metrics_other", _json(others) if others else None)
    return row


def phases_long(steps: pl.DataFrame) -> pl.DataFrame:
    """Every phase of every step row, long: (rank, phase, seconds); the columns and the others alike."""
    columns = steps.select("rank", *PHASE_COLUMNS).unpivot(index="rank", variable_name="phase", value_name="seconds")
    columns = columns.drop_nulls("seconds").with_columns(
        pl.col("phase").str.strip_prefix("phase_").str.strip_suffix("_s"), as_f64("seconds"))
    return pl.concat([columns, _json_long(steps, "phases_other", "phase", "seconds")])


def _json_long(steps: pl.DataFrame, column: str, key: str, value: str) -> pl.DataFrame:
    """(rank, key, value) rows of a column of JSON objects."""
    rows = steps.select("rank", column).drop_nulls(column)
    out: dict[str, list] = {"rank": [], key: [], value: []}
    for rank, text in rows.iter_rows():
        for k, v in msgspec.json.decode(text).items():
            out["rank"].append(rank)
            out[key].append(k)
            out[value].append(v)
    return pl.DataFrame(out, schema={"rank": I32, key: pl.String, value: F64})


def metrics_long(steps: pl.DataFrame) -> pl.DataFrame:
    """Every number a step reported, long: (rank, name, value), DDP's sync_arrival_s among them."""
    sync = steps.select("rank", pl.lit("sync_arrival_s").alias("name"), as_f64("sync_arrival_s").alias("value"))
    return pl.concat([sync.drop_nulls("value"), _json_long(steps, "metrics_other", "name", "value")])


def conform(frame: pl.LazyFrame | pl.DataFrame, kind: str):
    """A frame read from Parquet in the current schema: columns added since are null, older forms converted."""
    schema = SCHEMAS[kind]
    names = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    if kind == "steps" and "phases" in names:  # files written before phases were columns
        frame = frame.with_columns(
            *(pl.col("phases").list.eval(pl.element().filter(pl.element().struct.field("phase") == p)
                                         .struct.field("seconds")).list.first().alias(c)
              for p, c in zip(PHASES, PHASE_COLUMNS)),
            pl.col("metrics").list.eval(pl.element().filter(pl.element().struct.field("name") == "sync_arrival_s")
                                        .struct.field("value")).list.first().alias("sync_arrival_s"),
        )
        names = [*names, *PHASE_COLUMNS, "sync_arrival_s"]
    present = set(names)
    return frame.select([pl.col(c).cast(dtype) if c in present else pl.lit(None, dtype=dtype).alias(c)
                         for c, dtype in schema.items()])


class JsonCells:
    """The dicts a JSON text column's cells hold (the steps' and requests' slurm and pod columns), each distinct text
    decoded once: a cell that is not an object with the `required` keys as strings is None."""

    def __init__(self, *required: str, limit: int = 4096) -> None:
        self.required = required
        self.limit = limit
        self._decoded: dict[str, dict | None] = {}

    def __call__(self, text: str) -> dict | None:
        ids = self._decoded.get(text)
        if ids is None and text not in self._decoded:
            try:
                ids = json.loads(text)
            except ValueError:
                ids = None
            if not isinstance(ids, dict) or not all(isinstance(ids.get(k), str) for k in self.required):
                ids = None
            if len(self._decoded) > self.limit:
                self._decoded.clear()
            self._decoded[text] = ids
        return ids
