"""Training analytics over the steps table: pure polars functions, no I/O."""

from __future__ import annotations

import polars as pl

QUANTILES = (0.5, 0.95, 0.99)


def _q(col: str, q: float) -> pl.Expr:
    return pl.col(col).quantile(q, interpolation="linear").alias(f"{col.removesuffix('_s')}_p{round(q * 100)}_s")


def jobs_overview(steps: pl.DataFrame) -> pl.DataFrame:
    """One row per job: ranks seen, world size, latest step, last report, median step time, tokens/s."""
    return (
        steps.group_by("job")
        .agg(
            pl.col("rank").n_unique().alias("ranks"),
            pl.col("world_size").max().alias("world_size"),
            pl.col("step").max().alias("last_step"),
            (pl.col("ts") + pl.col("duration_s")).max().alias("last_report_ts"),
            pl.len().alias("step_events"),
            pl.col("duration_s").median().alias("step_time_p50_s"),
            pl.col("node").drop_nulls().unique().sort().alias("nodes"),
            # Job throughput: all ranks' tokens over the wall-clock span they cover.
            pl.when(pl.col("tokens").count() > 0)
            .then(pl.col("tokens").sum() / ((pl.col("ts") + pl.col("duration_s")).max() - pl.col("ts").min()))
            .alias("tokens_per_s"),
        )
        .sort("job")
    )


def rank_step_quantiles(steps: pl.DataFrame, job: str) -> pl.DataFrame:
    """Per rank of `job`: step count and step-time p50/p95/p99, with the node and GPU it ran on last."""
    return (
        steps.filter(pl.col("job") == job)
        .sort("ts")
        .group_by("rank")
        .agg(
            pl.len().alias("steps"),
            *(_q("duration_s", q) for q in QUANTILES),
            pl.col("duration_s").mean().alias("step_time_mean_s"),
            pl.col("step").max().alias("last_step"),
            pl.col("node").last().alias("node"),
            pl.col("gpu_uuid").last().alias("gpu_uuid"),
        )
        .rename({"duration_p50_s": "step_time_p50_s", "duration_p95_s": "step_time_p95_s", "duration_p99_s": "step_time_p99_s"})
        .sort("rank")
    )


def rank_breakdown(steps: pl.DataFrame, job: str) -> pl.DataFrame:
    """Per rank of `job`: the mean of each phase (`phase_<name>_mean_s`) and of each reported number
    (`metric_<name>_mean`, e.g. DDP's sync_arrival_s), one column each."""
    rows = steps.filter(pl.col("job") == job).select("rank", "phases", "metrics")
    out = rows.select("rank").unique()
    for column, key, value, prefix, suffix in (("phases", "phase", "seconds", "phase_", "_mean_s"),
                                                ("metrics", "name", "value", "metric_", "_mean")):
        long = rows.select("rank", column).explode(column).drop_nulls(column).unnest(column)
        if long.height == 0:
            continue
        wide = (long.group_by("rank", key).agg(pl.col(value).mean())
                .with_columns((pl.lit(prefix) + pl.col(key) + pl.lit(suffix)).alias(key))
                .pivot(on=key, index="rank", values=value))
        out = out.join(wide, on="rank", how="left")
    return out.sort("rank")


def step_series(steps: pl.DataFrame, job: str, *, last: int | None = None) -> pl.DataFrame:
    """Step time over time for `job`: per step number, when it started and the spread across ranks."""
    series = (
        steps.filter(pl.col("job") == job)
        .group_by("step")
        .agg(
            pl.col("ts").min().alias("ts"),
            pl.len().alias("ranks"),
            pl.col("duration_s").median().alias("step_time_p50_s"),
            pl.col("duration_s").quantile(0.95, interpolation="linear").alias("step_time_p95_s"),
            pl.col("duration_s").max().alias("step_time_max_s"),
        )
        .sort("step")
    )
    return series.tail(last) if last is not None else series
