"""create_app(settings): the collector's FastAPI application and its background persistence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager

import msgspec
import polars as pl
from fastapi import FastAPI

import fleetscope
from collector.api.routes import findings, fleet, health, ingest, jobs, services
from collector import partitions
from collector.findings import FindingsTracker, analyse, slo_findings
from collector.slo import SloLedger
from collector.tables import SCHEMAS, empty
from collector.metrics import CollectorMetrics
from collector.settings import Settings
from collector.store import Store
from fleetscope.schema import Batch

log = logging.getLogger("fleetscope.collector")


def create_app(settings: Settings, store: Store | None = None) -> FastAPI:
    ledger = SloLedger(list(settings.slos))

    def observe(kind: str, frame: pl.DataFrame) -> None:
        if kind == "requests":
            ledger.observe(frame)
        elif kind == "server_histograms":
            ledger.observe_servers(frame, empty("server_stats"))
        elif kind == "server_stats":
            ledger.observe_servers(empty("server_histograms"), frame)

    store = store if store is not None else Store(
        settings.data_dir, window_s=settings.window_s, retention_s=settings.retention_s,
        retention_bytes=settings.retention_bytes, fsync=settings.fsync, observers=(observe,))
    if settings.slos:  # what is already on disk counts towards the SLOs' windows
        longest = max(s.window_days for s in settings.slos) * 86400
        since = time.time() - longest
        on_disk = partitions.load(store.data_dir, "requests", since, SCHEMAS["requests"])
        if on_disk is not None:
            ledger.observe(on_disk)
        ledger.observe_servers(partitions.load(store.data_dir, "server_histograms", since, SCHEMAS["server_histograms"])
                               or empty("server_histograms"),
                               partitions.load(store.data_dir, "server_stats", since, SCHEMAS["server_stats"])
                               or empty("server_stats"))

    tracker = FindingsTracker()

    def analyse_now() -> None:
        now = time.time()
        found, signals = analyse(store.frame("steps"), store.frame("pauses"), store.frame("gpus"), store.frame("hosts"), now)
        report = ledger.report(now)
        found += slo_findings(report, now)
        tracker.update(found, signals, slo_report=report)

    async def analyse_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(analyse_now)
            except Exception:
                log.exception("analysis failed; findings keep their last state")
            await asyncio.sleep(settings.analysis_interval_s)

    async def checkpoint_forever() -> None:
        last_maintenance = time.monotonic()
        while True:
            await asyncio.sleep(settings.checkpoint_interval_s)
            try:
                await asyncio.to_thread(store.checkpoint)
            except Exception:
                log.exception("checkpoint failed; the WAL keeps every row until the next one succeeds")
            if time.monotonic() - last_maintenance >= settings.maintenance_interval_s:
                last_maintenance = time.monotonic()
                try:
                    await asyncio.to_thread(store.maintain)
                except Exception:
                    log.exception("compaction or retention failed; will retry")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(checkpoint_forever()), asyncio.create_task(analyse_forever())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Checkpoint, but keep the log open: an app whose lifespan restarts (tests do) keeps its store.
            await asyncio.to_thread(store.checkpoint)

    app = FastAPI(title="fleetscope collector", version=fleetscope.__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.tracker = tracker
    app.state.analyse_now = analyse_now
    app.state.metrics = CollectorMetrics(store, tracker)
    for module in (ingest, fleet, jobs, services, findings, health):
        app.include_router(module.router)

    default_openapi = app.openapi

    def openapi() -> dict:
        # The ingest body is decoded by msgspec, not pydantic: publish its JSON Schema ourselves.
        if app.openapi_schema is None:
            schema = default_openapi()
            (_, components) = msgspec.json.schema_components([Batch], ref_template="#/components/schemas/{name}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
