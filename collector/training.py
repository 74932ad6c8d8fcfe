"""Training analytics over the steps table: pure polars functions, no I/O."""

from __future__ import annotations

import polars as pl

from collector.tables import as_f64, metrics_long, phases_long

QUANTILES = (0.5, 0.95, 0.99)


def _q(col: str, q: float) -> pl.Expr:
    return pl.col(col).quantile(q, interpolation="linear").alias(f"{col.removesuffix('_s')}_p{round(q * 100)}_s")


def jobs_overview(aggs: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """One row per job: ranks seen, world size, latest step, last report, median step time, tokens/s.
    `aggs` (per-step aggregates, collector.rollups) cover the window; `steps` (raw, each rank's recent
    steps) give the ranks, nodes and GPUs."""
    span = pl.col("end_ts").max() - pl.col("ts").min()
    per_job = aggs.group_by("job").agg(
        pl.col("world_size").max(),
        pl.col("step").max().alias("last_step"),
        pl.col("end_ts").max().alias("last_report_ts"),
        pl.col("ranks").sum().cast(pl.Int64).alias("step_events"),
        pl.col("step_time_p50_s").median().cast(pl.Float64).round_sig_figs(7).alias("step_time_p50_s"),
        # Job throughput: all ranks' tokens over the wall-clock span they cover.
        pl.when(pl.col("tokens").sum() > 0).then(pl.col("tokens").sum() / span).alias("tokens_per_s"),
        pl.when(pl.col("samples").sum() > 0).then(pl.col("samples").sum() / span).alias("samples_per_s"),
        pl.col("flops_per_token").drop_nulls().last().alias("flops_per_token"),
    )
    raw = steps.group_by("job").agg(  # unique before the cast to strings: far fewer of them
        pl.col("rank").n_unique().alias("ranks"),
        pl.col("node").drop_nulls().unique().cast(pl.String).sort().alias("nodes"),
        pl.col("gpu_uuid").drop_nulls().unique().cast(pl.String).alias("gpu_uuids"),
    )
    return (per_job.join(raw, on="job", how="left")
            .with_columns(pl.col("job").cast(pl.String), pl.col("ranks").fill_null(0))
            .select("job", "ranks", "world_size", "last_step", "last_report_ts", "step_events", "step_time_p50_s",
                    "nodes", "tokens_per_s", "samples_per_s", "flops_per_token", "gpu_uuids")
            .sort("job"))


# Dense BF16 peak FLOP/s by GPU name (NVIDIA data sheets); the longest matching name wins.
GPU_PEAK_FLOPS = {
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "H100 PCIe": 756e12, "H100": 989e12, "H800": 989e12,
    "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "GB200": 2500e12,
}


def peak_flops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    matches = [key for key in GPU_PEAK_FLOPS if key in gpu_name]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def with_mfu(jobs: pl.DataFrame, gpus: pl.DataFrame) -> pl.DataFrame:
    """Model FLOPs utilisation: tokens/s x FLOPs per token over the peak of the job's GPUs, when both are known."""
    names = (dict(gpus.select(pl.col("uuid").cast(pl.String), pl.col("name").cast(pl.String)).drop_nulls().unique("uuid").iter_rows())
             if gpus.height else {})
    mfu = []
    for row in jobs.iter_rows(named=True):
        peaks = [peak_flops(names.get(uuid)) for uuid in (row.get("gpu_uuids") or [])]
        if row.get("flops_per_token") and row.get("tokens_per_s") and peaks and all(peaks):
            mfu.append(row["tokens_per_s"] * row["flops_per_token"] / sum(peaks))  # type: ignore[arg-type]
        else:
            mfu.append(None)
    return jobs.with_columns(pl.Series("mfu", mfu, dtype=pl.Float64)).drop("gpu_uuids")


def rank_step_quantiles(steps: pl.DataFrame, job: str) -> pl.DataFrame:
    """Per rank of `job`: step count and step-time p50/p95/p99, the mean time before it waited for its
    peers (compute_mean_s, see compute_times), with the node and GPU it ran on last."""
    rows = steps.filter(pl.col("job") == job)
    latest = pl.col("ts").arg_max()
    return (
        rows.with_columns(pl.col("duration_s").cast(pl.Float64), compute_times(rows)["compute_s"])
        .group_by("rank")
        .agg(
            pl.len().alias("steps"),
            *(_q("duration_s", q) for q in QUANTILES),
            pl.col("duration_s").mean().alias("step_time_mean_s"),
            pl.col("compute_s").mean().alias("compute_mean_s"),
            pl.col("step").max().alias("last_step"),
            pl.col("node").get(latest).alias("node"),
            pl.col("gpu_uuid").get(latest).alias("gpu_uuid"),
        )
        .with_columns(pl.col("node", "gpu_uuid").cast(pl.String))
        .rename({"duration_p50_s": "step_time_p50_s", "duration_p95_s": "step_time_p95_s", "duration_p99_s": "step_time_p99_s"})
        .with_columns(pl.col("^step_time_.*$", "compute_mean_s").round_sig_figs(7))
        .sort("rank")
    )


def slowest_ranks(quantiles: pl.DataFrame, top: int) -> pl.DataFrame:
    """The `top` ranks that spent longest before reaching their peers (the likeliest stragglers)."""
    return quantiles.sort("compute_mean_s", descending=True, nulls_last=True).head(top).sort("rank")


def rank_breakdown(steps: pl.DataFrame, job: str) -> pl.DataFrame:
    """Per rank of `job`: the mean of each phase (`phase_<name>_mean_s`) and of each reported number
    (`metric_<name>_mean`, e.g. DDP's sync_arrival_s), one column each."""
    rows = steps.filter(pl.col("job") == job)
    out = rows.select("rank").unique()
    for long, key, value, prefix, suffix in ((phases_long(rows), "phase", "seconds", "phase_", "_mean_s"),
                                             (metrics_long(rows), "name", "value", "metric_", "_mean")):
        if long.height == 0:
            continue
        wide = (long.group_by("rank", key).agg(pl.col(value).mean())
                .with_columns((pl.lit(prefix) + pl.col(key) + pl.lit(suffix)).alias(key))
                .pivot(on=key, index="rank", values=value))
        out = out.join(wide, on="rank", how="left")
    return out.sort("rank")


def step_series(aggs: pl.DataFrame, job: str, *, last: int | None = None) -> pl.DataFrame:
    """Step time over time for `job`: per step number, when it started and the spread across ranks
    (from the per-step aggregates, collector.rollups.step_aggregates)."""
    series = (
        aggs.filter(pl.col("job") == job)
        .select("step", "ts", pl.col("ranks").cast(pl.UInt32),
                *(as_f64(c) for c in ("step_time_p50_s", "step_time_p95_s", "step_time_max_s")))
        .sort("step")
    )
    return series.tail(last) if last is not None else series


# --- detection ----------------------------------------------------------------------------------
STRAGGLER_THRESHOLD = 0.04  # a rank computing 4% longer than its stage's median, persistently
STRAGGLER_WINDOW = 20  # steps
STRAGGLER_MIN_STEPS = 10
HANG_FACTOR, HANG_MIN_S = 3.0, 30.0
STOPPED_AFTER_S = 600.0
REGRESSION_THRESHOLD = 0.025
REGRESSION_RECENT, REGRESSION_BASELINE, REGRESSION_GAP = 150, 400, 50  # 600 steps: what analyse() keeps


def compute_times(steps: pl.DataFrame) -> pl.DataFrame:
    """Per step and rank, the time spent before waiting for peers: DDP's sync arrival when reported,
    else the step minus its `comm` phase, else the whole step."""
    return steps.select(
        "job", pl.col("stage").fill_null(0), "rank", "node", "gpu_uuid", "step", "ts", "duration_s",
        pl.coalesce(pl.col("sync_arrival_s"), pl.col("duration_s") - pl.col("phase_comm_s"),
                    pl.col("duration_s")).cast(pl.Float64).alias("compute_s"),
        pl.col("phase_data_s").cast(pl.Float64).alias("data_s"),
    )


def straggler_scores(steps: pl.DataFrame, window: int = STRAGGLER_WINDOW) -> pl.DataFrame:
    """Per job and rank over the job's last `window` steps: the median of how much longer the rank
    computed than the median of its stage's ranks in the same step. Robust to jitter (medians), to
    the whole job slowing down (relative to the same step), and to uneven pipeline stages."""
    recent = compute_times(steps.filter(pl.col("step") > pl.col("step").max().over("job") - window))
    ratios = recent.with_columns(
        pl.col("compute_s").median().over("job", "stage", "step").alias("peer_s"),
        pl.len().over("job", "stage", "step").alias("peers"),
    ).filter((pl.col("peers") >= 3) & (pl.col("peer_s") > 0)).with_columns(
        (pl.col("compute_s") / pl.col("peer_s") - 1).alias("excess"),
        (pl.col("data_s") / pl.col("data_s").median().over("job", "stage", "step")).alias("data_vs_peers"),
    )
    return (
        ratios.sort("ts")
        .group_by("job", "rank")
        .agg(
            pl.col("excess").median().alias("straggler_score"),
            pl.len().alias("steps_seen"),
            pl.col("stage").last(), pl.col("node").last().cast(pl.String), pl.col("gpu_uuid").last().cast(pl.String),
            pl.col("ts").filter(pl.col("excess") >= STRAGGLER_THRESHOLD).min().alias("since_ts"),
            pl.col("data_vs_peers").median().alias("data_vs_peers"),
        )
        .sort("job", "rank")
    )


def stragglers(scores: pl.DataFrame, threshold: float = STRAGGLER_THRESHOLD) -> pl.DataFrame:
    return scores.filter((pl.col("straggler_score") >= threshold) & (pl.col("steps_seen") >= STRAGGLER_MIN_STEPS))


def slow_nodes(scores: pl.DataFrame, threshold: float = STRAGGLER_THRESHOLD) -> pl.DataFrame:
    """A node whose ranks are slow together: at least two of them, and half of its ranks in the job or a
    node-wide median already most of the way there (its ranks cross the line together, not one by one)."""
    return (
        scores.filter(pl.col("steps_seen") >= STRAGGLER_MIN_STEPS)
        .group_by("job", "node")
        .agg(pl.len().alias("ranks"), (pl.col("straggler_score") >= threshold).sum().alias("slow_ranks"),
             pl.col("straggler_score").median().alias("median_score"), pl.col("since_ts").min(),
             pl.col("rank").filter(pl.col("straggler_score") >= threshold).sort().alias("slow_rank_list"))
        .filter((pl.col("slow_ranks") >= 2)
                & ((pl.col("slow_ranks") * 2 >= pl.col("ranks")) | (pl.col("median_score") >= 0.75 * threshold)))
        .sort("job", "node")
    )


def progress(steps: pl.DataFrame, pauses: pl.DataFrame, now: float) -> pl.DataFrame:
    """Per job: when it last made progress, the silence allowed, whether a pause or an end is declared,
    and which ranks reported last and which stopped first."""
    ends = steps.with_columns((pl.col("ts") + pl.col("duration_s")).alias("end_ts"))
    per_rank = ends.group_by("job", "rank").agg(pl.col("end_ts").max(), pl.col("step").max().alias("last_step"))
    recent_median = (ends.filter(pl.col("step") > pl.col("step").max().over("job") - 200)
                     .group_by("job").agg(pl.col("duration_s").median().cast(pl.Float64).alias("median_step_s")))
    jobs = per_rank.group_by("job").agg(
        pl.col("end_ts").max().alias("last_progress_ts"),
        pl.col("rank").filter(pl.col("end_ts") == pl.col("end_ts").max()).sort().alias("last_reporters"),
        pl.col("rank").filter(pl.col("end_ts") == pl.col("end_ts").min()).sort().alias("first_stopped"),
        pl.col("last_step").max(),
    ).join(recent_median, on="job")
    latest_pause = (pauses.sort("ts").group_by("job", "rank").agg(pl.col("phase").last(), pl.col("reason").last(),
                                                                   pl.col("ts").last().alias("pause_ts")))
    declared = latest_pause.group_by("job").agg(
        ((pl.col("phase") == "begin") & (pl.col("reason") != "finished")).any().alias("paused"),
        ((pl.col("phase") == "begin") & (pl.col("reason") == "finished")).any().alias("finished"),
    )
    return (
        jobs.join(declared, on="job", how="left")
        .with_columns(
            pl.col("paused").fill_null(False), pl.col("finished").fill_null(False),
            (pl.lit(now) - pl.col("last_progress_ts")).alias("silence_s"),
            pl.max_horizontal(pl.col("median_step_s") * HANG_FACTOR, pl.lit(HANG_MIN_S)).alias("hang_after_s"),
        )
        .with_columns(
            ((pl.col("silence_s") > pl.col("hang_after_s")) & ~pl.col("paused") & ~pl.col("finished")
             & (pl.col("silence_s") <= STOPPED_AFTER_S)).alias("hung"),
            ((pl.col("silence_s") > STOPPED_AFTER_S) & ~pl.col("finished")).alias("stopped"),
            pl.col("job").cast(pl.String),
        )
        .sort("job")
    )


def step_time_change(aggs: pl.DataFrame) -> pl.DataFrame:
    """Per job: the median step time of its last REGRESSION_RECENT steps against a baseline of the
    REGRESSION_BASELINE steps before them (with a gap, so a change is not half in both windows).
    `change_ratio` 0.03 means 3% slower; jobs with too short a history are left out. Reads the
    per-step aggregates (each step's median across ranks)."""
    series = aggs.select("job", "step", pl.col("step_time_p50_s").cast(pl.Float64).alias("duration_s"), "ts").sort("job", "step")
    need = REGRESSION_RECENT + REGRESSION_GAP + REGRESSION_BASELINE
    return (
        series.group_by("job")
        .agg(
            pl.len().alias("steps"),
            pl.col("duration_s").tail(REGRESSION_RECENT).median().alias("recent_s"),
            pl.col("duration_s").tail(need).head(REGRESSION_BASELINE).median().alias("baseline_s"),
            pl.col("ts").tail(REGRESSION_RECENT).first().alias("recent_since_ts"),
        )
        .filter(pl.col("steps") >= need)
        .with_columns((pl.col("recent_s") / pl.col("baseline_s") - 1).alias("change_ratio"), pl.col("job").cast(pl.String))
        .sort("job")
    )


def rank_step_matrix(steps: pl.DataFrame, job: str, last: int = 100, ranks: list[int] | None = None) -> pl.DataFrame:
    """Per step and rank of `job`'s last steps: compute time over the step's median (1.0 = typical), for a
    heatmap; only `ranks` when given (the median is still over all of them)."""
    rows = steps.filter(pl.col("job") == job)
    rows = rows.filter(pl.col("step") > pl.col("step").max() - last)
    cells = (compute_times(rows)
             .with_columns((pl.col("compute_s") / pl.col("compute_s").median().over("stage", "step")).alias("relative")))
    if ranks is not None:
        cells = cells.filter(pl.col("rank").is_in(ranks))
    return cells.select("step", "rank", pl.col("node").cast(pl.String), "compute_s", "relative").sort("step", "rank")
