"""GET /v1/services and /v1/services/{service}: inference latency quantiles per model."""

from __future__ import annotations

import polars as pl
from fastapi import APIRouter, HTTPException

from collector.api.deps import ReadAuth, StoreDep
from collector.inference import latency_quantiles, server_latency_quantiles, server_overview, services_overview

router = APIRouter(tags=["inference"], dependencies=[ReadAuth])


@router.get("/v1/services")
def list_services(store: StoreDep) -> dict:
    """Instrumented services (exact, from request events) and scraped ones (from their servers' histograms)."""
    return {"services": services_overview(store.frame("requests")).to_dicts(),
            "scraped": server_overview(store.frame("server_stats")).to_dicts()}


@router.get("/v1/services/{service}")
def get_service(service: str, store: StoreDep) -> dict:
    requests = store.frame("requests").filter(pl.col("service") == service)
    stats = store.frame("server_stats").filter(pl.col("service") == service)
    if requests.height == 0 and stats.height == 0:
        raise HTTPException(404, f"no service {service!r} has reported a request or been scraped")
    return {
        "service": service,
        "models": latency_quantiles(requests, service).to_dicts(),
        "scraped": server_overview(stats).to_dicts(),
        "scraped_latency": server_latency_quantiles(store.frame("server_histograms"), service).to_dicts(),
    }
