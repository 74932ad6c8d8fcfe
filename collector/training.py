"""Training analytics over the steps table: pure polars functions, no I/O."""

from __future__ import annotations

import polars as pl

from collector.rollups import latest_runs
from collector.tables import PHASE_COLUMNS, PHASES, as_f64, metrics_long, phases_long

QUANTILES = (0.5, 0.95, 0.99)


def _q(col: str, q: float) -> pl.Expr:
    return pl.col(col).quantile(q, interpolation="linear").alias(f"{col.removesuffix('_s')}_p{round(q * 100)}_s")


def job_roster(steps: pl.DataFrame) -> pl.DataFrame:
    """Per job of the raw steps: its ranks, nodes and GPUs."""
    return steps.group_by("job").agg(  # unique before the cast to strings: far fewer of them
        pl.col("rank").n_unique().alias("ranks"),
        pl.col("node").drop_nulls().unique().cast(pl.String).sort().alias("nodes"),
        pl.col("gpu_uuid").drop_nulls().unique().cast(pl.String).alias("gpu_uuids"),
    )


def jobs_overview(aggs: pl.DataFrame, steps: pl.DataFrame | None = None, *, roster: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per job: ranks seen, world size, latest step, last report, median step time, tokens/s.
    `aggs` (per-step aggregates, collector.rollups) cover the window; `steps` (raw, each rank's recent
    steps) give the ranks, nodes and GPUs, or their `roster` (job_roster) computed already."""
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
    raw = roster if roster is not None else job_roster(steps)  # type: ignore[arg-type]
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
    known = jobs.filter((pl.col("flops_per_token").fill_null(0) != 0) & (pl.col("tokens_per_s").fill_null(0) != 0)
                        & (pl.col("gpu_uuids").list.len() > 0))
    if known.height == 0 or gpus.height == 0:
        return jobs.with_columns(pl.lit(None, pl.Float64).alias("mfu")).drop("gpu_uuids")
    # Each GPU's peak by its name, looked up once per name (a 16k-GPU job has a handful of names).
    names = gpus.select(pl.col("uuid").cast(pl.String), pl.col("name").cast(pl.String)).drop_nulls().unique("uuid")
    peaks = {name: peak_flops(name) for name in names["name"].unique().to_list()}
    names = names.with_columns(pl.col("name").replace_strict(peaks, default=None, return_dtype=pl.Float64).alias("peak"))
    per_job = (known.select("job", pl.col("gpu_uuids").alias("uuid")).explode("uuid")
               .join(names.select("uuid", "peak"), on="uuid", how="left")
               .group_by("job").agg(pl.col("peak").sum().alias("_peaks"), pl.col("peak").is_null().any().alias("_unknown")))
    return (jobs.join(per_job, on="job", how="left", maintain_order="left")
            .with_columns(pl.when(~pl.col("_unknown") & (pl.col("_peaks") > 0))
                          .then(pl.col("tokens_per_s") * pl.col("flops_per_token") / pl.col("_peaks")).alias("mfu"))
            .drop("gpu_uuids", "_peaks", "_unknown"))


def kept_runs(rows: pl.DataFrame) -> pl.DataFrame:
    """A job's rows with each (rank, step) once: a step that a restart ran again counts its latest run only,
    the run whose work the job kept (as latest_runs has it for the per-step aggregates)."""
    if "incarnation" in rows.columns and rows["incarnation"].n_unique() > 1:
        return rows.sort("incarnation").unique(["rank", "step"], keep="last", maintain_order=True)
    return rows


def rank_step_quantiles(steps: pl.DataFrame, job: str) -> pl.DataFrame:
    """Per rank of `job`: step count and step-time p50/p95/p99, the mean time before it waited for its
    peers (compute_mean_s, see compute_times), the mean share of each of the last STRAGGLER_WINDOW steps its
    peers waited for it (excess_mean, see step_excess), with the node and GPU it ran on last. A step run
    again after a restart counts once, by its latest run (kept_runs)."""
    rows = kept_runs(steps.filter(pl.col("job") == job))
    latest = pl.col("ts").arg_max()
    recent = rows.filter(pl.col("step") > pl.col("step").max() - STRAGGLER_WINDOW)
    excess = step_excess(recent).group_by("rank").agg(pl.col("excess").mean().round(5).alias("excess_mean"))
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
        .join(excess, on="rank", how="left")
        .sort("rank")
    )


def slowest_ranks(quantiles: pl.DataFrame, top: int) -> pl.DataFrame:
    """The `top` ranks that kept their peers waiting longest (the likeliest stragglers)."""
    return quantiles.sort(["excess_mean", "compute_mean_s"], descending=True, nulls_last=True).head(top).sort("rank")


def rank_breakdown(steps: pl.DataFrame, job: str) -> pl.DataFrame:
    """Per rank of `job`: the mean of each phase (`phase_<name>_mean_s`) and of each reported number
    (`metric_<name>_mean`, e.g. DDP's sync_arrival_s), one column each; a step run again counts once (kept_runs)."""
    rows = kept_runs(steps.filter(pl.col("job") == job))
    out = rows.select("rank").unique()
    for long, key, value, prefix, suffix in ((phases_long(rows), "phase", "seconds", "phase_", "_mean_s"),
                                             (metrics_long(rows), "name", "value", "metric_", "_mean")):
        if long.height == 0:
            continue
        wide = (long.group_by("rank", key).agg(pl.col(value).mean())
                .with_columns((pl.lit(prefix) + pl.col(key) + pl.lit(suffix)).alias(key))
                .pivot(on=key, index="rank", values=value))
        # The pivot's columns come in the order its groups did, which varies from call to call: the known phases in
        # a step's order, then the others by name.
        known = [f"{prefix}{p}{suffix}" for p in PHASES] if key == "phase" else []
        columns = [c for c in known if c in wide.columns] + sorted(c for c in wide.columns if c != "rank" and c not in known)
        out = out.join(wide.select("rank", *columns), on="rank", how="left")
    return out.sort("rank")


def step_series(aggs: pl.DataFrame, job: str, *, last: int | None = None) -> pl.DataFrame:
    """Step time over time for `job`: per step number, when it started and the spread across ranks
    (from the per-step aggregates, collector.rollups.step_aggregates), of the step's latest run: a step
    that a restart ran again shows its new run, with the incarnation it belongs to."""
    series = (
        latest_runs(aggs.filter(pl.col("job") == job))
        .select("step", "ts", pl.col("ranks").cast(pl.UInt32),
                *(as_f64(c) for c in ("step_time_p50_s", "step_time_p95_s", "step_time_max_s")), "incarnation")
        .sort("step")
    )
    return series.tail(last) if last is not None else series


# --- detection ----------------------------------------------------------------------------------
STRAGGLER_THRESHOLD = 0.04  # the least excess that is a finding: 4% of the step, and past the job's own noise
STRAGGLER_PAGE_SHARE = 0.05  # a straggler pages when its peers wait this share of every step for it; else a ticket
STRAGGLER_WINDOW = 16  # steps scored: the excess must hold over them, in 3 of 4 of them and over the last half
STRAGGLER_MIN_STEPS = 12  # a rank is judged on (nearly) a full window: the job's newest step may be half reported
STRAGGLER_NOISE_K = 4.0  # a rank's excess must stand this many of its own noise's deviations above its peers'
WARMUP_STEPS = 10  # the first steps of each incarnation of a rank are warm-up: never judged
HANG_FACTOR, HANG_MIN_S = 3.0, 30.0
STOPPED_AFTER_S = 600.0
REGRESSION_THRESHOLD = 0.025
REGRESSION_RECENT, REGRESSION_BASELINE, REGRESSION_GAP = 150, 400, 50  # 600 steps: what analyse() keeps

# How much longer a rank took than its peers, whatever the job reports. DDP's arrival at its first
# all-reduce says it directly. Otherwise the phases do: a straggler is longer in the phase where its extra
# work is, and shorter in the one that holds the collective wait (it waits less); its excess is the sum
# of its other phases' deviations from its peers. The wait is in `comm` when the job times one, else in
# `backward` (where DDP all-reduces); a job with neither holds it in the phase whose deviation moves
# against the rest of the rank's step (each rank's own jitter shows in it, reversed). The whole step
# counts too (it is the same on every rank of a synchronous job, but a job need not be synchronous).
# From one rank's numbers alone "longer in A, shorter in B" reads both ways; the names break the tie
# where the statistics cannot: with one straggler, both of its odd phases move against the rest.
WAIT_CORRELATION = -0.3  # a phase whose deviation correlates this negatively with the rest holds the wait


def compute_times(steps: pl.DataFrame) -> pl.DataFrame:
    """Per step and rank, the time spent before waiting for peers: DDP's sync arrival when reported,
    else the step minus its `comm` phase, else the whole step."""
    return steps.select(
        "job", pl.col("stage").fill_null(0), "rank", "node", "gpu_uuid", "step", "ts", "duration_s",
        pl.coalesce(pl.col("sync_arrival_s"), pl.col("duration_s") - pl.col("phase_comm_s"),
                    pl.col("duration_s")).cast(pl.Float64).alias("compute_s"),
        pl.col("phase_data_s").cast(pl.Float64).alias("data_s"),
    )


def kept(frame: pl.DataFrame, predicate: pl.Expr) -> pl.DataFrame:
    """`frame.filter(predicate)`, but `frame` itself when every row passes: a filter copies every column, and the
    detectors' filters mostly keep every row (at 16,384 ranks each copy of the steps was hundreds of MB)."""
    mask = frame.select(predicate.fill_null(False).alias("_kept")).to_series()
    return frame if mask.all() else frame.filter(mask)


def current_incarnation(steps: pl.DataFrame, warmup: int = WARMUP_STEPS) -> pl.DataFrame:
    """Each rank's rows since its latest (re)start, less its first `warmup` steps. A rank restarts when its
    step number goes back (a checkpoint restored) or its pid changes; its first rows are warm-up (compiling,
    allocators, caches filling) and say nothing about the hardware under it."""
    rank = ("job", "rank")
    ordered = steps.sort("ts")
    prev_step, prev_pid = pl.col("step").shift(1).over(rank), pl.col("pid").shift(1).over(rank)
    restart = (prev_step.is_null() | (pl.col("step") < prev_step)
               | ((pl.col("pid") != prev_pid) & (pl.col("pid") > 0) & (prev_pid > 0)).fill_null(False))
    marked = ordered.with_columns(restart.cast(pl.Int32).cum_sum().over(rank).alias("_incarnation"))
    marked = marked.with_columns(
        (pl.col("_incarnation") == pl.col("_incarnation").max().over(rank)).alias("_latest"),
        pl.int_range(pl.len()).over(*rank, "_incarnation").alias("_position"))
    return marked.filter(pl.col("_latest") & (pl.col("_position") >= warmup)).drop("_incarnation", "_latest", "_position")


def step_excess(steps: pl.DataFrame) -> pl.DataFrame:
    """Per step and rank: `excess_s`, how much longer than its stage's peers the rank took (see above),
    `step_s` the peers' median step, and `excess` the first over the second (0.1: its peers waited 10% of
    the step for it). Steps with fewer than 3 peers are left out."""
    keys, group = ["job", "stage", "step"], ["job", "stage"]
    phases = [c for c in PHASE_COLUMNS if c in steps.columns]
    measures = [*phases, "sync_arrival_s", "duration_s"]
    rows = steps.with_columns(pl.col("stage").fill_null(0), *(pl.col(c).cast(pl.Float64) for c in measures))
    # the peers' medians: one group-by joined back (a window per column costs ten times as much)
    peers = rows.group_by(keys).agg(*(pl.col(c).median().alias(f"_m{i}") for i, c in enumerate(measures)),
                                    pl.len().alias("peers"))
    rows = rows.join(peers, on=keys, how="left").with_columns(
        *((pl.col(c) - pl.col(f"_m{i}")).alias(f"_d{i}") for i, c in enumerate(measures)),  # deviations from the peers
        pl.col(f"_m{len(measures) - 1}").alias("step_s"),
        (pl.col("phase_data_s") / pl.col(f"_m{measures.index('phase_data_s')}")).alias("data_vs_peers")
        if "phase_data_s" in measures else pl.lit(None, pl.Float64).alias("data_vs_peers"),
    )
    dev = {c: pl.col(f"_d{i}") for i, c in enumerate(measures)}
    d = [dev[c] for c in phases]
    total = pl.sum_horizontal(x.fill_null(0) for x in d)
    rows = rows.with_columns(total.alias("_total"), pl.any_horizontal(x.is_not_null() for x in d).alias("_phased"))
    # the phase that holds the wait: comm, else backward, when the job (and stage) reports it ...
    named = [c for c in ("phase_comm_s", "phase_backward_s") if c in phases]
    reported = rows.group_by(group).agg(*(pl.col(c).is_not_null().any().alias(f"_has{i}") for i, c in enumerate(named)))
    rows = rows.join(reported, on=group, how="left")
    wait = pl.lit(None, pl.Float64)
    for i, c in reversed(list(enumerate(named))):
        wait = pl.when(pl.col(f"_has{i}")).then(dev[c].fill_null(0)).otherwise(wait)
    # ... else the one that moves against the rest of the rank's step (only computed where needed)
    if rows.select(wait.is_null() & pl.col("_phased")).to_series().any():
        corrs = [pl.corr(x, pl.col("_total") - x).over(group).fill_nan(None).fill_null(1.0) for x in d]
        lowest = pl.min_horizontal(corrs)
        guess = pl.lit(0.0)
        for x, c in zip(d, corrs):
            guess = pl.when((c == lowest) & (lowest <= WAIT_CORRELATION)).then(x.fill_null(0)).otherwise(guess)
        wait = pl.coalesce(wait, guess)
    phased = pl.when(pl.col("_phased")).then(pl.col("_total") - wait.fill_null(0))
    measured = pl.coalesce(pl.max_horizontal(dev["sync_arrival_s"], phased), dev["duration_s"])
    # the whole step too: the same on every rank of a synchronous job, but not of every job
    out = (rows.with_columns(pl.max_horizontal(measured, dev["duration_s"]).alias("excess_s"), measured.alias("_measured"))
           .filter((pl.col("peers") >= 3) & (pl.col("step_s") > 0))
           .with_columns((pl.col("excess_s") / pl.col("step_s")).alias("excess"),
                         (pl.col("_measured") / pl.col("step_s")).alias("measured_excess")))
    return out.select(*steps.columns, "step_s", "peers", "data_vs_peers", "excess_s", "excess", "measured_excess")


def straggler_scores(steps: pl.DataFrame, window: int = STRAGGLER_WINDOW) -> pl.DataFrame:
    """Per job and rank over the job's last `window` steps (of each rank's current incarnation, warm-up left
    out): `straggler_score`, the median of the rank's excess (step_excess) above the typical excess of its
    stage's ranks, i.e. the share of each step its peers wait for it; `recent_score`, the same over the last
    half of the window; and `threshold`, what the score must reach for a finding: STRAGGLER_THRESHOLD, or
    more in a noisy job (STRAGGLER_NOISE_K times the noise of a median of this many steps, from the spread
    of the job's own per-step excess, and from the spread of its ranks' scores). Robust to jitter and
    bursts (medians), to the whole job slowing down (relative to the same step), and to uneven stages."""
    # Only the recent past can hold the window: its steps and the warm-up before them, twice over for pauses
    # (sorting each rank's whole history to find its incarnations costs seconds at 16k ranks). After a pause
    # longer than that, a rank is judged again once it has a window of steps. (The mean step: a median of
    # millions of rows costs more than the rest.)
    span = (2 * (window + WARMUP_STEPS) * pl.col("duration_s").mean()).over("job")
    recent = kept(steps, pl.col("ts") >= pl.col("ts").max().over("job") - span)
    live = current_incarnation(recent)
    live = live.filter(pl.col("step") > pl.col("step").max().over("job") - window)
    excess = step_excess(live)
    group = ("job", "stage")
    excess = excess.with_columns(pl.col("excess").median().over(group).alias("_base")).with_columns(
        (pl.col("excess") - pl.col("_base")).alias("_above"),
        # the noise of the measure itself (not of its max with the whole step, which is flat when it is synchronous)
        ((pl.col("measured_excess") - pl.col("measured_excess").median().over(group)).abs().median().over(group)
         * 1.4826).alias("_sigma"),
        (pl.col("step") > pl.col("step").max().over("job") - window // 2).alias("_recent"),
    )
    ranks = (
        excess.sort("ts")
        .group_by("job", "rank")
        .agg(
            pl.col("_above").median().alias("straggler_score"),
            pl.col("_above").filter(pl.col("_recent")).median().alias("recent_score"),
            pl.col("_above").quantile(0.25, "nearest").alias("floor_score"),
            pl.len().alias("steps_seen"),
            pl.col("stage").last(), pl.col("node").last().cast(pl.String), pl.col("gpu_uuid").last().cast(pl.String),
            pl.col("_sigma").first(),
            pl.col("ts").filter(pl.col("_above") >= STRAGGLER_THRESHOLD).min().alias("since_ts"),
            pl.col("excess_s").median().alias("excess_s"),
            pl.col("step_s").median().alias("step_s"),
            pl.col("data_vs_peers").median().alias("data_vs_peers"),
        )
    )
    spread = (pl.col("straggler_score") - pl.col("straggler_score").median().over(group)).abs().median().over(group) * 1.4826
    return (
        ranks.with_columns(
            pl.max_horizontal(
                pl.lit(STRAGGLER_THRESHOLD),
                STRAGGLER_NOISE_K * 1.2533 * pl.col("_sigma") / pl.col("steps_seen").cast(pl.Float64).sqrt(),
                STRAGGLER_NOISE_K * spread,
            ).alias("threshold"))
        .drop("_sigma")
        .sort("job", "rank")
    )


def _slow() -> pl.Expr:
    return ((pl.col("straggler_score") >= pl.col("threshold")) & (pl.col("recent_score") >= pl.col("threshold"))
            & (pl.col("floor_score") >= pl.col("threshold") / 2) & (pl.col("steps_seen") >= STRAGGLER_MIN_STEPS))


def stragglers(scores: pl.DataFrame) -> pl.DataFrame:
    """The ranks whose excess holds above their threshold over the window and over its last half, and above
    half of it in at least 3 of 4 steps (a rank slow in a few bursts is not a straggler)."""
    return scores.filter(_slow())


def node_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """Per job and node with peers (the job has at least as many ranks on other nodes as on it): its ranks,
    how many are slow, their median score and threshold."""
    judged = scores.filter(pl.col("steps_seen") >= STRAGGLER_MIN_STEPS).with_columns(
        pl.len().over("job").alias("_job_ranks"), _slow().alias("_slow"))
    return (
        judged.group_by("job", "node")
        .agg(pl.len().alias("ranks"), pl.col("_slow").sum().alias("slow_ranks"), pl.col("_job_ranks").first(),
             pl.col("straggler_score").median().alias("median_score"), pl.col("threshold").median(),
             pl.col("since_ts").min(), pl.col("rank").filter(pl.col("_slow")).sort().alias("slow_rank_list"))
        .filter((pl.col("ranks") >= 2) & (pl.col("_job_ranks") >= 2 * pl.col("ranks")))
        .drop("_job_ranks")
        .sort("job", "node")
    )


def slow_nodes(nodes: pl.DataFrame) -> pl.DataFrame:
    """A node whose ranks are slow together: at least two of them, and half of its ranks in the job or a
    node-wide median already most of the way there (its ranks cross the line together, not one by one).
    Only a node with peers: the job has at least as many ranks on other nodes as on it. `nodes`: node_scores'."""
    return nodes.filter(
        (pl.col("slow_ranks") >= 2)
        & ((pl.col("slow_ranks") * 2 >= pl.col("ranks")) | (pl.col("median_score") >= 0.75 * pl.col("threshold"))))


def rising_nodes(nodes: pl.DataFrame) -> pl.DataFrame:
    """Nodes whose ranks are slowing together but are not (yet) a slow node: the node-wide median is half way
    to the threshold. Their ranks are not reported one by one as stragglers: that would be the node, told
    piecemeal, before it is told whole."""
    return nodes.filter(pl.col("median_score") >= 0.5 * pl.col("threshold"))


def progress(steps: pl.DataFrame, pauses: pl.DataFrame, now: float) -> pl.DataFrame:
    """Per job: when it last made progress, the silence allowed, whether a pause or an end is declared,
    which ranks reached the furthest step and which stopped a step (or more) before them."""
    ends = steps.select("job", "rank", "step", "duration_s", (pl.col("ts") + pl.col("duration_s")).alias("end_ts"))
    per_rank = ends.group_by("job", "rank").agg(pl.col("end_ts").max(), pl.col("step").max().alias("last_step"))
    recent_median = (ends.filter(pl.col("step") > pl.col("step").max().over("job") - 200)
                     .group_by("job").agg(pl.col("duration_s").median().cast(pl.Float64).alias("median_step_s")))
    jobs = per_rank.group_by("job").agg(
        pl.col("end_ts").max().alias("last_progress_ts"),
        # Ranks stuck in a collective finished one step more than the rank they wait for: the ranks that reached
        # the furthest step, and those left behind (none when every rank stopped at the same step).
        pl.col("rank").filter(pl.col("last_step") == pl.col("last_step").max()).sort().alias("last_reporters"),
        pl.col("rank").filter((pl.col("last_step") == pl.col("last_step").min())
                              & (pl.col("last_step").min() < pl.col("last_step").max())).sort().alias("first_stopped"),
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
    per-step aggregates (each step's median across ranks; of its latest run, when a restart ran it again)."""
    series = latest_runs(aggs).select("job", "step", pl.col("step_time_p50_s").cast(pl.Float64).alias("duration_s"), "ts").sort("job", "step")
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
    heatmap; only `ranks` when given (the median is still over all of them). A job that reports neither DDP's
    arrival nor a `comm` phase has no compute time apart from its wait: its cells are 1 + the rank's excess
    over its peers (step_excess), the same scale. A cell without a scale (its step's median compute time is 0) is
    null."""
    rows = kept_runs(steps.filter(pl.col("job") == job))  # a step run again: its latest run
    rows = rows.filter(pl.col("step") > pl.col("step").max() - last)
    direct = (pl.col("sync_arrival_s").is_not_null() | pl.col("phase_comm_s").is_not_null()).any()
    cells = compute_times(rows).with_columns(
        (pl.col("compute_s") / pl.col("compute_s").median().over("stage", "step")).alias("relative"))
    if rows.height and not rows.select(direct).item():
        excess = step_excess(rows).select("rank", "step", "excess")
        cells = cells.join(excess, on=["rank", "step"], how="left").with_columns(
            pl.when(pl.col("excess").is_not_null()).then(1 + pl.col("excess")).otherwise(pl.col("relative")).alias("relative"))
    if ranks is not None:
        cells = cells.filter(pl.col("rank").is_in(ranks))
    # A step whose median compute time is 0 (every rank reported its wait from the start) has no scale: null.
    relative = pl.when(pl.col("relative").is_finite()).then(pl.col("relative")).alias("relative")
    return cells.select("step", "rank", pl.col("node").cast(pl.String), "compute_s", relative).sort("step", "rank")
