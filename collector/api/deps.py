"""Dependencies shared by the routes: the store, the settings, and bearer-token scopes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from collector.metrics import CollectorMetrics
from collector.settings import Settings
from collector.store import Store


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> CollectorMetrics:
    return request.app.state.metrics


StoreDep = Annotated[Store, Depends(get_store)]
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
