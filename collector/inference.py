"""Inference analytics over the requests table: pure polars functions, no I/O."""

from __future__ import annotations

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
            pl.col("node").drop_nulls().unique().sort().alias("nodes"),
        )
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
        .sort("model")
    )
