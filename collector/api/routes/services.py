"""GET /v1/services, /v1/services/{service} and its /series: inference services, instrumented or scraped.

A service is listed whichever way it reports: with the client (request events) or only through its
servers' /metrics (histogram deltas); `source` says which figures a row holds ("client" where there are
request events, else "server": the two are the same requests and are never added). Over the hot tier
(its window, by default) the client's quantiles are exact; a range reaching past it is read from the warm
tier, with quantiles from 2%-wide buckets (bounded memory, within 1%). Server quantiles are interpolated
within the server's buckets; `lowest_bound_s` says where that starts to be a guess."""

from __future__ import annotations

import time
from typing import Literal

import polars as pl
from fastapi import APIRouter, HTTPException, Query, Request

from collector.api.deps import RangeDep, ReadAuth, StoreDep
from collector.inference import (all_services, latency_quantiles, latency_quantiles_approx, server_latency_quantiles,
                                 server_overview, server_services, services_overview, services_overview_approx)
from collector.inference_series import server_state_series, service_series, step_for

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


def _frame(store, kind: str, r, service: str | None = None) -> pl.DataFrame:
    if _in_hot(store, kind, r):
        frame = _hot(store, kind, r)
    else:
        scan = store.scan(kind, r.since, r.until)
        frame = (scan.filter(pl.col("service") == service) if service is not None else scan).collect()
    return frame.filter(pl.col("service") == service) if service is not None else frame


@router.get("/v1/services")
def list_services(store: StoreDep, r: RangeDep) -> dict:
    """Every service and model in the range, instrumented or scraped (`source`), and the scraped servers' state."""
    if _in_hot(store, "requests", r):
        overview = services_overview(_hot(store, "requests", r))
    else:
        overview = services_overview_approx(store.scan("requests", r.since, r.until))
    stats = _frame(store, "server_stats", r)
    servers = server_services(stats, _frame(store, "server_histograms", r))
    return {"services": all_services(overview, servers).to_dicts(), "scraped": server_overview(stats).to_dicts()}


@router.get("/v1/services/{service}")
def get_service(service: str, request: Request, store: StoreDep, r: RangeDep) -> dict:
    if _in_hot(store, "requests", r):
        requests = _hot(store, "requests", r).filter(pl.col("service") == service)
        count = requests.height
        models = latency_quantiles(requests, service)
    else:
        models = latency_quantiles_approx(store.scan("requests", r.since, r.until), service)
        count = int(models["requests"].sum()) if models.height else 0
    stats = _frame(store, "server_stats", r, service)
    if count == 0 and stats.height == 0:
        raise HTTPException(404, f"no service {service!r} has reported a request or been scraped in the range")
    client_models = set(models["model"].to_list()) if models.height else set()
    histograms = _frame(store, "server_histograms", r, service)
    return {
        "service": service,
        # per model: "client" figures where the client reports it (in `models`), else "server" (in `scraped_latency`)
        "sources": {m: "client" if m in client_models else "server"
                    for m in sorted(client_models | set(stats["model"].cast(pl.String).unique().to_list()))},
        "models": models.to_dicts(),
        "scraped": server_overview(stats).to_dicts(),
        "scraped_latency": server_latency_quantiles(histograms, service).to_dicts(),
        # on Kubernetes, each replica's pod as its request events named it: collector/pods.py
        "replicas": request.app.state.pods.replicas(service),
    }


@router.get("/v1/services/{service}/series")
def get_service_series(service: str, store: StoreDep, r: RangeDep,
                       by: Literal["model", "node"] = Query("model", description="one series per model, or per replica (node)"),
                       step_s: float | None = Query(None, gt=0, le=86400, description="bucket width; about 120 buckets by default")) -> dict:
    """The service over time: p50/p95/p99 of e2e, TTFT, time per output token and queue; request, error and
    output-token rates (`series`, one source per model as in /v1/services), and its servers' KV cache, running
    and waiting requests, preemptions and prefix-cache hit ratio (`server_state`)."""
    until = r.until if r.until is not None else time.time()
    since = r.since if r.since is not None else until - 3600
    step = step_s or step_for(since, until)
    requests = _frame(store, "requests", r, service)
    stats = _frame(store, "server_stats", r, service)
    if requests.height == 0 and stats.height == 0:
        raise HTTPException(404, f"no service {service!r} has reported a request or been scraped in the range")
    series = service_series(requests, stats, _frame(store, "server_histograms", r, service), by=by, step=step)
    return {"service": service, "by": by, "step_s": step, "series": series.to_dicts(),
            "server_state": server_state_series(stats, by=by, step=step).to_dicts()}
