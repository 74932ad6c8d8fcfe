"""The probes, with no token, and GET /metrics (read token, or the web config's basic auth password).

- GET /healthz: ready for everything, ingest included: 503 "starting" while the WAL replays, 503
  "cannot_write" (and why) while the store cannot write (a full disk). What the tests and the demo wait on.
- GET /readyz: ready to serve: 503 only while the WAL replays. A full disk leaves reads working (ingest
  answers 503 and the agents keep their batches), so a load balancer or a Kubernetes Service keeps sending
  the console's reads here.
- GET /livez: the process serves, whatever its store does. What a supervisor restarts on: restarting a
  collector whose disk is full frees no disk, and while it runs it keeps serving reads and recovers by itself
  when space returns (a Kubernetes liveness probe on /healthz would kill it within a minute of the disk
  filling, and a readiness probe on it would take its reads away).

The Kubernetes manifest (deploy/kubernetes/base/collector.yaml) probes liveness on /livez and readiness on
/readyz."""

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
        return _starting(store)
    if store.problem:
        # Reads still work; ingest answers 503 and the agents keep their batches until the disk recovers.
        return JSONResponse({"status": "cannot_write", "reason": store.problem}, status_code=503)
    return JSONResponse({"status": "ok", "startup": store.startup})


def _starting(store) -> JSONResponse:
    return JSONResponse({"status": "starting", "phase": store.startup.get("phase")}, status_code=503,
                        headers={"Retry-After": "2"})


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    store = request.app.state.store
    if not store.ready:
        return _starting(store)
    return JSONResponse({"status": "ok", "ingest": "cannot_write" if store.problem else "ok",
                         **({"reason": store.problem} if store.problem else {})})


@router.get("/livez")
def livez(request: Request) -> JSONResponse:
    store = request.app.state.store
    return JSONResponse({"status": "alive", "ready": bool(store.ready), "can_write": not store.problem})


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
