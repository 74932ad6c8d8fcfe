"""The collector's HTTP API: `create_app(settings)` builds it."""

from collector.api.app import create_app

__all__ = ["create_app"]
