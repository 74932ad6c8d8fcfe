"""GET /v1/services and /v1/services/{service}: inference latency quantiles per model."""

from __future__ import annotations

import polars as pl
from fastapi import APIRouter, HTTPException

from collector.api.deps import ReadAuth, StoreDep
from collector.inference import latency_quantiles, services_overview

router = APIRouter(tags=["inference"], dependencies=[ReadAuth])


@router.get("/v1/services")
def list_services(store: StoreDep) -> dict:
    return {"services": services_overview(store.frame("requests")).to_dicts()}


@router.get("/v1/services/{service}")
def get_service(service: str, store: StoreDep) -> dict:
    requests = store.frame("requests")
    if requests.filter(pl.col("service") == service).height == 0:
        raise HTTPException(404, f"no service {service!r} has reported a request")
    return {"service": service, "models": latency_quantiles(requests, service).to_dicts()}
