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
    """Per model and latency of a scraped service: quantiles from the sum of its histogram deltas, with the
    lowest bucket bound below which they are interpolated."""
    rows = histograms.filter(pl.col("service") == service)
    return histogram_quantiles(rows, ["model"], QUANTILES).sort("model", "metric")


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


ZERO_BUCKET = -(2**31)  # latencies of 0 (a request that never queued): the logarithmic buckets start above it


def _bucketed(lf: pl.LazyFrame, keys: list[str], column: str) -> pl.DataFrame:
    """Ok requests per logarithmic bucket of `column` (GAMMA wide), zeros in a bucket of their own: the exact
    quantiles count them, and leaving them out skewed the queue time's upwards when many requests never queued."""
    ok = (pl.col("status") == "ok") & (pl.col(column) >= 0)
    bucket = (pl.when(pl.col(column) > 0).then((pl.col(column).log() / math.log(GAMMA)).floor())
              .otherwise(ZERO_BUCKET).cast(pl.Int32).alias("bucket"))
    return lf.filter(ok).group_by(*keys, bucket).agg(pl.len().alias("n")).collect(engine="streaming")


def _quantiles_from_buckets(counts: pl.DataFrame, keys: list[str], prefix: str, qs: tuple[float, ...]) -> pl.DataFrame:
    rows = []
    for key, group in counts.sort("bucket").group_by(keys, maintain_order=True):
        cumulative = group["n"].cum_sum()
        total = cumulative[-1]
        row = dict(zip(keys, key))
        for q in qs:
            index = int((cumulative >= q * total).arg_max())  # type: ignore[arg-type]
            bucket = group["bucket"][index]
            row[f"{prefix}_p{round(q * 100)}_s"] = 0.0 if bucket == ZERO_BUCKET else GAMMA ** (bucket + 0.5)
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


# --- one view of every service, whichever way it reports ----------------------------------------------------
# A service instrumented with the client and also scraped from its servers reports the same requests twice:
# adding the two would double-count. Per (service, model) one source is used: the client's events when there
# are any (each request exactly, as its caller saw it), else the servers' histograms. `source` says which.
SERVED_QUANTILES = (0.5, 0.95, 0.99)


def histogram_quantiles(histograms: pl.DataFrame, keys: list[str], qs: tuple[float, ...] = SERVED_QUANTILES) -> pl.DataFrame:
    """Per `keys` and metric: count, mean and quantiles from the sum of histogram deltas (bucket layouts kept apart
    and the larger count kept where a server changed its buckets within the range)."""
    # lowest_bound_s: the smallest finite bucket bound. A quantile below it is interpolated between 0 and that
    # bound (vLLM's queue time starts at 0.3 s), not measured; the mean is exact.
    schema = {**{k: histograms.schema.get(k, pl.String) for k in keys}, "metric": pl.String, "count": pl.Float64,
              "mean_s": pl.Float64, **{f"p{round(q * 100)}_s": pl.Float64 for q in qs}, "lowest_bound_s": pl.Float64}
    schema = {k: (pl.String if isinstance(v, pl.Categorical) else v) for k, v in schema.items()}
    if histograms.height == 0:
        return pl.DataFrame(schema=schema)
    rows = histograms.with_columns(pl.col(c).cast(pl.String) for c in (*keys, "metric") if isinstance(histograms.schema[c], pl.Categorical))
    rows = rows.with_columns(pl.col("le").cast(pl.List(pl.String)).list.join(",").alias("_bounds"))
    summed = (rows.explode(["le", "counts"]).group_by(*keys, "metric", "_bounds", "le")
              .agg(pl.col("counts").sum()).sort("le"))
    totals = rows.group_by(*keys, "metric", "_bounds").agg(pl.col("count").sum(), pl.col("sum").sum())
    best: dict[tuple, dict] = {}
    for key, group in summed.group_by(*keys, "metric", "_bounds", maintain_order=True):
        counts = group["counts"].to_list()
        row = dict(zip([*keys, "metric"], key[:-1]))
        for q in qs:
            row[f"p{round(q * 100)}_s"] = histogram_quantile(group["le"].to_list(), counts, q)
        row["_n"] = counts[-1] if counts else 0.0
        row["lowest_bound_s"] = next((b for b in group["le"].to_list() if b < 1e300), None)
        at = tuple(key[:-1])
        if at not in best or row["_n"] > best[at]["_n"]:
            best[at] = row
    out = pl.DataFrame([{k: v for k, v in r.items() if k != "_n"} for r in best.values()],
                       schema={k: v for k, v in schema.items() if k not in ("count", "mean_s")})
    means = (totals.group_by(*keys, "metric").agg(pl.col("count").sum(), pl.col("sum").sum())
             .select(*keys, "metric", "count", (pl.col("sum") / pl.col("count")).fill_nan(None).alias("mean_s")))
    return out.join(means, on=[*keys, "metric"], how="left").select(list(schema)).cast(schema)  # type: ignore[arg-type]


def _wide(quantiles: pl.DataFrame, keys: list[str], metrics=("e2e", "ttft", "tpot", "queue")) -> pl.DataFrame:
    """(keys, metric, p50_s, ...) long -> one row per keys with e2e_p50_s, ttft_p95_s, ... columns."""
    out = quantiles.select(keys).unique()
    for metric in metrics:
        part = quantiles.filter(pl.col("metric") == metric).select(
            *keys, *(pl.col(c).alias(f"{metric}_{c}") for c in quantiles.columns if c.startswith("p") and c.endswith("_s")))
        out = out.join(part, on=keys, how="left", nulls_equal=True)
    return out


def server_services(stats: pl.DataFrame, histograms: pl.DataFrame) -> pl.DataFrame:
    """services_overview's shape for services read from their servers: requests, error ratio, median e2e and
    TTFT (from the histograms; Triton's e2e is its mean), the last frame, the nodes, and the servers' state now."""
    keys = ["service", "model"]
    overview = server_overview(stats)
    if overview.height == 0:
        return pl.DataFrame(schema={"service": pl.String, "model": pl.String, "requests": pl.Float64,
                                    "error_ratio": pl.Float64, "e2e_p50_s": pl.Float64, "ttft_p50_s": pl.Float64,
                                    "last_request_ts": pl.Float64, "nodes": pl.List(pl.String), "kind": pl.String,
                                    "running": pl.Float64, "waiting": pl.Float64, "kv_cache_usage_ratio": pl.Float64,
                                    "generation_tokens_per_s": pl.Float64})
    nodes = stats.group_by(pl.col("service").cast(pl.String), pl.col("model").cast(pl.String)).agg(
        pl.col("node").drop_nulls().cast(pl.String).unique().sort().alias("nodes"))
    wide = _wide(histogram_quantiles(histograms, keys), keys, ("e2e", "ttft"))
    return (overview.join(nodes, on=keys, how="left").join(wide, on=keys, how="left")
            .with_columns(pl.col("e2e_p50_s").fill_null(pl.col("e2e_mean_s")))
            .rename({"last_frame_ts": "last_request_ts"})
            .select(*keys, "requests", "error_ratio", "e2e_p50_s", "ttft_p50_s", "last_request_ts", "nodes", "kind",
                    "running", "waiting", "kv_cache_usage_ratio", "generation_tokens_per_s"))


def all_services(client: pl.DataFrame, servers: pl.DataFrame) -> pl.DataFrame:
    """Every (service, model), instrumented or scraped, one row each: the client's figures where it has any
    (`source` "client"), else the servers' ("server"); `scraped` says whether its servers are read too, and
    their state now (running, waiting, KV cache) is added either way."""
    keys = ["service", "model"]
    state = ["kind", "running", "waiting", "kv_cache_usage_ratio", "generation_tokens_per_s"]
    client = client.with_columns(pl.col("service", "model").cast(pl.String), pl.lit("client").alias("source"))
    servers = servers.with_columns(pl.col("service", "model").cast(pl.String))
    both = client.join(servers.select(*keys, *state), on=keys, how="left").with_columns(
        pl.col("kind").is_not_null().alias("scraped"))
    only_server = servers.join(client.select(keys), on=keys, how="anti").with_columns(
        pl.lit("server").alias("source"), pl.lit(True).alias("scraped"))
    columns = ["service", "model", "source", "scraped", "requests", "error_ratio", "e2e_p50_s", "ttft_p50_s",
               "last_request_ts", "nodes", *state]
    frames = [f.select([pl.col(c) if c in f.columns else pl.lit(None).alias(c) for c in columns]) for f in (both, only_server)]
    frames = [f.cast({"requests": pl.Float64, "nodes": pl.List(pl.String), "kind": pl.String}) for f in frames]  # type: ignore[dict-item]
    return pl.concat(frames, how="vertical_relaxed").sort(keys)
