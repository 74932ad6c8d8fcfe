"""Fleet views over the hosts and gpus tables: pure polars functions, no I/O."""

from __future__ import annotations

import polars as pl


def latest_per(frame: pl.DataFrame, *keys: str) -> pl.DataFrame:
    """The most recent row of each key."""
    return frame.sort("ts").group_by(*keys, maintain_order=True).last()


def nodes_overview(hosts: pl.DataFrame, gpus: pl.DataFrame, now: float) -> pl.DataFrame:
    """One row per node: its latest frame, how old it is, and GPU aggregates from that same frame."""
    latest = latest_per(hosts, "node").with_columns((pl.lit(now) - pl.col("ts")).alias("age_s"))
    gpu_latest = gpus.join(latest.select("node", "ts"), on=["node", "ts"], how="inner")
    gpu_agg = gpu_latest.group_by("node").agg(
        pl.col("utilization_ratio").mean().alias("gpu_utilization_mean_ratio"),
        pl.col("temperature_celsius").max().alias("gpu_temperature_max_celsius"),
        pl.col("power_watts").sum().alias("gpu_power_watts"),
        (~pl.col("up")).sum().alias("gpus_down"),
    )
    return latest.join(gpu_agg, on="node", how="left").drop("agent_id").sort("node")


def node_gpus(gpus: pl.DataFrame, node: str) -> pl.DataFrame:
    """The latest state of each GPU of one node."""
    return latest_per(gpus.filter(pl.col("node") == node), "index").sort("index")


def fleet_gpus(gpus: pl.DataFrame) -> pl.DataFrame:
    """The latest state of every GPU in the fleet."""
    return latest_per(gpus, "node", "index").sort("node", "index")


def node_series(hosts: pl.DataFrame, gpus: pl.DataFrame, node: str, since: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A node's host and GPU frames since `since`, for its time series."""
    def rate(column: str) -> pl.Expr:  # per second between frames; a counter that went down (a restart) gives null
        delta = pl.col(column).diff()
        return pl.when(delta >= 0).then(delta / pl.col("ts").diff()).alias(column.replace("_total", "_per_second"))

    host = hosts.filter((pl.col("node") == node) & (pl.col("ts") >= since)).sort("ts").select(
        "ts", "cpu_utilization_ratio", "memory_used_bytes", "memory_total_bytes", "load1",
        rate("network_receive_bytes_total"), rate("network_transmit_bytes_total"),
        rate("disk_read_bytes_total"), rate("disk_written_bytes_total"))
    gpu = gpus.filter((pl.col("node") == node) & (pl.col("ts") >= since)).select(
        "ts", "index", "utilization_ratio", "temperature_celsius", "power_watts", "sm_clock_hertz", "health").sort("ts", "index")
    return host, gpu


def health_events(gpus: pl.DataFrame, node: str) -> pl.DataFrame:
    """Spans during which a GPU of the node was not healthy, with the reasons, and XIDs as they were counted."""
    rows = gpus.filter(pl.col("node") == node).sort("index", "ts")
    spans = (
        rows.filter(pl.col("health").is_in(["degraded", "unhealthy"]))
        .with_columns(pl.col("health_reasons").list.join(", ").alias("reasons"))
        .group_by("index", "health", "reasons")
        .agg(pl.col("ts").min().alias("from_ts"), pl.col("ts").max().alias("to_ts"))
    )
    xids = (
        rows.with_columns((pl.col("xid_total") - pl.col("xid_total").shift(1).over("index")).alias("new"))
        .filter(pl.col("new") > 0)
        .select("index", pl.lit("xid").alias("health"), (pl.col("new").cast(pl.String) + pl.lit(" new XID(s)")).alias("reasons"),
                pl.col("ts").alias("from_ts"), pl.col("ts").alias("to_ts"))
    )
    return pl.concat([spans, xids.cast(spans.schema)], how="vertical").sort("from_ts", descending=True)  # type: ignore[arg-type]
