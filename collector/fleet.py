"""Fleet views: the latest state of each node and GPU, a node's series, GPU health events (pure polars).

The "now" views read the latest frame of each node and GPU; series and events read *samples*
(collector.rollups): raw frames where the hot tier keeps them, rollups before, and the warm tier
for what is older still.
"""

from __future__ import annotations

import polars as pl

from collector.rollups import (HOST_COUNTERS, bounded_step, rollup_gpu_samples, rollup_host_samples, span_inputs,
                               with_counter_steps)


def _strings(frame: pl.DataFrame) -> pl.DataFrame:
    """Categorical and enum columns as plain strings, for JSON."""
    return frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String),
                              pl.col(pl.List(pl.Categorical)).cast(pl.List(pl.String)))


def latest_per(frame: pl.DataFrame, *keys: str) -> pl.DataFrame:
    """The most recent row of each key."""
    return frame.sort("ts").group_by(*keys, maintain_order=True).last()


def nodes_overview(hosts: pl.DataFrame, gpus: pl.DataFrame, now: float) -> pl.DataFrame:
    """One row per node: its latest frame, how old it is, and GPU aggregates from that same frame.
    `hosts` and `gpus` hold at least each node's and GPU's latest frame."""
    latest = latest_per(hosts, "node").with_columns((pl.lit(now) - pl.col("ts")).alias("age_s"))
    gpu_latest = gpus.join(latest.select("node", "ts"), on=["node", "ts"], how="inner")
    gpu_agg = gpu_latest.group_by("node").agg(
        pl.col("utilization_ratio").mean().cast(pl.Float64).alias("gpu_utilization_mean_ratio"),
        pl.col("temperature_celsius").max().cast(pl.Float64).alias("gpu_temperature_max_celsius"),
        pl.col("power_watts").sum().cast(pl.Float64).alias("gpu_power_watts"),
        (~pl.col("up")).sum().alias("gpus_down"),
        *(((pl.col("health") == state).sum().alias(f"gpus_{state}") for state in ("degraded", "unhealthy"))
          if "health" in gpus.columns else ()),
    )
    return _strings(latest.join(gpu_agg, on="node", how="left").drop("agent_id", strict=False).sort(pl.col("node").cast(pl.String)))


def node_gpus(gpus: pl.DataFrame, node: str) -> pl.DataFrame:
    """The latest state of each GPU of one node."""
    return _strings(latest_per(gpus.filter(pl.col("node") == node), "index").sort("index"))


def fleet_gpus(gpus: pl.DataFrame) -> pl.DataFrame:
    """The latest state of every GPU in the fleet."""
    return _strings(latest_per(gpus, "node", "index").sort(pl.col("node").cast(pl.String), "index"))


def downsample_every(since: float, until: float, max_points: int, floor: float = 0.0) -> float:
    """Bucket width (seconds) so that [since, until] touches at most `max_points` buckets (they start at multiples
    of their width, so a range can touch one more than its length over the width); 0: keep every sample."""
    width = (until - since) / max(1, max_points)
    return 0.0 if width <= floor else bounded_step(since, until, width, max(1, max_points))


def node_series(host: pl.DataFrame, gpu: pl.DataFrame, since: float, until: float,
                max_points: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A node's host and GPU samples over [since, until], at most `max_points` per series, for its charts.
    Counters become per-second rates between points (null across an agent restart)."""
    every = downsample_every(since, until, max_points)
    if every and host.height > max_points:
        host = rollup_host_samples(host, every)
    if every and gpu.height > max_points * max(1, gpu["uuid"].n_unique()):
        gpu = rollup_gpu_samples(gpu, every)

    def rate(column: str) -> pl.Expr:
        delta = pl.col(column).diff()
        return pl.when(delta >= 0).then(delta / pl.col("ts").diff()).alias(column.replace("_total", "_per_second"))

    host = host.sort("ts").select(
        "ts", pl.col("cpu_utilization_ratio").cast(pl.Float64), "memory_used_bytes", "memory_total_bytes",
        pl.col("load1").cast(pl.Float64), *(rate(c) for c in HOST_COUNTERS if "bytes" in c))
    gpu = _strings(gpu.select(
        "ts", "index", *(pl.col(c).cast(pl.Float64) for c in ("utilization_ratio", "temperature_celsius", "power_watts",
                                                               "sm_clock_hertz")), "health").sort("ts", "index"))
    return host, gpu


def health_events(gpu: pl.DataFrame) -> pl.DataFrame:
    """Spans during which a GPU was not healthy, with the reasons, and XIDs as they were counted
    (from samples of one node's GPUs)."""
    rows = gpu.sort("index", "ts")
    spans = (
        rows.filter(pl.col("health").is_in(["degraded", "unhealthy"]))
        .with_columns(pl.col("health_reasons").cast(pl.List(pl.String)).list.sort().list.join(", ").fill_null("").alias("reasons"),
                      pl.col("health").cast(pl.String))
        .group_by("index", "health", "reasons")
        .agg(pl.col("ts").min().alias("from_ts"), pl.col("ts").max().alias("to_ts"))
    )
    # XIDs counted as the rollups and the reliability record count them (collector.rollups.with_counter_steps): a
    # drop is an agent restart, after which the whole value is new; a rollup that keeps its span's first value and
    # increase within steps to its first value, then adds what was counted inside its minute or hour (a restart
    # within it included). Rows without a count (the agent could not read it) count nothing.
    counted = with_counter_steps(span_inputs(rows), ["index"])
    xids = (
        counted.with_columns((pl.col("_step_xid_total") + pl.col("xid_total_within")).alias("new"))
        .filter(pl.col("new") > 0)
        .select("index", pl.lit("xid").alias("health"), (pl.col("new").cast(pl.String) + pl.lit(" new XID(s)")).alias("reasons"),
                pl.col("ts").alias("from_ts"), pl.col("ts").alias("to_ts"))
    )
    return pl.concat([spans, xids.cast(spans.schema)], how="vertical").sort(  # type: ignore[arg-type]
        "from_ts", "index", "health", "reasons", descending=[True, False, False, False])  # ties in a fixed order
