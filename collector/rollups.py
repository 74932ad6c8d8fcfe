"""Summaries the hot tier keeps instead of raw rows: per-step aggregates of each job, and per-minute
rollups of GPU and host frames (pure polars, no I/O).

A rollup row has the shape of a *sample*: raw frames become samples of weight 1 (`as_gpu_samples`,
`as_host_samples`) and a minute's rollup is one sample of weight `samples`, so the attribution and the
console read raw rows and rollups alike: shares are weighted means, counters keep their last value.
"""

from __future__ import annotations

import math

import polars as pl

from collector.tables import CAT, F32, F64, I16, I32, I64, SCHEMAS
from fleetscope.vocabulary import HEALTH_STATES, HW_SLOWDOWN_BITS, POWER_CAP_BIT, THERMAL_BITS

HEALTH = pl.Enum(list(HEALTH_STATES))

STEP_AGGS: dict[str, pl.DataType] = {
    "job": CAT, "incarnation": I32, "step": I64, "ts": F64, "end_ts": F64, "ranks": I32, "world_size": I32,
    "step_time_p50_s": F32, "step_time_p95_s": F32, "step_time_max_s": F32, "failed": I32,
    "tokens": I64, "samples": I64, "flops_per_token": F64,
}

GPU_SAMPLES: dict[str, pl.DataType] = {
    "ts": F64, "node": CAT, "index": I16, "uuid": CAT, "samples": I32, "up_ratio": F32,
    "utilization_ratio": F32, "memory_used_bytes": I64, "temperature_celsius": F32, "temperature_max_celsius": F32,
    "power_watts": F32, "power_limit_watts": F32, "sm_clock_hertz": F32,
    "busy_samples": I32, "busy_clock_ratio": F32,  # SM clock over its max while utilisation > 0.5
    "thermal_share": F32, "power_cap_share": F32, "hw_slowdown_share": F32, "clock_event_mask": I64,
    "health": HEALTH, "unhealthy_share": F32, "degraded_share": F32, "health_reasons": pl.List(CAT), "xid_total": I64,
    "xid_counts": CAT, "ecc_corrected_total": I64, "ecc_uncorrected_total": I64,
    "remap_pending": pl.Boolean, "remap_failure": pl.Boolean,
}
GPU_LAST = ("xid_total", "xid_counts", "ecc_corrected_total", "ecc_uncorrected_total")  # counters: the last value

HOST_SAMPLES: dict[str, pl.DataType] = {
    "ts": F64, "node": CAT, "samples": I32, "cpu_utilization_ratio": F32, "memory_used_bytes": I64,
    "memory_total_bytes": I64, "load1": F32, "gpu_count": I16, "cluster": CAT, "rack": CAT,
    "network_errors_total": F64, "infiniband_errors_total": F64, "memory_stalled_seconds_total": F64,
    "network_receive_bytes_total": F64, "network_transmit_bytes_total": F64, "disk_read_bytes_total": F64,
    "disk_written_bytes_total": F64,
}
HOST_COUNTERS = tuple(c for c in HOST_SAMPLES if c.endswith("_total"))


STEP_KEY = ("job", "incarnation", "step")


def incarnation_of(steps: pl.DataFrame) -> pl.Expr:
    """Each step row's incarnation (collector.goodput_ledger numbers them as rows arrive; 0 for rows that
    carry none: written before incarnations were kept, or built without a store)."""
    return pl.col("incarnation").fill_null(0) if "incarnation" in steps.columns else pl.lit(0, I32).alias("incarnation")


def step_aggregates(steps: pl.DataFrame) -> pl.DataFrame:
    """One row per (job, incarnation, step): when it started and ended, how many ranks reported it, step-time
    spread. A step that a restart ran again (restored from an earlier checkpoint) has a row for each run."""
    return steps.group_by("job", incarnation_of(steps), "step").agg(
        pl.col("ts").min(),
        (pl.col("ts") + pl.col("duration_s")).max().alias("end_ts"),
        pl.len().alias("ranks"),
        pl.col("world_size").max(),
        pl.col("duration_s").median().alias("step_time_p50_s"),
        pl.col("duration_s").quantile(0.95, interpolation="linear").alias("step_time_p95_s"),
        pl.col("duration_s").max().alias("step_time_max_s"),
        pl.col("failed").sum().alias("failed"),
        pl.col("tokens").sum().alias("tokens"),
        pl.col("samples").sum().alias("samples"),
        pl.col("flops_per_token").drop_nulls().last(),
    ).cast(STEP_AGGS).select(list(STEP_AGGS))  # type: ignore[arg-type]


def merge_step_aggregates(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Upsert by (job, incarnation, step); a recomputation from fewer ranks (some already trimmed) never
    replaces one from more."""
    if new.height == 0:
        return old
    if old.height == 0:
        return new
    # Only the old rows whose key is in `new` take part in the upsert. New steps are mostly past every old one:
    # the old rows from new's lowest step on are the only candidates, so the work is O(new), where sorting the
    # whole table every analysis pass (hundreds of thousands of steps over the window) took 100-200 ms.
    keys = new.select(STEP_KEY)
    candidate = (pl.col("step") >= new.get_column("step").min()).fill_null(True)
    maybe = old.filter(candidate)
    hit = maybe.join(keys, on=list(STEP_KEY), how="semi", nulls_equal=True)
    if hit.height == 0:
        return pl.concat([old, new], how="vertical", rechunk=False)
    merged = pl.concat([hit, new]).sort("ranks", "end_ts").unique(list(STEP_KEY), keep="last", maintain_order=False)
    untouched = maybe.join(keys, on=list(STEP_KEY), how="anti", nulls_equal=True)
    return pl.concat([old.filter(~candidate), untouched, merged], how="vertical", rechunk=False)


def latest_runs(aggs: pl.DataFrame) -> pl.DataFrame:
    """Per (job, step), the aggregate of its latest incarnation: the run whose work the job kept (an earlier
    run of a step that a restart re-ran is superseded, as the step-time series and the regression see it)."""
    if aggs.height == 0 or aggs["incarnation"].n_unique() <= 1:
        return aggs
    return aggs.sort("incarnation").unique(["job", "step"], keep="last", maintain_order=False)


def _bit_share(bits: int) -> pl.Expr:
    return ((pl.col("clock_event_mask") & bits) > 0).cast(F32)


def as_gpu_samples(gpus: pl.DataFrame) -> pl.DataFrame:
    """Raw GPU frames as samples of weight 1."""
    busy = (pl.col("utilization_ratio") > 0.5) & (pl.col("sm_clock_max_hertz") > 0)
    return gpus.select(
        "ts", "node", "index", "uuid", pl.lit(1, I32).alias("samples"), pl.col("up").cast(F32).alias("up_ratio"),
        "utilization_ratio", "memory_used_bytes", "temperature_celsius",
        pl.col("temperature_celsius").alias("temperature_max_celsius"), "power_watts", "power_limit_watts",
        "sm_clock_hertz", busy.cast(I32).alias("busy_samples"),
        pl.when(busy).then(pl.col("sm_clock_hertz") / pl.col("sm_clock_max_hertz")).alias("busy_clock_ratio"),
        _bit_share(THERMAL_BITS).alias("thermal_share"), _bit_share(POWER_CAP_BIT).alias("power_cap_share"),
        _bit_share(HW_SLOWDOWN_BITS).alias("hw_slowdown_share"), "clock_event_mask", "health",
        (pl.col("health") == "unhealthy").cast(F32).alias("unhealthy_share"),
        (pl.col("health") == "degraded").cast(F32).alias("degraded_share"),
        "health_reasons", *GPU_LAST, "remap_pending", "remap_failure",
    ).cast(GPU_SAMPLES)  # type: ignore[arg-type]


def _weighted(column: str) -> pl.Expr:
    weight = pl.when(pl.col(column).is_not_null()).then(pl.col("samples")).sum()
    return pl.when(weight > 0).then((pl.col(column) * pl.col("samples")).sum() / weight).alias(column)


def rollup_gpu_samples(samples: pl.DataFrame, every_s: float) -> pl.DataFrame:
    """Samples (raw or rolled up already) summarised per GPU and `every_s` seconds."""
    return (
        samples.sort("ts")
        .group_by((pl.col("ts") // every_s * every_s).alias("bucket"), "uuid")
        .agg(
            pl.col("node").last(), pl.col("index").last(), pl.col("samples").sum(), _weighted("up_ratio"),
            _weighted("utilization_ratio"), pl.col("memory_used_bytes").max(), _weighted("temperature_celsius"),
            pl.col("temperature_max_celsius").max(), _weighted("power_watts"), pl.col("power_limit_watts").min(),
            _weighted("sm_clock_hertz"), pl.col("busy_samples").sum(),
            pl.when(pl.col("busy_samples").filter(pl.col("busy_clock_ratio").is_not_null()).sum() > 0)
            .then((pl.col("busy_clock_ratio") * pl.col("busy_samples")).sum()
                  / pl.col("busy_samples").filter(pl.col("busy_clock_ratio").is_not_null()).sum()).alias("busy_clock_ratio"),
            _weighted("thermal_share"), _weighted("power_cap_share"), _weighted("hw_slowdown_share"),
            pl.col("clock_event_mask").bitwise_or(), pl.col("health").max(),
            _weighted("unhealthy_share"), _weighted("degraded_share"),
            pl.col("health_reasons").list.explode(keep_nulls=False, empty_as_null=False).unique(),
            *(pl.col(c).drop_nulls().last() for c in GPU_LAST),
            pl.col("remap_pending").max(), pl.col("remap_failure").max(),
        )
        .with_columns(pl.col("bucket").alias("ts"),
                      pl.when(pl.col("health_reasons").list.len() > 0).then(pl.col("health_reasons")))
        .cast(GPU_SAMPLES)  # type: ignore[arg-type]
        .select(list(GPU_SAMPLES))
        .sort("ts", "uuid")
    )


def as_host_samples(hosts: pl.DataFrame) -> pl.DataFrame:
    return hosts.select(*(pl.col(c) if c != "samples" else pl.lit(1, I32).alias("samples") for c in HOST_SAMPLES)
                        ).cast(HOST_SAMPLES)  # type: ignore[arg-type]


def rollup_host_samples(samples: pl.DataFrame, every_s: float) -> pl.DataFrame:
    return (
        samples.sort("ts")
        .group_by((pl.col("ts") // every_s * every_s).alias("bucket"), "node")
        .agg(
            pl.col("samples").sum(), _weighted("cpu_utilization_ratio"), pl.col("memory_used_bytes").max(),
            pl.col("memory_total_bytes").drop_nulls().last(), _weighted("load1"), pl.col("gpu_count").min(),
            pl.col("cluster").drop_nulls().last(), pl.col("rack").drop_nulls().last(),
            *(pl.col(c).drop_nulls().last() for c in HOST_COUNTERS),
        )
        .with_columns(pl.col("bucket").alias("ts"))
        .cast(HOST_SAMPLES)  # type: ignore[arg-type]
        .select(list(HOST_SAMPLES))
        .sort("ts", "node")
    )


# Rollup kinds kept in the warm tier beside the raw tables, and how each is made.
ROLLUP_SCHEMAS = {"step_aggs": STEP_AGGS, "gpus_1m": GPU_SAMPLES, "hosts_1m": HOST_SAMPLES,
                  "gpus_1h": GPU_SAMPLES, "hosts_1h": HOST_SAMPLES}
ALL_SCHEMAS = {**SCHEMAS, **ROLLUP_SCHEMAS}


def bounded_step(since: float, until: float, step: float, max_points: int) -> float:
    """`step`, or where [since, until] would touch more than `max_points` buckets of it, the narrowest width in
    whole seconds that touches no more. Buckets start at multiples of their width (as `ts` says), so a range can
    touch one more than its length over the width."""
    def buckets(width: float) -> int:
        return math.floor(until / width) - math.floor(since / width) + 1

    if buckets(step) <= max_points:
        return step
    span = until - since
    width = float(max(1, math.ceil(span / max_points)))
    if buckets(width) > max_points and max_points > 1:
        width = float(max(1, math.ceil(span / (max_points - 1))))  # span/width <= max_points - 1: never one more
    while buckets(width) > max_points:  # max_points 1: until both ends fall in one bucket
        width *= 2
    return width
