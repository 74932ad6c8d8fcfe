"""A service over time, per model or per replica (node): latency quantiles, request, error and token rates,
and its servers' state (KV cache, queue, preemptions, prefix-cache hits). Pure polars, no I/O.

Per model (or node) one source is used, as in collector.inference.all_services: the client's request events
when the model has any in the range, else its servers' histogram deltas (quantiles interpolated within the
server's buckets, as Prometheus' histogram_quantile does). The servers' state comes from their frames either way.

The rows come in as frames (the hot tier's, in memory) or lazy scans (the warm tier's) and are aggregated per
time bucket inside the query: only the buckets are collected, never the rows. The client's quantiles are exact
(`exact`, for the hot tier's rows) or read from counts in 2%-wide logarithmic buckets (within 1% of the value of
that rank; the warm tier's: an exact quantile needs every value of a bucket in memory at once, and polars does not
stream it).
"""

from __future__ import annotations

import math

import polars as pl

from collector.inference import GAMMA, SERVED_QUANTILES, ZERO_BUCKET, histogram_quantiles
from collector.rollups import bounded_step

LATENCIES = ("e2e", "ttft", "tpot", "queue")
RATE_COLUMNS = {"requests_per_s": pl.Float64, "errors_per_s": pl.Float64, "error_ratio": pl.Float64,
                "output_tokens_per_s": pl.Float64}
STATE_COLUMNS = {"kv_cache_usage_ratio": pl.Float64, "running": pl.Float64, "waiting": pl.Float64,
                 "preemptions_per_s": pl.Float64, "prefix_cache_hit_ratio": pl.Float64}
QUANTILE_COLUMNS = {f"{m}_p{round(q * 100)}_s": pl.Float64 for m in LATENCIES for q in SERVED_QUANTILES}
STAT_SUMS = ("interval_s", "prompt_tokens", "generation_tokens", "requests_ok", "requests_error", "e2e_sum", "e2e_count",
             "queue_sum", "queue_count", "requests_aborted", "preemptions", "prefix_cache_queries", "prefix_cache_hits")

Rows = pl.DataFrame | pl.LazyFrame


def step_for(since: float, until: float, points: int = 120, least: float = 10.0) -> float:
    """A bucket width that gives about `points` buckets over [since, until], rounded to whole seconds."""
    return float(max(least, round((until - since) / max(points, 1))))


def _lazy(rows: Rows) -> pl.LazyFrame:
    return rows.lazy() if isinstance(rows, pl.DataFrame) else rows


def _none(rows: Rows | None) -> bool:
    """No rows, as far as can be told without running a query (the hot tier's frames are in memory)."""
    return rows is None or (isinstance(rows, pl.DataFrame) and rows.height == 0)


def _bucket(step: float) -> pl.Expr:
    return ((pl.col("ts") // step) * step).alias("ts")


def _schema(by: str) -> dict:
    return {"ts": pl.Float64, by: pl.String, "source": pl.String, **RATE_COLUMNS, **QUANTILE_COLUMNS, **STATE_COLUMNS}


def bucket_quantiles(counts: pl.DataFrame, keys: list[str], qs: tuple[float, ...] = SERVED_QUANTILES) -> pl.DataFrame:
    """Per `keys`: quantiles from counts (`n`) per logarithmic bucket (`bucket`), as
    collector.inference._quantiles_from_buckets reads them: the first bucket where the cumulative count reaches
    q of the total, at its geometric middle (0 for the bucket of zeros)."""
    ranked = counts.sort(*keys, "bucket").with_columns(pl.col("n").cum_sum().over(keys).alias("_cum"),
                                                       pl.col("n").sum().over(keys).alias("_total"))
    names = [f"p{round(q * 100)}_s" for q in qs]
    # (counts are whole: the margin keeps 0.95 * 600 = 570.0000000000001 from passing over the 570th)
    out = ranked.group_by(keys).agg(pl.col("bucket").filter(pl.col("_cum") + 1e-6 >= q * pl.col("_total")).min().alias(name)
                                    for q, name in zip(qs, names))
    return out.with_columns(pl.when(pl.col(c) == ZERO_BUCKET).then(0.0)
                            .otherwise(pl.lit(GAMMA).pow(pl.col(c).cast(pl.Float64) + 0.5)).alias(c) for c in names)


def _approx_quantiles(rows: pl.LazyFrame, keys: list[str]) -> pl.DataFrame:
    """Per `keys`, the ok requests' latency quantiles (QUANTILE_COLUMNS) from one streaming pass that counts
    them per logarithmic bucket: memory in proportion to the buckets, not to the requests."""
    value = pl.col("value")
    counts = (rows.filter(pl.col("status") == "ok").select(*keys, *(f"{m}_s" for m in LATENCIES))
              .unpivot(index=keys, variable_name="metric", value_name="value").filter(value.is_not_null())
              .group_by(*keys, "metric", pl.when(value > 0).then((value.log() / math.log(GAMMA)).floor())
                        .otherwise(ZERO_BUCKET).cast(pl.Int32).alias("bucket"))
              .agg(pl.len().alias("n")).collect(engine="streaming"))
    out = counts.select(keys).unique()
    for m in LATENCIES:
        q = bucket_quantiles(counts.filter(pl.col("metric") == f"{m}_s").drop("metric"), keys)
        out = out.join(q.rename({f"p{round(x * 100)}_s": f"{m}_p{round(x * 100)}_s" for x in SERVED_QUANTILES}),
                       on=keys, how="left", nulls_equal=True)
    return out


def _client(requests: pl.LazyFrame, by: str, step: float, exact: bool) -> pl.DataFrame:
    ok = pl.col("status") == "ok"
    rows = requests.with_columns(_bucket(step), pl.col(by).cast(pl.String))
    quantiles = [pl.col(f"{m}_s").filter(ok).quantile(q, interpolation="linear").alias(f"{m}_p{round(q * 100)}_s")
                 for m in LATENCIES for q in SERVED_QUANTILES] if exact else []
    out = (rows.group_by("ts", by)
           .agg((pl.len() / step).alias("requests_per_s"),
                ((pl.col("status") == "error").sum() / step).alias("errors_per_s"),
                (pl.col("status") == "error").mean().alias("error_ratio"),
                (pl.col("output_tokens").filter(ok).sum() / step).alias("output_tokens_per_s"),
                *quantiles)
           .collect(engine="in-memory" if exact else "streaming"))  # exact quantiles: no streaming anyway
    if not exact and out.height:
        out = out.join(_approx_quantiles(rows, ["ts", by]), on=["ts", by], how="left", nulls_equal=True)
    return out.with_columns(pl.lit("client").alias("source"))


def reduce_histograms(histograms: Rows, keys: list[str]) -> pl.DataFrame:
    """Histogram rows summed inside the query per `keys`, metric and bucket layout: one row each, which
    collector.inference.histogram_quantiles reads as it would read every row (it sums them the same way)."""
    lf = _lazy(histograms)
    schema = lf.collect_schema()
    strings = [pl.col(c).cast(pl.String) for c in (*keys, "metric") if isinstance(schema[c], pl.Categorical)]
    lf = lf.with_columns(*strings, pl.col("le").cast(pl.List(pl.String)).list.join(",").alias("_bounds"))
    group = [*keys, "metric", "_bounds"]
    per_le = (lf.select(*group, "le", "counts").explode(["le", "counts"])
              .group_by(*group, "le").agg(pl.col("counts").sum()).collect(engine="streaming"))
    totals = lf.group_by(group).agg(pl.col("count").sum(), pl.col("sum").sum()).collect(engine="streaming")
    lists = per_le.sort("le").group_by(group, maintain_order=True).agg(pl.col("le"), pl.col("counts"))
    return lists.join(totals, on=group, how="left", nulls_equal=True).drop("_bounds")


def reduce_stats(stats: Rows) -> pl.DataFrame:
    """Server frames summed inside the query per service, model, server and node, each with its last frame's
    time, kind and state: what collector.inference.server_overview and server_services read of every frame
    (sums, and the state of the latest), in one row per server."""
    last = [pl.col(c).sort_by("ts").last() for c in ("kind", "running", "waiting", "kv_cache")]
    return (_lazy(stats).group_by("service", "model", "server", "node")
            .agg(*(pl.col(c).sum() for c in STAT_SUMS), pl.col("ts").max(), *last)
            .collect(engine="streaming"))


def _server(stats: Rows, histograms: Rows | None, by: str, step: float) -> pl.DataFrame:
    if _none(stats) and _none(histograms):
        return pl.DataFrame(schema=_schema(by))
    bucket = _bucket(step)
    s = _lazy(stats).with_columns(bucket, pl.col(by).cast(pl.String))
    ok, err = pl.col("requests_ok").fill_null(0), pl.col("requests_error").fill_null(0)
    rates = s.group_by("ts", by).agg(
        ((ok + err).sum() / step).alias("requests_per_s"), (err.sum() / step).alias("errors_per_s"),
        (err.sum() / (ok + err).sum()).fill_nan(None).alias("error_ratio"),
        (pl.col("generation_tokens").sum() / step).alias("output_tokens_per_s"),
        (pl.col("preemptions").sum() / step).alias("preemptions_per_s"),
        (pl.col("prefix_cache_hits").sum() / pl.col("prefix_cache_queries").sum()).fill_nan(None).alias("prefix_cache_hit_ratio"),
    ).collect(engine="streaming")
    # each server's gauges averaged over the bucket; then the servers' running and waiting add up, KV cache averages
    gauges = (s.group_by("ts", by, "server").agg(pl.col("running", "waiting", "kv_cache").mean())
              .group_by("ts", by).agg(*(pl.when(pl.col(c).count() > 0).then(pl.col(c).sum()).alias(c) for c in ("running", "waiting")),
                                      pl.col("kv_cache").mean().alias("kv_cache_usage_ratio"))
              .collect(engine="streaming"))
    rates = rates.join(gauges, on=["ts", by], how="left", nulls_equal=True)
    if not _none(histograms):
        h = _lazy(histograms).with_columns(bucket, pl.col(by).cast(pl.String))
        if by == "node":  # rows written before histograms carried their node: the server stands in
            h = h.with_columns(pl.col("node").fill_null(pl.col("server").cast(pl.String)))
        reduced = reduce_histograms(h, ["ts", by])
        if reduced.height:
            q = histogram_quantiles(reduced.with_columns(pl.col("ts").cast(pl.String).alias("_ts")).drop("ts"), ["_ts", by])
            wide = q.select("_ts", by).unique()
            for m in LATENCIES:
                part = q.filter(pl.col("metric") == m).select(
                    "_ts", by, *(pl.col(f"p{round(x * 100)}_s").alias(f"{m}_p{round(x * 100)}_s") for x in SERVED_QUANTILES))
                wide = wide.join(part, on=["_ts", by], how="left", nulls_equal=True)
            wide = wide.with_columns(pl.col("_ts").cast(pl.Float64).alias("ts")).drop("_ts")
            rates = rates.join(wide, on=["ts", by], how="full", coalesce=True, nulls_equal=True)
    return rates.with_columns(pl.lit("server").alias("source"))


def service_series(requests: Rows, stats: Rows, histograms: Rows, *, by: str = "model", step: float = 60.0,
                   exact: bool = True) -> pl.DataFrame:
    """One row per time bucket (`ts`, its start) and model or node (`by`) of one service's rows; the client's
    quantiles exact, or within 1% (`exact` False: bounded memory however many requests)."""
    if by not in ("model", "node"):
        raise ValueError(f"by must be model or node, got {by!r}")
    schema = _schema(by)
    client = pl.DataFrame(schema=_schema(by)) if _none(requests) else _client(_lazy(requests), by, step, exact)
    if client.height == 0:
        client_models = set()
    elif by == "model":
        client_models = set(client["model"].drop_nulls().to_list())
    else:
        client_models = set(_lazy(requests).select(pl.col("model").cast(pl.String).unique()).collect(engine="streaming")
                            ["model"].drop_nulls().to_list())
    if client_models:  # the servers' figures only for the models the client does not report
        stats = stats.filter(~pl.col("model").cast(pl.String).is_in(list(client_models)))
        histograms = histograms.filter(~pl.col("model").cast(pl.String).is_in(list(client_models)))
    frames = [f.select([pl.col(c).cast(t) if c in f.columns else pl.lit(None, t).alias(c) for c, t in schema.items()])
              for f in (client, _server(stats, histograms, by, step))]
    return pl.concat(frames).sort("ts", by, "source")


def server_state_series(stats: Rows, *, by: str = "model", step: float = 60.0) -> pl.DataFrame:
    """The servers' state over time for every model (or node) they serve, the client's models too: KV cache,
    running and waiting requests, preemptions and the prefix-cache hit ratio."""
    state = _server(stats, None, by, step)
    return state.select("ts", pl.col(by).cast(pl.String), *(pl.col(c).cast(t) for c, t in STATE_COLUMNS.items())).sort("ts", by)


def recent_inference(requests: pl.DataFrame, stats: pl.DataFrame, histograms: pl.DataFrame, since: float,
                     window_s: float) -> list[dict]:
    """Per (service, model) over [since, now]: source, error ratio, request and output-token rates, and p50/p95/p99
    of e2e, TTFT and TPOT; from the client's events where the pair has any, else from its servers (the
    collector's /metrics)."""
    requests = requests.filter(pl.col("ts") >= since)
    stats = stats.filter(pl.col("ts") >= since)
    histograms = histograms.filter(pl.col("ts") >= since)
    out: list[dict] = []
    keys = ["service", "model"]
    seen: set[tuple[str, str]] = set()
    if requests.height:
        ok = pl.col("status") == "ok"
        client = requests.group_by(pl.col("service").cast(pl.String), pl.col("model").cast(pl.String)).agg(
            (pl.col("status") == "error").mean().alias("error_ratio"), (pl.len() / window_s).alias("requests_per_s"),
            (pl.col("output_tokens").filter(ok).sum() / window_s).alias("output_tokens_per_s"),
            pl.col("ts").max().alias("last_ts"),
            *(pl.col(f"{m}_s").filter(ok).quantile(q, interpolation="linear").alias(f"{m}_p{round(q * 100)}_s")
              for m in ("e2e", "ttft", "tpot") for q in SERVED_QUANTILES))
        for row in client.iter_rows(named=True):
            seen.add((row["service"], row["model"]))
            out.append({**row, "source": "client"})
    if stats.height or histograms.height:
        pairs = pl.DataFrame([list(p) for p in seen], schema={"service": pl.String, "model": pl.String}, orient="row")
        stats = stats.with_columns(pl.col(keys).cast(pl.String)).join(pairs, on=keys, how="anti")
        histograms = histograms.with_columns(pl.col(keys).cast(pl.String)).join(pairs, on=keys, how="anti")
        ok, err = pl.col("requests_ok").fill_null(0), pl.col("requests_error").fill_null(0)
        rates = stats.group_by(keys).agg(
            (err.sum() / (ok + err).sum()).fill_nan(None).alias("error_ratio"),
            ((ok + err).sum() / window_s).alias("requests_per_s"),
            (pl.col("generation_tokens").sum() / window_s).alias("output_tokens_per_s"),
            pl.col("ts").max().alias("last_ts"))
        q = histogram_quantiles(histograms, keys)
        wide = q.select(keys).unique()
        for m in ("e2e", "ttft", "tpot"):
            part = q.filter(pl.col("metric") == m).select(
                *keys, *(pl.col(f"p{round(x * 100)}_s").alias(f"{m}_p{round(x * 100)}_s") for x in SERVED_QUANTILES))
            wide = wide.join(part, on=keys, how="left", nulls_equal=True)
        for row in rates.join(wide, on=keys, how="full", coalesce=True).iter_rows(named=True):
            out.append({**row, "source": "server"})
    return out
