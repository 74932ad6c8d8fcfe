"""GET /v1/services, /v1/services/{service} and its /series: inference services, instrumented or scraped.

A service is listed whichever way it reports: with the client (request events) or only through its
servers' /metrics (histogram deltas); `source` says which figures a row holds ("client" where there are
request events, else "server": the two are the same requests and are never added). Over the hot tier
(its window, by default) the client's quantiles are exact; a range reaching past it is read from the warm
tier, with quantiles from 2%-wide buckets (bounded memory, within 1%). Server quantiles are interpolated
within the server's buckets; `lowest_bound_s` says where that starts to be a guess.

Past the hot tier nothing is read row by row: the warm tier's scans (time and service filters pushed down)
are aggregated inside the query, per server (the list and the detail), per time bucket (the series, at most
max_points buckets per series), and only the aggregates are collected."""

from __future__ import annotations

from typing import Literal

import polars as pl
from fastapi import APIRouter, HTTPException, Query, Request, Response

from collector.api.deps import Range, RangeDep, ReadAuth, StoreDep
from collector.api.encoding import json_response
from collector.inference import (all_services, latency_quantiles, latency_quantiles_approx, server_latency_quantiles,
                                 server_overview, server_services, services_overview, services_overview_approx)
from collector.inference_series import (bounded_step, reduce_histograms, reduce_stats, server_state_series, service_series,
                                        step_for)

router = APIRouter(tags=["inference"], dependencies=[ReadAuth])


def _in_hot(store, kind: str, r) -> bool:
    held = store.hot.complete_since(kind)
    return r.since is None or held is None or r.since >= held


def _hot(store, kind: str, r) -> pl.DataFrame:
    frame = store.frame(kind)
    if r.since is not None:
        frame = frame.filter(pl.col("ts") >= r.since)
    if r.until is not None:
        frame = frame.filter(pl.col("ts") <= r.until)
    return frame


def _scan(store, kind: str, r, service: str | None = None) -> pl.LazyFrame:
    scan = store.scan(kind, r.since, r.until)
    return scan.filter(pl.col("service") == service) if service is not None else scan


def _stats(store, r, service: str | None = None) -> pl.DataFrame:
    """The servers' frames in the range: the hot tier's rows, or past it one row per server summed inside the
    warm tier's scan (collector.inference_series.reduce_stats: what server_overview reads of them)."""
    if _in_hot(store, "server_stats", r):
        frame = _hot(store, "server_stats", r)
        return frame.filter(pl.col("service") == service) if service is not None else frame
    return reduce_stats(_scan(store, "server_stats", r, service))


def _histograms(store, r, service: str | None = None) -> pl.DataFrame:
    """The servers' histogram deltas in the range: the hot tier's rows, or past it one row per service, model,
    metric and bucket layout summed inside the warm tier's scan."""
    if _in_hot(store, "server_histograms", r):
        frame = _hot(store, "server_histograms", r)
        return frame.filter(pl.col("service") == service) if service is not None else frame
    return reduce_histograms(_scan(store, "server_histograms", r, service), ["service", "model"])


# Frames in the answers are written by polars (collector.api.encoding): the JSON FastAPI wrote from to_dicts.
@router.get("/v1/services", response_model=dict)
def list_services(store: StoreDep, r: RangeDep) -> Response:
    """Every service and model in the range, instrumented or scraped (`source`), and the scraped servers' state."""
    if _in_hot(store, "requests", r):
        overview = services_overview(_hot(store, "requests", r))
    else:
        overview = services_overview_approx(store.scan("requests", r.since, r.until))
    stats = _stats(store, r)
    servers = server_services(stats, _histograms(store, r))
    return json_response({"services": all_services(overview, servers), "scraped": server_overview(stats)})


@router.get("/v1/services/{service}", response_model=dict)
def get_service(service: str, request: Request, store: StoreDep, r: RangeDep) -> Response:
    if _in_hot(store, "requests", r):
        requests = _hot(store, "requests", r).filter(pl.col("service") == service)
        count = requests.height
        models = latency_quantiles(requests, service)
    else:
        models = latency_quantiles_approx(store.scan("requests", r.since, r.until), service)
        count = int(models["requests"].sum()) if models.height else 0
    stats = _stats(store, r, service)
    if count == 0 and stats.height == 0:
        raise HTTPException(404, f"no service {service!r} has reported a request or been scraped in the range")
    client_models = set(models["model"].to_list()) if models.height else set()
    histograms = _histograms(store, r, service)
    return json_response({
        "service": service,
        # per model: "client" figures where the client reports it (in `models`), else "server" (in `scraped_latency`)
        "sources": {m: "client" if m in client_models else "server"
                    for m in sorted(client_models | set(stats["model"].cast(pl.String).unique().to_list()))},
        "models": models,
        "scraped": server_overview(stats),
        "scraped_latency": server_latency_quantiles(histograms, service),
        # on Kubernetes, each replica's pod as its request events named it: collector/pods.py
        "replicas": request.app.state.pods.replicas(service),
        # under Slurm, the Slurm jobs whose processes served its requests, oldest first: collector/slurm.py
        "slurm": request.app.state.slurm.service_links(service),
    })


@router.get("/v1/services/{service}/series", response_model=dict)
def get_service_series(service: str, store: StoreDep, r: RangeDep,
                       by: Literal["model", "node"] = Query("model", description="one series per model, or per replica (node)"),
                       step_s: float | None = Query(None, ge=1, le=86400, description="bucket width; about 120 buckets by default, "
                                                    "wider where the range would have more than max_points")) -> Response:
    """The service over time (default: the last hour): p50/p95/p99 of e2e, TTFT, time per output token and
    queue; request, error and output-token rates (`series`, one source per model as in /v1/services), and its
    servers' KV cache, running and waiting requests, preemptions and prefix-cache hit ratio (`server_state`).
    At most max_points points per series: `step_s` says the bucket width used."""
    since, until = r.resolve(3600.0)
    step = bounded_step(since, until, step_s or step_for(since, until), r.max_points)
    span = Range(since, until, r.max_points)

    def rows(kind: str) -> tuple[pl.DataFrame | pl.LazyFrame, bool]:
        """The service's rows of a table: the hot tier's (in memory; True) or a lazy scan of the warm tier's."""
        if _in_hot(store, kind, span):
            return _hot(store, kind, span).filter(pl.col("service") == service), True
        return _scan(store, kind, span, service), False

    requests, exact = rows("requests")
    stats, _ = rows("server_stats")
    histograms, _ = rows("server_histograms")
    series = service_series(requests, stats, histograms, by=by, step=step, exact=exact)
    state = server_state_series(stats, by=by, step=step)
    if not (series["source"] == "client").any() and state.height == 0:
        raise HTTPException(404, f"no service {service!r} has reported a request or been scraped in the range")
    return json_response({"service": service, "by": by, "step_s": step, "series": series, "server_state": state})
