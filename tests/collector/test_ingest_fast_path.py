"""POST /v1/ingest is served by IngestFastPath, before FastAPI's routing: it must answer as FastAPI would have
(the same statuses, `{"detail": ...}` bodies and headers) and leave every other request to the app."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.settings import Settings
from tests.conftest import wait_ready

INGEST, READ = "ingest-secret", "read-secret"
W, R = {"Authorization": f"Bearer {INGEST}"}, {"Authorization": f"Bearer {READ}"}
T0 = float(int(time.time()) - 600)


def batch(seq: int, steps: int = 2) -> dict:
    return {"v": 1, "agent_id": "a", "seq": seq, "node": "n", "sent_ts": T0,
            "events": [{"v": 1, "kind": "step", "job": "j", "rank": 0, "world_size": 1, "step": s, "ts": T0 + s, "duration_s": 1.0}
                       for s in range(steps)]}


@pytest.fixture
def client(tmp_path):
    s = Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({INGEST}), read_tokens=frozenset({READ}))
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


def test_ingest_never_reaches_fastapis_route(client):
    """The route is declared for the OpenAPI document only: its function raises if a request ever gets there."""
    resp = client.post("/v1/ingest", content=json.dumps(batch(0)), headers=W)
    assert resp.status_code == 200 and resp.json()["events"] == 2
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)


@pytest.mark.parametrize("headers, status, header, words", [
    ({}, 401, "www-authenticate", "missing bearer token"),
    ({"Authorization": "Bearer nobody"}, 401, "www-authenticate", "unknown token"),
    (R, 403, None, "may only read"),
])
def test_refusals_keep_fastapis_shape(client, headers, status, header, words):
    resp = client.post("/v1/ingest", content=json.dumps(batch(0)), headers=headers)
    assert resp.status_code == status and words in resp.json()["detail"]
    assert header is None or resp.headers[header] == "Bearer"
    assert client.get("/v1/jobs", headers=R).json()["jobs"] == []


def test_a_store_still_opening_answers_503_with_retry_after(client):
    store = client.app.state.store
    store.ready = False  # as while the WAL replays (the fixture waited until it had opened: nothing sets it again)
    try:
        resp = client.post("/v1/ingest", content=json.dumps(batch(0)), headers=W)
    finally:
        store.ready = True
    assert resp.status_code == 503 and resp.headers["retry-after"] == "2" and "starting" in resp.json()["detail"]
    assert client.post("/v1/ingest", content=json.dumps(batch(0)), headers=W).status_code == 200


def test_other_methods_and_paths_go_to_the_app(client):
    assert client.get("/v1/ingest", headers=W).status_code == 405  # FastAPI's answer for a POST-only route
    assert client.post("/v1/ingest/", content=b"{}", headers=W, follow_redirects=False).status_code == 307  # as before
    assert client.get("/healthz").status_code == 200


def test_a_sender_gone_mid_body_applies_nothing(client):
    """The body's last part never comes: the request ends unanswered and nothing of it is stored."""
    app = client.app
    body = json.dumps(batch(0)).encode()
    sent: list[dict] = []

    async def go():
        messages = [{"type": "http.request", "body": body[:20], "more_body": True}, {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/ingest", "raw_path": b"/v1/ingest", "root_path": "", "query_string": b"",
                 "headers": [(b"authorization", W["Authorization"].encode()), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
        await app(scope, receive, send)

    asyncio.run(go())
    assert sent == []
    assert client.get("/v1/jobs", headers=R).json()["jobs"] == []
