"""Service level objectives for inference: good and bad requests per minute, burn rates, budgets.

SLOs are declared in the collector's TOML config:

    [[slo]]
    name = "chat-ttft"
    service = "chat"
    model = "llama3-8b"        # optional: every model of the service when absent
    indicator = "ttft"         # ttft | e2e | tpot | queue | availability
    threshold_s = 0.5          # a request is good when it succeeded within this (not for availability)
    objective = 0.99
    window_days = 30

The ledger keeps, per SLO, good and total requests per minute for the SLO's window, so burn
rates over 5 min .. 3 days and the budget left are cheap to read. Burn rate = the share of bad
requests in a window / (1 - objective): 1 spends the budget exactly over the SLO window. The
multiwindow, multi-burn-rate rules of Google's SRE workbook turn them into findings.
"""

from __future__ import annotations

import json
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from collector.snapshots import JsonSnapshot
from collector.tables import empty

INDICATORS = ("ttft", "e2e", "tpot", "queue", "availability")
WINDOWS_S = {"5m": 300, "30m": 1800, "1h": 3600, "6h": 6 * 3600, "3d": 3 * 86400}
# (long window, short window, burn rate, severity): the SRE workbook's table
RULES = (("1h", "5m", 14.4, "page"), ("6h", "30m", 6.0, "page"), ("3d", "6h", 1.0, "ticket"))


@dataclass(frozen=True)
class Slo:
    name: str
    service: str
    indicator: str
    objective: float
    threshold_s: float | None = None
    model: str | None = None
    window_days: float = 30.0

    def __post_init__(self) -> None:
        if self.indicator not in INDICATORS:
            raise ValueError(f"slo {self.name!r}: indicator must be one of {', '.join(INDICATORS)}, got {self.indicator!r}")
        if not 0 < self.objective < 1:
            raise ValueError(f"slo {self.name!r}: objective must be between 0 and 1 (0.99 for 99%), got {self.objective}")
        if self.indicator != "availability" and (self.threshold_s is None or self.threshold_s <= 0):
            raise ValueError(f"slo {self.name!r}: a latency SLO needs a positive threshold_s")


def load_slos(path: str | Path) -> list[Slo]:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return parse_slos(data.get("slo", []), path)


def parse_slos(tables: list, path: str | Path) -> list[Slo]:
    """The config file's [[slo]] tables; an unknown key or a bad value is an error that names the SLO."""
    slos = []
    for i, raw in enumerate(tables):
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: slo {i + 1}: expected a table ([[slo]])")
        try:
            slos.append(Slo(**raw))
        except TypeError as exc:
            raise ValueError(f"{path}: slo {i + 1}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    names = [s.name for s in slos]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: SLO names must be unique")
    return slos


def good_and_total(requests: pl.DataFrame, slo: Slo) -> pl.DataFrame:
    """Per minute: requests of the SLO's service (and model) and how many were good."""
    rows = requests.filter(pl.col("service") == slo.service)
    if slo.model is not None:
        rows = rows.filter(pl.col("model") == slo.model)
    ok = pl.col("status") == "ok"
    if slo.indicator == "availability":
        good = pl.col("status") != "error"  # a request the user cancelled is no failure of the service
        counted = pl.lit(True)
    else:
        column = f"{slo.indicator}_s"
        good = ok & (pl.col(column) <= slo.threshold_s)
        # A successful request that never reported this latency (no first token) says nothing about it.
        counted = ~(ok & pl.col(column).is_null())
    return (
        rows.filter(counted)
        .group_by((pl.col("ts") // 60 * 60).alias("minute"))
        .agg(good.sum().cast(pl.Float64).alias("good"), pl.len().cast(pl.Float64).alias("total"))
        .sort("minute")
    )


def _good_below(le: list[float], counts: list[float], threshold: float) -> float:
    """Observations at or under `threshold` in one cumulative histogram, linear within its bucket
    (exact when the threshold is a bucket bound, as it should be for an SLO)."""
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(le, counts):
        if bound >= threshold:
            if bound >= 1e300 or bound == lower:
                return below
            return below + (cumulative - below) * (threshold - lower) / (bound - lower)
        lower, below = bound, cumulative
    return below


def good_and_total_from_servers(histograms: pl.DataFrame, stats: pl.DataFrame, slo: Slo) -> list[tuple[float, float, float]]:
    """(minute, good, total) for a service read from its inference servers' /metrics."""
    if slo.indicator == "availability":
        rows = stats.filter(pl.col("service") == slo.service)
        if slo.model is not None:
            rows = rows.filter(pl.col("model") == slo.model)
        out = rows.group_by((pl.col("ts") // 60 * 60).alias("minute")).agg(
            pl.col("requests_ok").fill_null(0).sum().alias("good"),
            (pl.col("requests_ok").fill_null(0) + pl.col("requests_error").fill_null(0)).sum().alias("total"))
        return [tuple(map(float, r)) for r in out.iter_rows()]  # type: ignore[misc]
    rows = histograms.filter((pl.col("service") == slo.service) & (pl.col("metric") == slo.indicator))
    if slo.model is not None:
        rows = rows.filter(pl.col("model") == slo.model)
    out = []
    for ts, le, counts, count in rows.select("ts", "le", "counts", "count").iter_rows():
        out.append((ts // 60 * 60, _good_below(le, counts, slo.threshold_s), float(count)))  # type: ignore[arg-type]
    return out


class SloLedger:
    def __init__(self, slos: list[Slo]) -> None:
        self.slos = list(slos)
        self._lock = threading.Lock()
        # per SLO, minute -> (good, total): tuples replaced, never changed in place, so a dict copy is a snapshot
        self._bins: dict[str, dict[float, tuple[float, float]]] = {s.name: {} for s in self.slos}
        self.restored: set[str] = set()  # SLOs whose counts came from a checkpoint

    def observe(self, requests: pl.DataFrame) -> None:
        """Count new request rows (call once per row: at ingest, and at start for what is on disk)."""
        if requests.height == 0 or not self.slos:
            return
        for slo in self.slos:
            self._add(slo.name, good_and_total(requests, slo).iter_rows())

    def observe_servers(self, histograms: pl.DataFrame, stats: pl.DataFrame) -> None:
        """Count what scraped inference servers did (their histogram and counter deltas)."""
        if not self.slos or (histograms.height == 0 and stats.height == 0):
            return
        for slo in self.slos:
            self._add(slo.name, good_and_total_from_servers(histograms, stats, slo))

    def _add(self, name: str, cells) -> None:
        """Add (minute, good, total) counts to one SLO's bins."""
        with self._lock:
            bins = self._bins[name]
            for minute, good, total in cells:
                g, t = bins.get(minute, (0.0, 0.0))
                bins[minute] = (g + good, t + total)

    def snapshot(self) -> JsonSnapshot:
        """The per-minute counts, for the store's checkpoint (restored at start-up, before the WAL replay): copied
        now, under the store's gate (a dict copy each), encoded when the checkpoint writes them, after it."""
        with self._lock:
            copies = {name: bins.copy() for name, bins in self._bins.items()}
        return JsonSnapshot(lambda: {name: [[m, g, t] for m, (g, t) in bins.items()] for name, bins in copies.items()})

    def restore(self, data: bytes | JsonSnapshot) -> None:
        """Counts saved by a checkpoint; an SLO added since is left for `backfill`, one removed is dropped."""
        saved = json.loads(bytes(data))
        with self._lock:
            for name, rows in saved.items():
                if name in self._bins:
                    self._bins[name] = {float(m): (float(g), float(t)) for m, g, t in rows}
                    self.restored.add(name)

    def over(self, since: float, until: float) -> list[dict]:
        """Per SLO: requests, good ones, and the burn rate over [since, until] (whole minutes)."""
        out = []
        with self._lock:
            for slo in self.slos:
                good = total = 0.0
                for minute, (g, t) in self._bins[slo.name].items():
                    if since - 60 < minute <= until:
                        good += g
                        total += t
                burn = ((total - good) / total / (1 - slo.objective)) if total else 0.0
                out.append({"slo": slo.name, "since": since, "until": until, "requests": total, "good": good, "burn_rate": burn})
        return out

    def backfill(self, requests: pl.LazyFrame | None, histograms: pl.LazyFrame | None, stats: pl.LazyFrame | None,
                 names: set[str]) -> None:
        """Count what the warm tier holds for SLOs that have no saved counts (added since the last run)."""
        for slo in [s for s in self.slos if s.name in names]:
            cells: list[tuple[float, float, float]] = []
            if requests is not None:
                cells += [tuple(map(float, r)) for r in good_and_total(requests, slo).collect(engine="streaming").iter_rows()]  # type: ignore[misc]
            if histograms is not None or stats is not None:
                hist = histograms.filter(pl.col("service") == slo.service).collect() if histograms is not None else None
                stat = stats.filter(pl.col("service") == slo.service).collect() if stats is not None else None
                cells += good_and_total_from_servers(hist if hist is not None else empty("server_histograms"),
                                                     stat if stat is not None else empty("server_stats"), slo)
            self._add(slo.name, cells)

    def _window(self, name: str, now: float, seconds: float) -> tuple[float, float]:
        bins = self._bins[name]
        good = total = 0.0
        for minute, (g, t) in bins.items():
            if minute > now - seconds:
                good += g
                total += t
        return good, total

    def report(self, now: float) -> list[dict]:
        """Per SLO: burn rate per window, error budget left over the SLO's window."""
        out = []
        with self._lock:
            for slo in self.slos:
                horizon = now - slo.window_days * 86400
                bins = self._bins[slo.name]
                for minute in [m for m in bins if m < horizon]:
                    del bins[minute]
                budget = 1 - slo.objective
                burn, counts = {}, {}
                for window, seconds in WINDOWS_S.items():
                    good, total = self._window(slo.name, now, seconds)
                    burn[window] = ((total - good) / total / budget) if total else 0.0
                    counts[window] = total
                good, total = self._window(slo.name, now, slo.window_days * 86400)
                spent = ((total - good) / total / budget) if total else 0.0
                out.append({"slo": slo.name, "service": slo.service, "model": slo.model, "indicator": slo.indicator,
                            "objective": slo.objective, "threshold_s": slo.threshold_s, "burn_rate": burn,
                            "requests_by_window": counts,
                            "requests": total, "good": good, "error_budget_remaining_ratio": 1 - spent})
        return out


MIN_REQUESTS = 100  # fewer requests than this in a rule's long window: too few to judge a burn rate


def burning(report: list[dict]) -> list[dict]:
    """The SRE workbook's multiwindow, multi-burn-rate alerts: both windows of a pair above its rate
    (and, for findings, enough requests in the long window to mean something)."""
    out = []
    for r in report:
        if r.get("requests_by_window") and r["requests_by_window"]["5m"] < MIN_REQUESTS and r["requests"] < MIN_REQUESTS:
            continue
        for long, short, rate, severity in RULES:
            if r["burn_rate"][long] >= rate and r["burn_rate"][short] >= rate:
                out.append({**r, "rule": f"{long}/{short} >= {rate}", "severity": severity})
                break  # the most urgent pair only
    return out
