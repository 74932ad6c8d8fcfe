"""Dependencies shared by the routes: the store, the settings, and bearer-token scopes."""

from __future__ import annotations

import hmac
from typing import Annotated

import time
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Query, Request

from collector.metrics import CollectorMetrics
from collector.settings import Settings
from collector.store import Store


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> CollectorMetrics:
    return request.app.state.metrics


def get_ready_store(request: Request) -> Store:
    store: Store = request.app.state.store
    if not store.ready:
        raise HTTPException(503, f"the collector is starting ({store.startup['phase']}); try again shortly",
                            headers={"Retry-After": "2"})
    return store


StoreDep = Annotated[Store, Depends(get_ready_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[CollectorMetrics, Depends(get_metrics)]


def _matches(token: str, allowed: frozenset[str]) -> bool:
    # Constant-time comparison against each configured token.
    return any(hmac.compare_digest(token.encode(), t.encode()) for t in allowed)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def _require(request: Request, allowed: frozenset[str], other: frozenset[str], refusal: str) -> None:
    token = _bearer(request)
    if _matches(token, allowed):
        return
    if _matches(token, other):
        raise HTTPException(403, refusal)
    raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})


def require_ingest(request: Request, settings: SettingsDep) -> None:
    _require(request, settings.ingest_tokens, settings.read_tokens, "this token may only read; ingest needs an ingest token")


def require_read(request: Request, settings: SettingsDep) -> None:
    # An ingest token does not read: a compromised node must not see the whole fleet.
    _require(request, settings.read_tokens, settings.ingest_tokens, "this token may only ingest; reading needs a read token")


IngestAuth = Depends(require_ingest)
ReadAuth = Depends(require_read)


@dataclass(frozen=True)
class Range:
    """The time range of a read: [since, until] in Unix seconds; `until` None means now."""

    since: float | None
    until: float | None
    max_points: int

    def resolve(self, default_s: float) -> tuple[float, float]:
        until = time.time() if self.until is None else self.until
        return (until - default_s if self.since is None else self.since), until


def time_range(
    settings: SettingsDep,
    since: float | None = Query(None, ge=0, le=1e10, description="start of the range, Unix seconds (default: per endpoint)"),
    until: float | None = Query(None, ge=0, le=1e10, description="end of the range, Unix seconds (default: now)"),
    max_points: int | None = Query(None, ge=1, le=10_000, description="at most this many points per series"),
) -> Range:
    if since is not None and until is not None and since > until:
        raise HTTPException(422, f"since ({since}) is after until ({until})")
    return Range(since, until, max_points or settings.max_points)


RangeDep = Annotated[Range, Depends(time_range)]
