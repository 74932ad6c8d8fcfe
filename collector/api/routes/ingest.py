"""POST /v1/ingest: strict decoding, a body-size limit, once-only application per (node, agent_id, epoch, seq).

An agent that authenticated as itself (agent token or client certificate) may send only batches that name
it (403 otherwise: collector.api.deps.check_identity); a batch numbered more than 2**32 above its watermark
is refused whole with 422 (collector.store.SequenceJump).

A body that is not a valid batch is refused whole (4xx): too large 413, not JSON or nested deeper than any
batch 400, not the schema 422. A valid batch is applied even when some of its records break the input
bounds (dated too far ahead, older than retention, a step number that jumps: collector.bounds): those
are left out, counted, and listed in the reply's `refusals`; refusing the whole batch would make the
agent drop the good records with the bad.
"""

from __future__ import annotations

import asyncio

import msgspec
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from collector.api.deps import check_identity, require_ingest
from collector.decoders import Prepared
from collector.metrics import CollectorMetrics
from collector.settings import Settings
from collector.store import Backlogged, SequenceJump, Store, StoreUnavailable
from fleetscope.schema import Batch, MalformedError, SchemaError, TooDeep, decode_batch

router = APIRouter(tags=["ingest"])


class Refused(BaseModel):
    """One record of the batch left out, and why."""

    field: str = Field(description="the batch's list that held it: events, frames or servers")
    index: int = Field(description="its position in that list, as sent")
    kind: str = Field(description="step, request, pause, host_frame or server_frame")
    reason: str = Field(description="future (dated too far ahead), too_old (older than retention) or step_jump")
    message: str


class IngestReply(BaseModel):
    agent_id: str
    seq: int
    events: int = Field(description="events applied (or, for a duplicate, received)")
    frames: int = Field(description="host frames applied (or, for a duplicate, received)")
    duplicate: bool
    # Present only when records were refused: the rest of the batch is applied all the same.
    refused: int = Field(0, description="records of the batch refused one by one (counted in "
                                        "fleetscope_collector_events_refused_total); the rest were applied")
    refusals: list[Refused] = Field([], description="the first 100 refused records")


INGEST_PATH = "/v1/ingest"


@router.post(
    INGEST_PATH,
    response_model=IngestReply,
    response_model_exclude_defaults=True,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}},
        }
    },
)
async def ingest(request: Request) -> Response:
    # Declared for the OpenAPI document: IngestFastPath serves every POST to this path before FastAPI routes it.
    raise RuntimeError("POST /v1/ingest is served by collector.api.routes.ingest.IngestFastPath, installed by create_app")


class IngestFastPath:
    """ASGI middleware that serves POST /v1/ingest itself and hands every other request to the app.

    Ingest is the one route taken hundreds of times a second. Through FastAPI's routing, dependency solving
    and exception middleware it cost about 0.3 ms of the event loop's time per batch; served here it costs the
    authentication, the body and one reply. Its refusals go through FastAPI's own HTTPException handler, as
    the routes' do. create_app installs it inside FastAPI's own error middleware, so a
    bug here is still a logged 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INGEST_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            reply = await serve(scope, receive)
        except HTTPException as exc:  # answered by FastAPI's own handler, as the app's routes are
            response = await http_exception_handler(Request(scope), exc)
        except ClientDisconnect:
            return  # the sender is gone: nothing to answer (an unread batch was not applied)
        else:
            response = Response(reply, media_type="application/json")
        await response(scope, receive, send)


async def serve(scope: Scope, receive: Receive) -> bytes:
    """One ingest request: authenticate, read the body within the limit, decode, apply; the reply's JSON.
    Raises HTTPException for every refusal."""
    app = scope["app"]
    settings: Settings = app.state.settings
    store: Store = app.state.store
    metrics: CollectorMetrics = app.state.metrics
    request = Request(scope, receive)
    principal = await require_ingest(request, settings)
    if not store.ready:
        raise HTTPException(503, f"the collector is starting ({store.startup['phase']}); try again shortly",
                            headers={"Retry-After": "2"})
    try:
        store.admit()  # before the body is read: a flood is refused for the cost of its head
    except Backlogged as exc:
        metrics.rejected("backlog")
        raise HTTPException(503, f"{exc}; the agent keeps the batch and retries", headers={"Retry-After": "1"}) from None
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        metrics.rejected("too_large")
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit}; send smaller batches")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > limit:
            metrics.rejected("too_large")
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes; send smaller batches")
        if not message.get("more_body", False):
            break
    data = bytes(body)
    decoders = app.state.decoders
    prepared: Prepared | None = None

    def decode_and_store():
        # Decoding a batch takes milliseconds and the WAL fsync blocks: both off the event loop, so other
        # requests keep flowing while this one is decoded and made durable.
        batch: Batch | Prepared | None = prepared
        if batch is not None and principal.identity is not None and not batch.nodes <= {principal.identity}:
            batch = None  # a record names another node: the batch itself names which, in the 403
        if batch is None:
            batch = decode_batch(data)
        try:
            check_identity(batch, principal)
        except HTTPException:
            metrics.rejected("identity")
            raise
        result = store.ingest(batch, data)
        metrics.ingested(batch, result.duplicate, result.counts, result.worker)
        if result.refused:
            metrics.refused(result.refused_counts or {})
        return batch, result

    try:
        if decoders is not None:  # decoded and made into frames by a worker process (collector.decoders)
            prepared = await decoders.prepare(data)
        batch, result = await asyncio.to_thread(decode_and_store)
    except TooDeep as exc:
        metrics.rejected("too_deep")
        raise HTTPException(400, str(exc)) from None
    except MalformedError as exc:
        metrics.rejected("malformed")
        raise HTTPException(400, str(exc)) from None
    except SchemaError as exc:
        metrics.rejected("schema")
        raise HTTPException(422, str(exc)) from None
    except SequenceJump as exc:
        metrics.rejected("seq_jump")
        raise HTTPException(422, str(exc)) from None
    except StoreUnavailable as exc:
        metrics.rejected("unavailable")
        raise HTTPException(503, f"{exc}; the agent keeps the batch and retries", headers={"Retry-After": "5"}) from None
    except OSError as exc:
        metrics.rejected("storage")
        store.problem = f"cannot write the write-ahead log: {exc}"
        raise HTTPException(503, f"collector cannot write its log ({exc}); the agent keeps the batch and retries",
                            headers={"Retry-After": "5"}) from None
    if store.problem and store.problem.startswith("cannot write the write-ahead log"):
        store.problem = None
    # IngestReply's fields (it documents the reply), encoded by msgspec: pydantic's validation and serialization
    # of the model took a tenth of a millisecond of each batch's time on the event loop.
    reply: dict = {"agent_id": batch.agent_id, "seq": batch.seq, "events": result.events, "frames": result.frames,
                   "duplicate": result.duplicate}
    if result.refused:
        reply["refused"] = result.refused
        reply["refusals"] = [{"field": r.field, "index": r.index, "kind": r.kind, "reason": r.reason, "message": r.message}
                             for r in result.refusals]
    return msgspec.json.encode(reply)
