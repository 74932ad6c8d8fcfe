"""GET /v1/services and /v1/services/{service}: inference latency quantiles per model.

Over the hot tier (its window, by default) quantiles are exact; a range reaching past it is read
from the warm tier, with quantiles from 2%-wide buckets (bounded memory, within 1%)."""

from __future__ import annotations

import polars as pl
from fastapi import APIRouter, HTTPException

from collector.api.deps import RangeDep, ReadAuth, StoreDep
from collector.inference import (latency_quantiles, latency_quantiles_approx, server_latency_quantiles, server_overview,
                                 services_overview, services_overview_approx)

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
        frame = store.scan(kind, r.since, r.until).filter(pl.col("service") == service).collect()
    return frame.filter(pl.col("service") == service) if service is not None else frame


@router.get("/v1/services")
def list_services(store: StoreDep, r: RangeDep) -> dict:
    """Instrumented services (from request events) and scraped ones (from their servers' histograms)."""
    if _in_hot(store, "requests", r):
        overview = services_overview(_hot(store, "requests", r))
    else:
        overview = services_overview_approx(store.scan("requests", r.since, r.until))
    stats = _hot(store, "server_stats", r) if _in_hot(store, "server_stats", r) else store.scan("server_stats", r.since, r.until).collect()
    return {"services": overview.to_dicts(), "scraped": server_overview(stats).to_dicts()}


@router.get("/v1/services/{service}")
def get_service(service: str, store: StoreDep, r: RangeDep) -> dict:
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
    return {
        "service": service,
        "models": models.to_dicts(),
        "scraped": server_overview(stats).to_dicts(),
        "scraped_latency": server_latency_quantiles(_frame(store, "server_histograms", r, service), service).to_dicts(),
    }
