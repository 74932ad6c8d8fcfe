"""Views of the hot tier's big tables, shared between requests for a few seconds.

Per-rank figures of a 16,384-rank job take a few hundred milliseconds to compute from its ranks'
recent steps; the console, Prometheus and several operators ask for them every few seconds. A view
of a big table is recomputed at most once per analysis interval (the findings are that old too); a
view of a small table is always computed afresh, so that what was just ingested shows at once.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

import polars as pl

from collector.training import jobs_overview, with_mfu

T = TypeVar("T")
BIG_ROWS = 100_000


class Views:
    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._cache: dict[object, tuple[float, object]] = {}

    def get(self, key: object, compute: Callable[[], T], *, rows: int | None = None) -> T:
        """The view under `key`, computed afresh when older than max_age_s; a view of a table of fewer
        than BIG_ROWS `rows` is always computed afresh (rows None: always shared)."""
        if rows is not None and rows < BIG_ROWS:
            return compute()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.max_age_s:
            return hit[1]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._cache[key] = (now, value)
            for old in [k for k, (t, _) in self._cache.items() if now - t > 10 * self.max_age_s]:
                del self._cache[old]
        return value


def jobs_now(store, views: Views | None) -> pl.DataFrame:
    """Every job over the hot tier's window (the /metrics and the default /v1/jobs view)."""
    # The steps table is put together only when the view is computed, not at every cache hit (every scrape).
    compute = lambda: with_mfu(jobs_overview(store.hot.step_aggs(), store.frame("steps")), store.hot.latest("gpus"))  # noqa: E731
    return views.get("jobs", compute, rows=store.hot.rows()["steps"]) if views is not None else compute()
