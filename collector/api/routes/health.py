"""GET /healthz (no token): ready only once the WAL replay is done, and not while the store cannot write;
GET /metrics (read token, or the web config's basic auth password)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from collector.api.deps import MetricsDep, SettingsDep, check_read

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


def require_metrics_reader(request: Request, settings: SettingsDep) -> None:
    # Sync, so bcrypt's ~70 ms (first scrape only) runs in the thread pool, not on the event loop.
    basic_auth = settings.metrics_basic_auth
    header = request.headers.get("authorization", "")
    if basic_auth is None or header.lower().startswith("bearer "):
        check_read(request, settings)  # a read token still works
    elif not basic_auth.check(header):
        raise HTTPException(401, "/metrics needs a user name and password (basic_auth_users in the web config) or a "
                                 "read token", headers={"WWW-Authenticate": 'Basic realm="fleetscope collector"'})


@router.get("/metrics", dependencies=[Depends(require_metrics_reader)], response_class=Response)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
