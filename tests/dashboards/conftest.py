"""A real collector (uvicorn in a thread of the test process) fed one batch, for the console's page tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from collector.api import create_app
from collector.settings import Settings
from tests.conftest import free_port, wait_until


def serve_collector(data_dir: Path, ingest: str, read: str, batch: dict) -> Iterator[str]:
    """Start a collector, post `batch` to it, yield its URL; stop it when the generator is closed."""
    settings = Settings(data_dir=data_dir, ingest_tokens=frozenset({ingest}), read_tokens=frozenset({read}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, what="the collector")
    resp = httpx.post(url + "/v1/ingest", content=json.dumps(batch), headers={"Authorization": f"Bearer {ingest}"})
    assert resp.status_code == 200, resp.text
    yield url
    server.should_exit = True
    thread.join(timeout=10)
