"""POST /v1/ingest: strict decoding, a body-size limit, once-only application per (agent_id, seq)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from collector.api.deps import IngestAuth, MetricsDep, SettingsDep, StoreDep
from collector.store import StoreUnavailable
from fleetscope.schema import MalformedError, SchemaError, decode_batch

router = APIRouter(tags=["ingest"])


class IngestReply(BaseModel):
    agent_id: str
    seq: int
    events: int
    frames: int
    duplicate: bool


@router.post(
    "/v1/ingest",
    dependencies=[IngestAuth],
    response_model=IngestReply,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}},
        }
    },
)
async def ingest(request: Request, store: StoreDep, settings: SettingsDep, metrics: MetricsDep) -> IngestReply:
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        metrics.rejected("too_large")
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit}; send smaller batches")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            metrics.rejected("too_large")
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes; send smaller batches")
    data = bytes(body)

    def decode_and_store():
        # Decoding a batch takes milliseconds and the WAL fsync blocks: both off the event loop, so other
        # requests keep flowing while this one is decoded and made durable.
        batch = decode_batch(data)
        result = store.ingest(batch, data)
        metrics.ingested(batch, result.duplicate, result.counts)
        return batch, result

    try:
        batch, result = await asyncio.to_thread(decode_and_store)
    except MalformedError as exc:
        metrics.rejected("malformed")
        raise HTTPException(400, str(exc)) from None
    except SchemaError as exc:
        metrics.rejected("schema")
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
    return IngestReply(agent_id=batch.agent_id, seq=batch.seq, events=result.events, frames=result.frames, duplicate=result.duplicate)
