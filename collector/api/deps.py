"""Dependencies shared by the routes: the store, the settings, bearer-token scopes and the ingesting agent's identity.

An agent authenticates as itself with an agent token (settings.agent_tokens: token -> identity) or a client
certificate (its common name, when the collector serves mutual TLS); a fleet token names no one, and its
batches are taken for the node they name (small, trusted setups). `check_identity` refuses (403) a batch
written as any node but the one that authenticated.
"""

from __future__ import annotations

import hmac
from typing import Annotated

import time
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Query, Request

from collector.decoders import Prepared
from collector.metrics import CollectorMetrics
from collector.settings import Settings, token_digest
from collector.store import Store
from fleetscope.schema import Batch


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> CollectorMetrics:
    return request.app.state.metrics


async def get_ready_store(request: Request) -> Store:
    store: Store = request.app.state.store
    if not store.ready:
        raise HTTPException(503, f"the collector is starting ({store.startup['phase']}); try again shortly",
                            headers={"Retry-After": "2"})
    return store


# The dependencies are `async def`: they do no I/O, and FastAPI runs a plain `def` dependency in its thread
# pool, a hop to a worker thread and back for each one of each request (four for an ingest).
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


@dataclass(frozen=True)
class Principal:
    """Who sent an ingest request: `identity` is the node it may write as, None for a fleet token (any node)."""

    identity: str | None
    via: str  # "agent token", "client certificate" or "fleet token"


def tls_peer(request: Request) -> str | None:
    """The common name of the verified client certificate on this connection (collector.main puts it there)."""
    return (request.scope.get("state") or {}).get("tls_client")


async def require_ingest(request: Request, settings: SettingsDep) -> Principal:
    peer = tls_peer(request)
    if peer is not None and not request.headers.get("authorization"):
        return Principal(peer, "client certificate")
    token = _bearer(request)
    # By the token's digest: the lookup's timing tells nothing about any token's characters.
    identity = settings.agent_by_digest.get(token_digest(token))
    if identity is not None:
        if peer is not None and peer != identity:
            raise HTTPException(403, f"the client certificate is for {peer!r} but the token for {identity!r}; an agent "
                                     "authenticates as one node")
        return Principal(identity, "agent token")
    _require(request, settings.ingest_tokens, settings.read_tokens, "this token may only read; ingest needs an ingest token")
    return Principal(peer, "client certificate") if peer is not None else Principal(None, "fleet token")


def check_read(request: Request, settings: Settings) -> None:
    # An ingest token does not read: a compromised node must not see the whole fleet.
    _require(request, settings.read_tokens, settings.all_ingest_tokens, "this token may only ingest; reading needs a read token")


async def require_read(request: Request, settings: SettingsDep) -> None:
    check_read(request, settings)


def check_identity(batch: Batch | Prepared, principal: Principal) -> None:
    """403 unless every node the batch names is the one that authenticated (a fleet token may name any)."""
    me = principal.identity
    if me is None:
        return
    if batch.node != me:
        raise HTTPException(403, f"batch {batch.seq}: node {batch.node!r} is not {me!r}, the identity of this "
                                 f"{principal.via}; an agent writes only as itself")
    if batch.agent_id != me and not batch.agent_id.startswith(me + "-"):
        raise HTTPException(403, f"batch {batch.seq}: agent_id {batch.agent_id!r} is not {me!r} or {me!r}-<suffix>, "
                                 f"as the identity of this {principal.via} requires")
    if isinstance(batch, Prepared):  # decoded by a worker: it listed the nodes its records name
        if batch.nodes <= {me}:
            return
        raise HTTPException(403, f"batch {batch.seq}: a record is for node {sorted(batch.nodes - {me})[0]!r}, not "
                                 f"{me!r}, the identity of this {principal.via}")
    for field, records in (("frames", batch.frames), ("servers", batch.servers), ("events", batch.events)):
        for i, record in enumerate(records):
            node = getattr(record, "node", None)
            if node is not None and node != me:
                raise HTTPException(403, f"batch {batch.seq}: {field}[{i}] is for node {node!r}, not {me!r}, the "
                                         f"identity of this {principal.via}")


IngestPrincipal = Annotated[Principal, Depends(require_ingest)]
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


async def time_range(
    settings: SettingsDep,
    since: float | None = Query(None, ge=0, le=1e10, description="start of the range, Unix seconds (default: per endpoint)"),
    until: float | None = Query(None, ge=0, le=1e10, description="end of the range, Unix seconds (default: now)"),
    max_points: int | None = Query(None, ge=1, le=10_000, description="at most this many points per series"),
) -> Range:
    if since is not None and until is not None and since > until:
        raise HTTPException(422, f"since ({since}) is after until ({until})")
    return Range(since, until, max_points or settings.max_points)


RangeDep = Annotated[Range, Depends(time_range)]
