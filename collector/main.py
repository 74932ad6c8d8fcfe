"""Runs the collector under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from collector.api import create_app
from collector.settings import Settings

log = logging.getLogger("fleetscope.collector")


def run(settings: Settings, host: str = "0.0.0.0", port: int = 9837) -> None:
    app = create_app(settings)
    log.info("collector on http://%s:%d, data in %s", host, port, settings.data_dir)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
