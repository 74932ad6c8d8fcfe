"""Views of the hot tier's big tables, shared between requests and kept fresh by the analysis pass.

Per-rank figures, the rank x step matrix and the roster of a 16,384-rank job take a few hundred
milliseconds each to compute from its ranks' recent steps; the console, Prometheus and several operators
ask for them every few seconds. A view of a big table is computed once and then recomputed by each
analysis pass (`refresh`, every analysis interval: the findings are that old too) for as long as someone
keeps asking for it, so a request reads it instead of computing it; one not asked for in `keep_s` is
dropped. At most MAX_VIEWS are kept (the least recently asked go first), and a pass stops refreshing once
it has spent an analysis interval on it: however many views readers ask for, the work stays bounded. A
view of a small table is always computed afresh, so that what was just ingested shows at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import polars as pl

from collector.training import job_roster, jobs_overview, with_mfu

log = logging.getLogger("fleetscope.collector.views")

T = TypeVar("T")
BIG_ROWS = 100_000
MAX_VIEWS = 16  # the console's Training page uses 3 per job it shows, plus 2 shared by all


@dataclass
class _View:
    at: float  # when it was computed (monotonic)
    value: Any
    compute: Callable[[], Any]
    asked: float  # when a request last read it


class Views:
    def __init__(self, max_age_s: float, keep_s: float | None = None) -> None:
        self.max_age_s = max_age_s
        # Kept fresh while asked for at least this often (the console refreshes every 30 s by default).
        self.keep_s = keep_s if keep_s is not None else max(120.0, 10 * max_age_s)
        self._lock = threading.Lock()
        self._cache: dict[object, _View] = {}

    def get(self, key: object, compute: Callable[[], T], *, rows: int | None = None) -> T:
        """The view under `key`: as the last analysis pass (or request) computed it, computed now when it is
        older than two analysis intervals (no pass refreshed it); a view of a table of fewer than BIG_ROWS
        `rows` is always computed afresh (rows None: always shared). `compute` must read the store when
        called (not a frame taken before): `refresh` calls it again."""
        if rows is not None and rows < BIG_ROWS:
            return compute()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                hit.asked = now
        if hit is not None and now - hit.at < 2 * self.max_age_s:
            return hit.value  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            self._cache[key] = _View(now, value, compute, now)
            while len(self._cache) > MAX_VIEWS:
                del self._cache[min(self._cache, key=lambda k: self._cache[k].asked)]
        return value

    def refresh(self) -> None:
        """Recompute every view asked for within keep_s (the analysis pass calls this); forget the others."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, v in self._cache.items() if now - v.asked > self.keep_s]:
                del self._cache[key]
            todo = list(self._cache.items())
        for key, view in todo:
            if time.monotonic() - now > self.max_age_s:  # the rest are computed by their next request if stale
                break
            try:
                value = view.compute()
            except Exception:  # e.g. the job is gone: the next request computes (and answers) for itself
                log.debug("view %r could not be refreshed", key, exc_info=True)
                with self._lock:
                    self._cache.pop(key, None)
                continue
            with self._lock:
                if key in self._cache:
                    self._cache[key] = _View(time.monotonic(), value, view.compute, self._cache[key].asked)


def roster(store, views: Views | None) -> pl.DataFrame:
    """Each job's ranks, nodes and GPUs over every raw step the hot tier keeps (collector.training.job_roster)."""
    compute = lambda: job_roster(store.frame("steps"))  # noqa: E731
    return views.get("roster", compute, rows=store.hot.rows()["steps"]) if views is not None else compute()


def jobs_now(store, views: Views | None) -> pl.DataFrame:
    """Every job over the hot tier's window (the /metrics and the default /v1/jobs view)."""
    # The steps table is put together only when the view is computed, not at every cache hit (every scrape).
    compute = lambda: with_mfu(jobs_overview(store.hot.step_aggs(), roster=roster(store, views)),  # noqa: E731
                               store.hot.latest("gpus"))
    return views.get("jobs", compute, rows=store.hot.rows()["steps"]) if views is not None else compute()
