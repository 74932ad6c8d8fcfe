"""A service over time, per model or per replica (node): latency quantiles, request, error and token rates,
and its servers' state (KV cache, queue, preemptions, prefix-cache hits). Pure polars, no I/O.

Per model (or node) one source is used, as in collector.inference.all_services: the client's request events
when the model has any in the range (exact quantiles), else its servers' histogram deltas (quantiles
interpolated within the server's buckets, as Prometheus' histogram_quantile does). The servers' state comes
from their frames either way.
"""

from __future__ import annotations

import polars as pl

from collector.inference import SERVED_QUANTILES, histogram_quantiles

LATENCIES = ("e2e", "ttft", "tpot", "queue")
RATE_COLUMNS = {"requests_per_s": pl.Float64, "errors_per_s": pl.Float64, "error_ratio": pl.Float64,
                "output_tokens_per_s": pl.Float64}
STATE_COLUMNS = {"kv_cache_usage_ratio": pl.Float64, "running": pl.Float64, "waiting": pl.Float64,
                 "preemptions_per_s": pl.Float64, "prefix_cache_hit_ratio": pl.Float64}
QUANTILE_COLUMNS = {f"{m}_p{round(q * 100)}_s": pl.Float64 for m in LATENCIES for q in SERVED_QUANTILES}


def step_for(since: float, until: float, points: int = 120, least: float = 10.0) -> float:
    """A bucket width that gives about `points` buckets over [since, until], rounded to whole seconds."""
    return float(max(least, round((until - since) / max(points, 1))))


def _schema(by: str) -> dict:
    return {"ts": pl.Float64, by: pl.String, "source": pl.String, **RATE_COLUMNS, **QUANTILE_COLUMNS, **STATE_COLUMNS}


def _client(requests: pl.DataFrame, by: str, step: float) -> pl.DataFrame:
    if requests.height == 0:
        return pl.DataFrame(schema=_schema(by))
    ok = pl.col("status") == "ok"
    return (requests.with_columns(((pl.col("ts") // step) * step).alias("ts"), pl.col(by).cast(pl.String))
            .group_by("ts", by)
            .agg((pl.len() / step).alias("requests_per_s"),
                 ((pl.col("status") == "error").sum() / step).alias("errors_per_s"),
                 (pl.col("status") == "error").mean().alias("error_ratio"),
                 (pl.col("output_tokens").filter(ok).sum() / step).alias("output_tokens_per_s"),
                 *(pl.col(f"{m}_s").filter(ok).quantile(q, interpolation="linear").alias(f"{m}_p{round(q * 100)}_s")
                   for m in LATENCIES for q in SERVED_QUANTILES))
            .with_columns(pl.lit("client").alias("source")))


def _server(stats: pl.DataFrame, histograms: pl.DataFrame, by: str, step: float) -> pl.DataFrame:
    if stats.height == 0 and histograms.height == 0:
        return pl.DataFrame(schema=_schema(by))
    bucket = ((pl.col("ts") // step) * step).alias("ts")
    s = stats.with_columns(bucket, pl.col(by).cast(pl.String))
    ok, err = pl.col("requests_ok").fill_null(0), pl.col("requests_error").fill_null(0)
    rates = s.group_by("ts", by).agg(
        ((ok + err).sum() / step).alias("requests_per_s"), (err.sum() / step).alias("errors_per_s"),
        (err.sum() / (ok + err).sum()).fill_nan(None).alias("error_ratio"),
        (pl.col("generation_tokens").sum() / step).alias("output_tokens_per_s"),
        (pl.col("preemptions").sum() / step).alias("preemptions_per_s"),
        (pl.col("prefix_cache_hits").sum() / pl.col("prefix_cache_queries").sum()).fill_nan(None).alias("prefix_cache_hit_ratio"),
    )
    # each server's gauges averaged over the bucket; then the servers' running and waiting add up, KV cache averages
    gauges = (s.group_by("ts", by, "server").agg(pl.col("running", "waiting", "kv_cache").mean())
              .group_by("ts", by).agg(*(pl.when(pl.col(c).count() > 0).then(pl.col(c).sum()).alias(c) for c in ("running", "waiting")),
                                      pl.col("kv_cache").mean().alias("kv_cache_usage_ratio")))
    rates = rates.join(gauges, on=["ts", by], how="left", nulls_equal=True)
    if histograms.height:
        h = histograms.with_columns(bucket, pl.col(by).cast(pl.String))
        if by == "node":  # rows written before histograms carried their node: the server stands in
            h = h.with_columns(pl.col("node").fill_null(pl.col("server").cast(pl.String)))
        q = histogram_quantiles(h.with_columns(pl.col("ts").cast(pl.String).alias("_ts")), ["_ts", by])
        wide = q.select("_ts", by).unique()
        for m in LATENCIES:
            part = q.filter(pl.col("metric") == m).select(
                "_ts", by, *(pl.col(f"p{round(x * 100)}_s").alias(f"{m}_p{round(x * 100)}_s") for x in SERVED_QUANTILES))
            wide = wide.join(part, on=["_ts", by], how="left", nulls_equal=True)
        wide = wide.with_columns(pl.col("_ts").cast(pl.Float64).alias("ts")).drop("_ts")
        rates = rates.join(wide, on=["ts", by], how="full", coalesce=True, nulls_equal=True)
    return rates.with_columns(pl.lit("server").alias("source"))


def service_series(requests: pl.DataFrame, stats: pl.DataFrame, histograms: pl.DataFrame, *, by: str = "model",
                   step: float = 60.0) -> pl.DataFrame:
    """One row per time bucket (`ts`, its start) and model or node (`by`) of one service's rows."""
    if by not in ("model", "node"):
        raise ValueError(f"by must be model or node, got {by!r}")
    schema = _schema(by)
    client_models = set(requests["model"].cast(pl.String).unique().to_list()) if requests.height else set()
    if client_models:  # the servers' figures only for the models the client does not report
        stats = stats.filter(~pl.col("model").cast(pl.String).is_in(list(client_models)))
        histograms = histograms.filter(~pl.col("model").cast(pl.String).is_in(list(client_models)))
    frames = [f.select([pl.col(c).cast(t) if c in f.columns else pl.lit(None, t).alias(c) for c, t in schema.items()])
              for f in (_client(requests, by, step), _server(stats, histograms, by, step))]
    out = pl.concat(frames)
    if client_models and stats.height == 0:
        return out.sort("ts", by)
    return out.sort("ts", by, "source")


def server_state_series(stats: pl.DataFrame, *, by: str = "model", step: float = 60.0) -> pl.DataFrame:
    """The servers' state over time for every model (or node) they serve, the client's models too: KV cache,
    running and waiting requests, preemptions and the prefix-cache hit ratio."""
    if stats.height == 0:
        return pl.DataFrame(schema={"ts": pl.Float64, by: pl.String, **STATE_COLUMNS})
    return _server(stats, pl.DataFrame(), by, step).select("ts", by, *STATE_COLUMNS).sort("ts", by)


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
