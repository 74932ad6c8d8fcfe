"""Inference analytics over the requests table: pure polars functions, no I/O."""

from __future__ import annotations

import math

import polars as pl

LATENCIES = ("e2e_s", "queue_s", "ttft_s", "tpot_s")
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def services_overview(requests: pl.DataFrame) -> pl.DataFrame:
    """One row per service and model: requests, error ratio, median e2e and TTFT, last request."""
    return (
        requests.group_by("service", "model")
        .agg(
            pl.len().alias("requests"),
            (pl.col("status") == "error").mean().alias("error_ratio"),
            pl.col("e2e_s").median().alias("e2e_p50_s"),
            pl.col("ttft_s").median().alias("ttft_p50_s"),
            pl.col("ts").max().alias("last_request_ts"),
            pl.col("node").drop_nulls().cast(pl.String).unique().sort().alias("nodes"),
        )
        .with_columns(pl.col("service").cast(pl.String), pl.col("model").cast(pl.String))
        .sort("service", "model")
    )


def latency_quantiles(requests: pl.DataFrame, service: str) -> pl.DataFrame:
    """Per model of `service`: exact quantiles of e2e, queue, TTFT and TPOT from the request events.

    Failed and cancelled requests count in the error ratio, not in the latency quantiles.
    """
    rows = requests.filter(pl.col("service") == service)
    ok = pl.col("status") == "ok"
    return (
        rows.group_by("model")
        .agg(
            pl.len().alias("requests"),
            (pl.col("status") == "error").mean().alias("error_ratio"),
            *(
                pl.col(col).filter(ok).quantile(q, interpolation="linear").alias(f"{col.removesuffix('_s')}_p{round(q * 100)}_s")
                for col in LATENCIES
                for q in QUANTILES
            ),
            pl.col("output_tokens").filter(ok).sum().alias("output_tokens"),
        )
        .with_columns(pl.col("model").cast(pl.String))
        .sort("model")
    )


def histogram_quantile(le: list[float], counts: list[float], q: float) -> float | None:
    """Prometheus' histogram_quantile on one cumulative histogram: linear within the bucket that holds
    rank q; a rank in the open last bucket returns the highest finite bound. None without observations."""
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(le, counts):
        if cumulative >= rank:
            if bound >= 1e300:  # the +Inf bucket
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, cumulative
    return lower


def server_latency_quantiles(histograms: pl.DataFrame, service: str) -> pl.DataFrame:
    """Per model and latency of a scraped service: quantiles from the sum of its histogram deltas."""
    rows = histograms.filter(pl.col("service") == service).with_columns(pl.col("model", "metric").cast(pl.String))
    out = []
    for (model, metric), group in rows.group_by("model", "metric", maintain_order=True):
        for _, part in group.group_by(pl.col("le").cast(pl.List(pl.String)).list.join(",").alias("_bounds")):
            bounds = part["le"][0].to_list()
            summed = [sum(c) for c in zip(*part["counts"].to_list())]
            count, total = float(part["count"].sum()), float(part["sum"].sum())
            row = {"model": model, "metric": metric, "count": count, "mean_s": total / count if count else None}
            for q in QUANTILES:
                row[f"p{round(q * 100)}_s"] = histogram_quantile(bounds, summed, q)
            out.append(row)
    schema = {"model": pl.String, "metric": pl.String, "count": pl.Float64, "mean_s": pl.Float64,
              **{f"p{round(q * 100)}_s": pl.Float64 for q in QUANTILES}}
    return pl.DataFrame(out, schema=schema).sort("model", "metric")


def server_overview(stats: pl.DataFrame) -> pl.DataFrame:
    """Per scraped service and model: requests, error ratio, mean e2e (Triton), tokens/s, latest queue and KV cache."""
    return (
        stats.sort("ts")
        .group_by("service", "model")
        .agg(
            pl.col("kind").last(),
            (pl.col("requests_ok").fill_null(0).sum() + pl.col("requests_error").fill_null(0).sum()).alias("requests"),
            (pl.col("requests_error").fill_null(0).sum()
             / (pl.col("requests_ok").fill_null(0).sum() + pl.col("requests_error").fill_null(0).sum())).alias("error_ratio"),
            (pl.col("e2e_sum").sum() / pl.col("e2e_count").sum()).alias("e2e_mean_s"),
            (pl.col("generation_tokens").sum() / pl.col("interval_s").sum()).alias("generation_tokens_per_s"),
            pl.col("running").last().alias("running"),
            pl.col("waiting").last().alias("waiting"),
            pl.col("kv_cache").last().alias("kv_cache_usage_ratio"),
            pl.col("ts").max().alias("last_frame_ts"),
        )
        .with_columns(pl.col("error_ratio").fill_nan(None), pl.col("e2e_mean_s").fill_nan(None),
                      pl.col("service", "model", "kind").cast(pl.String))
        .sort("service", "model")
    )


# --- ranges past the hot tier: bounded memory -------------------------------------------------
# Exact quantiles need every value in memory; over days of requests that is unbounded. Past the hot
# tier, latencies are counted in logarithmic buckets 2% wide while streaming through the warm tier,
# and quantiles read from the counts (within 1% of the exact value).
GAMMA = 1.02


def _bucketed(lf: pl.LazyFrame, keys: list[str], column: str) -> pl.DataFrame:
    ok = (pl.col("status") == "ok") & (pl.col(column) > 0)
    return (lf.filter(ok).group_by(*keys, (pl.col(column).log() / math.log(GAMMA)).floor().cast(pl.Int32).alias("bucket"))
            .agg(pl.len().alias("n")).collect(engine="streaming"))


def _quantiles_from_buckets(counts: pl.DataFrame, keys: list[str], prefix: str, qs: tuple[float, ...]) -> pl.DataFrame:
    rows = []
    for key, group in counts.sort("bucket").group_by(keys, maintain_order=True):
        cumulative = group["n"].cum_sum()
        total = cumulative[-1]
        row = dict(zip(keys, key))
        for q in qs:
            index = int((cumulative >= q * total).arg_max())  # type: ignore[arg-type]
            row[f"{prefix}_p{round(q * 100)}_s"] = GAMMA ** (group["bucket"][index] + 0.5)
        rows.append(row)
    schema = {**{k: pl.String for k in keys}, **{f"{prefix}_p{round(q * 100)}_s": pl.Float64 for q in qs}}
    return pl.DataFrame(rows, schema=schema)


def latency_quantiles_approx(requests: pl.LazyFrame, service: str) -> pl.DataFrame:
    """latency_quantiles over a lazy scan, with bucketed quantiles (bounded memory)."""
    rows = requests.filter(pl.col("service") == service).with_columns(pl.col("model").cast(pl.String))
    out = (rows.group_by("model").agg(pl.len().alias("requests"), (pl.col("status") == "error").mean().alias("error_ratio"),
                                      pl.col("output_tokens").filter(pl.col("status") == "ok").sum().alias("output_tokens"))
           .collect(engine="streaming"))
    for col in LATENCIES:
        q = _quantiles_from_buckets(_bucketed(rows, ["model"], col), ["model"], col.removesuffix("_s"), QUANTILES)
        out = out.join(q, on="model", how="left")
    return out.sort("model")


def services_overview_approx(requests: pl.LazyFrame) -> pl.DataFrame:
    """services_overview over a lazy scan, with bucketed medians (bounded memory)."""
    rows = requests.with_columns(pl.col("service").cast(pl.String), pl.col("model").cast(pl.String))
    keys = ["service", "model"]
    out = (rows.group_by(*keys).agg(pl.len().alias("requests"), (pl.col("status") == "error").mean().alias("error_ratio"),
                                    pl.col("ts").max().alias("last_request_ts"),
                                    pl.col("node").cast(pl.String).drop_nulls().unique().sort().head(64).alias("nodes"))
           .collect(engine="streaming"))
    for col in ("e2e_s", "ttft_s"):
        out = out.join(_quantiles_from_buckets(_bucketed(rows, keys, col), keys, col.removesuffix("_s"), (0.5,)), on=keys, how="left")
    return out.select("service", "model", "requests", "error_ratio", "e2e_p50_s", "ttft_p50_s", "last_request_ts", "nodes").sort(keys)
