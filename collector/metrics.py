"""The collector's /metrics: its own ingest counters and the training and inference signals for alert rules."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Iterable

import polars as pl
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from collector.store import Store
from collector.training import jobs_overview
from fleetscope.schema import Batch

# Latency quantiles on /metrics cover this recent window, so they move when the service does.
RECENT_S = 300.0


class CollectorMetrics:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self.events: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def ingested(self, batch: Batch, duplicate: bool) -> None:
        with self._lock:
            self.batches["duplicate" if duplicate else "applied"] += 1
            if not duplicate:
                for ev in batch.events:
                    self.events[type(ev).__struct_config__.tag] += 1
                self.events["host_frame"] += len(batch.frames)

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            events, batches, rejections = dict(self.events), dict(self.batches), dict(self.rejections)
        m = CounterMetricFamily("fleetscope_collector_events_ingested", "Records applied, by kind.", labels=["kind"])
        for kind in ("step", "request", "pause", "host_frame"):
            m.add_metric([kind], events.get(kind, 0))
        yield m
        m = CounterMetricFamily("fleetscope_collector_batches", "Batches acknowledged, applied or recognised as duplicates.", labels=["outcome"])
        for outcome in ("applied", "duplicate"):
            m.add_metric([outcome], batches.get(outcome, 0))
        yield m
        m = CounterMetricFamily("fleetscope_collector_ingest_rejected", "Ingest requests refused, by reason.", labels=["reason"])
        for reason in ("malformed", "schema", "too_large", "storage"):
            m.add_metric([reason], rejections.get(reason, 0))
        yield m
        yield from self._training()
        yield from self._inference()

    def _training(self) -> Iterable[Metric]:
        jobs = jobs_overview(self.store.frame("steps"))
        last = GaugeMetricFamily("fleetscope_training_last_step", "Highest step number any rank of the job reported.", labels=["job"])
        seen = GaugeMetricFamily("fleetscope_training_last_report_timestamp_seconds", "Unix time the job's last step ended.", labels=["job"])
        p50 = GaugeMetricFamily("fleetscope_training_step_time_p50_seconds", "Median step time of the job over the collector's window.", labels=["job"])
        for row in jobs.iter_rows(named=True):
            last.add_metric([row["job"]], row["last_step"])
            seen.add_metric([row["job"]], row["last_report_ts"])
            p50.add_metric([row["job"]], row["step_time_p50_s"])
        yield from (last, seen, p50)

    def _inference(self) -> Iterable[Metric]:
        recent = self.store.frame("requests").filter((pl.col("ts") >= time.time() - RECENT_S) & (pl.col("status") == "ok"))
        summary = recent.group_by("service", "model").agg(
            pl.col("e2e_s").quantile(0.95, interpolation="linear").alias("e2e"),
            pl.col("ttft_s").quantile(0.95, interpolation="linear").alias("ttft"),
        )
        e2e = GaugeMetricFamily("fleetscope_inference_e2e_p95_seconds", "95th percentile end-to-end latency over the last 5 minutes.", labels=["service", "model"])
        ttft = GaugeMetricFamily("fleetscope_inference_ttft_p95_seconds", "95th percentile time to first token over the last 5 minutes.", labels=["service", "model"])
        for row in summary.iter_rows(named=True):
            if row["e2e"] is not None:
                e2e.add_metric([row["service"], row["model"]], row["e2e"])
            if row["ttft"] is not None:
                ttft.add_metric([row["service"], row["model"]], row["ttft"])
        yield from (e2e, ttft)
