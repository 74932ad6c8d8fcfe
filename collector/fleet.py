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
