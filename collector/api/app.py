"""create_app(settings): the collector's FastAPI application and its background work.

The HTTP server answers as soon as it starts; the store opens in the background (reading the hot
tier back and replaying the WAL) while /healthz says "starting" and the data routes answer 503.
Then three loops run: hot-tier upkeep and analysis (every analysis interval), checkpoints (every
checkpoint interval, or sooner when the rows waiting for one outgrow their memory), and compaction
and retention of the warm tier.
"""

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
from collector import history, partitions
from collector.api.routes import findings, fleet, health, ingest, jobs, services
from collector.views import Views
from collector.findings import FindingsTracker, analyse, slo_findings
from collector.metrics import CollectorMetrics
from collector.decoders import Decoders
from collector.settings import Settings
from collector.slo import SloLedger
from collector.pods import PodLinks
from collector.slurm import SlurmLinks
from collector.store import Store
from collector.tables import conform, empty
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
        settings.data_dir, window_s=settings.window_s, raw_s=settings.raw_window_s, raw_steps=settings.raw_steps,
        retention_s=settings.retention_s, retention_bytes=settings.retention_bytes, memory_budget=settings.memory_budget,
        fsync=settings.fsync, max_future_s=settings.max_future_skew_s, max_step_jump=settings.max_step_jump,
        observers=(observe,), persisted={"slo": ledger} if settings.slos else {}, start=False)
    tracker = FindingsTracker()
    # Each training job's Slurm jobs (collector/slurm.py): kept as step rows are applied, snapshotted with checkpoints.
    slurm = SlurmLinks(settings.retention_s)
    store.observers = (*store.observers, slurm.observe)
    store.persisted.setdefault("slurm", slurm)
    # The pod of each training rank and inference replica on Kubernetes (collector/pods.py), likewise.
    pods = PodLinks(settings.retention_s)
    store.observers = (*store.observers, pods.observe)
    store.persisted.setdefault("pods", pods)
    # The nodes each GPU was seen on, so a quiet GPU's history scan reads its node's files only (collector/history.py).
    gpu_nodes = store.persisted.setdefault("gpu_nodes", history.GpuNodes(settings.retention_s))

    def open_store() -> None:
        if not store.ready:
            store.open()
        missing = {s.name for s in settings.slos} - ledger.restored
        if missing:  # SLOs with no saved counts: count what the warm tier already holds for them
            since = time.time() - max(s.window_days for s in settings.slos) * 86400
            committed = store.committed_segment()
            scans = [partitions.scan(store.data_dir, kind, committed, since)
                     for kind in ("requests", "server_histograms", "server_stats")]
            ledger.backfill(*(conform(s, k) if s is not None else None
                              for s, k in zip(scans, ("requests", "server_histograms", "server_stats"))), names=missing)

    def samples(kind: str, since: float, until: float, keys: tuple[str, list]) -> pl.DataFrame:
        return history.samples(store, kind, since, until, keys)

    def analyse_now() -> None:
        store.maintain_hot()
        # The analysis and the views' refresh copy the step table's columns for a moment too: not beside a
        # compaction's (the store's upkeep lock; the fleet bench's highest RSS was one of each at once).
        with store.upkeep:
            gpu_nodes.update(store.hot.latest("gpus"))
            now = time.time()
            found, signals = analyse(store.frame("steps"), store.frame("pauses"), now, samples=samples,
                                     aggs=store.hot.step_aggs(), page_share=settings.straggler_page_share)
            report = ledger.report(now)
            found += slo_findings(report, now)
            tracker.update(found, signals, slo_report=report)
            app.state.views.refresh()  # the big views someone is reading, as of this pass (collector.views)

    async def analyse_forever() -> None:
        analysed = float("-inf")
        due, loop = asyncio.Event(), asyncio.get_running_loop()
        store.wake_upkeep = lambda: loop.call_soon_threadsafe(due.set)
        while True:
            # The analysis (with the hot tier's upkeep) an interval after the last one ended; the upkeep alone when its
            # backlog asks for a pass sooner (Store.admit: a flood).
            full = time.monotonic() - analysed >= settings.analysis_interval_s
            try:
                if full:
                    await asyncio.to_thread(analyse_now)
                else:
                    await asyncio.to_thread(store.maintain_hot)
            except RuntimeError as exc:
                if "shutdown" in str(exc):  # the interpreter is exiting under us
                    return
                log.exception("analysis failed; findings keep their last state")
            except Exception:
                log.exception("analysis failed; findings keep their last state")
            if full:  # the interval is counted from the end of a pass, as a sleep after each was
                analysed = time.monotonic()
            wait = max(0.0, analysed + settings.analysis_interval_s - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(due.wait(), wait)
            due.clear()

    async def checkpoint_forever() -> None:
        last_maintenance = time.monotonic()
        while True:
            due = asyncio.create_task(asyncio.to_thread(store.checkpoint_due.wait, settings.checkpoint_interval_s))
            try:
                await due
            finally:
                store.checkpoint_due.set()  # lets a waiting thread go when the task is cancelled
                store.checkpoint_due.clear()
            try:
                await asyncio.to_thread(store.checkpoint)
            except Exception as exc:
                log.error("checkpoint failed (%s); the WAL keeps every row until the next one succeeds", exc)
                await asyncio.sleep(min(settings.checkpoint_interval_s, 5.0))
            if time.monotonic() - last_maintenance >= settings.maintenance_interval_s:
                last_maintenance = time.monotonic()
                try:
                    await asyncio.to_thread(store.maintain)
                except Exception:
                    log.exception("compaction or retention failed; will retry")

    async def run() -> None:
        try:
            await asyncio.to_thread(open_store)
        except Exception as exc:
            log.exception("the store could not open")
            store.startup = {"phase": f"failed: {exc}"}
            return
        log.info("store ready in %.1f s", store.startup.get("seconds", 0))
        await asyncio.gather(checkpoint_forever(), analyse_forever())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        decoders.start()
        task = asyncio.create_task(run())
        try:
            yield
        finally:
            task.cancel()
            await decoders.close()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if store.ready:
                # Checkpoint, but keep the log open: an app whose lifespan restarts (tests do) keeps its store.
                try:
                    await asyncio.to_thread(store.checkpoint)
                except Exception as exc:
                    log.error("final checkpoint failed (%s); the WAL still holds every acknowledged batch", exc)

    # Worker processes that decode ingest bodies and build their frames (collector.decoders); none: the ingest threads do.
    decoders = Decoders(settings.ingest_processes or 0)
    app = FastAPI(title="fleetscope collector", version=fleetscope.__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.decoders = decoders if decoders.processes > 0 else None
    app.state.store = store
    app.state.tracker = tracker
    app.state.ledger = ledger
    app.state.slurm = store.persisted["slurm"]
    app.state.pods = store.persisted["pods"]
    app.state.analyse_now = analyse_now
    app.state.views = Views(settings.analysis_interval_s)
    app.state.history_views = Views(60.0)
    app.state.metrics = CollectorMetrics(store, tracker, cluster=settings.cluster, memory_budget=settings.memory_budget,
                                         views=app.state.views, max_jobs=settings.metrics_max_jobs,
                                         max_services=settings.metrics_max_services, max_ranks=settings.metrics_max_ranks)
    app.state.metrics.decoders = app.state.decoders
    for module in (ingest, fleet, jobs, services, findings, health):
        app.include_router(module.router)
    app.add_middleware(ingest.IngestFastPath)  # POST /v1/ingest, served before FastAPI's routing (see there)

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
