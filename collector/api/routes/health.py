"""GET /healthz (no token): ready only once the WAL replay is done, and not while the store cannot write;
GET /metrics (read token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from collector.api.deps import MetricsDep, ReadAuth

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    store = request.app.state.store
    if not store.ready:
        return JSONResponse({"status": "starting", "phase": store.startup.get("phase")}, status_code=503,
                            headers={"Retry-After": "2"})
    if store.problem:
        # Reads still work; ingest answers 503 and the agents keep their batches until the disk recovers.
        return JSONResponse({"status": "cannot_write", "reason": store.problem}, status_code=503)
    return JSONResponse({"status": "ok", "startup": store.startup})


@router.get("/metrics", dependencies=[ReadAuth], response_class=Response)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
