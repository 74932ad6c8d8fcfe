"""The collector's /metrics: its own ingest counters and the training and inference signals for alert rules.

Names of jobs and services come from whoever holds an ingest token, so the series they make are bounded:
at most `max_jobs` jobs, `max_services` (service, model) pairs and `max_ranks` ranks are exported, the most
troubled first (an active finding), then the most recent; what is left out is counted in
fleetscope_collector_metrics_omitted{kind} and stays readable through the query API.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Iterable

import polars as pl
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from collector.bounds import REASONS, RECORD_KINDS
from collector.decoders import Prepared
from collector.goodput import BADPUT
from collector.inference_series import recent_inference
from collector.findings import FindingsTracker
from collector.memory import rss
from collector.store import Store
from collector.views import jobs_now
from fleetscope.schema import Batch

# Latency quantiles on /metrics cover this recent window, so they move when the service does.
RECENT_S = 300.0
GOODPUT_EVERY_S = 30.0


# Training metrics label the job `training_job`: Prometheus gives every scraped series a `job` label of its
# own (the scrape job), which would otherwise overwrite ours.


class CollectorMetrics:
    def __init__(self, store: Store, tracker: FindingsTracker | None = None, *, cluster: str | None = None,
                 memory_budget: int | None = None, views=None, max_jobs: int = 500, max_services: int = 200,
                 max_ranks: int = 1000) -> None:
        self.store = store
        self.views = views
        self.decoders = None  # collector.decoders.Decoders, when ingest has worker processes (create_app sets it)
        self.tracker = tracker
        self.memory_budget = memory_budget
        # With a cluster name, the findings and job summaries carry it, so several clusters' collectors
        # can feed one VictoriaMetrics and one Grafana without their series clashing.
        self.cluster = cluster
        self._c = ["cluster"] if cluster else []
        self._cv = [cluster] if cluster else []
        self._lock = threading.Lock()
        self.events: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.decoded: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()
        self.max_jobs, self.max_services, self.max_ranks = max_jobs, max_services, max_ranks
        self._badput: dict[tuple[str, str], float] = {}  # the last value exported: a counter never goes down
        self._goodput_cache: tuple[float, dict] = (float("-inf"), {})
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def ingested(self, batch: Batch | Prepared, duplicate: bool, counts: dict[str, int] | None, worker: bool = False) -> None:
        """Count an acknowledged batch with its records applied by kind (None for a duplicate); `worker`: its frames
        were built by an ingest worker process (collector.decoders)."""
        with self._lock:
            self.batches["duplicate" if duplicate else "applied"] += 1
            if not duplicate:
                self.decoded["worker" if worker else "collector"] += 1
            if not duplicate and counts:
                for kind, n in counts.items():
                    self.events[kind] += n

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1

    def refused(self, counts: dict[tuple[str, str], int]) -> None:
        """Count records refused one by one (collector.bounds), by (kind, reason)."""
        with self._lock:
            self.refusals.update(counts)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            events, batches, rejections = dict(self.events), dict(self.batches), dict(self.rejections)
            decoded = dict(self.decoded)
            refusals = dict(self.refusals)
        m = CounterMetricFamily("fleetscope_collector_events_ingested", "Records applied, by kind.", labels=["kind"])
        for kind in ("step", "request", "pause", "host_frame"):
            m.add_metric([kind], events.get(kind, 0))
        yield m
        m = CounterMetricFamily("fleetscope_collector_batches", "Batches acknowledged, applied or recognised as duplicates.", labels=["outcome"])
        for outcome in ("applied", "duplicate"):
            m.add_metric([outcome], batches.get(outcome, 0))
        yield m
        m = CounterMetricFamily("fleetscope_collector_batches_decoded", "Batches applied, by where they were decoded and "
                                "made into frames: by an ingest worker process, or in the collector's own (no workers, "
                                "workers starting or replaced, or a record that the input bounds or the identity check "
                                "must look at).", labels=["where"])
        for where in ("worker", "collector"):
            m.add_metric([where], decoded.get(where, 0))
        yield m
        m = CounterMetricFamily("fleetscope_collector_ingest_rejected", "Ingest requests refused, by reason (identity: a "
                                "batch for another node than the one that authenticated; seq_jump: a sequence number far "
                                "above the agent's own; backlog: a flood while the hot tier's upkeep catches up, the "
                                "batch to be sent again).", labels=["reason"])
        for reason in ("malformed", "too_deep", "schema", "too_large", "storage", "unavailable", "backlog", "identity",
                       "seq_jump"):
            m.add_metric([reason], rejections.get(reason, 0))
        yield m
        m = CounterMetricFamily("fleetscope_collector_events_refused",
                                "Records left out of acknowledged batches by the input bounds: dated too far ahead (future), "
                                "older than retention (too_old), or a step number that jumps (step_jump).",
                                labels=["kind", "reason"])
        for kind in RECORD_KINDS:
            for reason in REASONS:
                if reason != "step_jump" or kind == "step":
                    m.add_metric([kind, reason], refusals.get((kind, reason), 0))
        yield m
        yield from self._storage()
        omitted: dict[str, int] = {}
        found = self.tracker.findings() if self.tracker is not None else []  # sorted under the tracker's lock: once
        troubled = self._troubled(found)
        jobs = jobs_now(self.store, self.views)
        keep = self._keep_jobs(jobs, troubled[0], omitted)
        yield from self._training(jobs, keep)
        yield from self._goodput(keep)
        yield from self._inference(troubled[2], omitted)
        yield from self._findings(found, keep, troubled[1], omitted)
        m = GaugeMetricFamily("fleetscope_collector_metrics_omitted",
                              "Jobs, services (per model) and ranks left out of this exposition by the collector's limits "
                              "(metrics_max_jobs, _services, _ranks): the most troubled, then the most recent, are kept.",
                              labels=["kind"])
        for kind in ("job", "service", "rank"):
            m.add_metric([kind], omitted.get(kind, 0))
        yield m

    def _troubled(self, found: list) -> tuple[dict[str, int], set[tuple[str, int]], set[str]]:
        """From the active findings: job -> 0 (paging) or 1 (ticket), the (job, rank)s and the services named."""
        jobs: dict[str, int] = {}
        ranks: set[tuple[str, int]] = set()
        services: set[str] = set()
        for f in found:
            if not f.active:
                continue
            job = f.subject.get("job")
            if job is not None:
                jobs[job] = min(jobs.get(job, 1), 0 if f.severity == "page" else 1)
                if f.subject.get("rank") is not None:
                    ranks.add((job, int(f.subject["rank"])))
            if f.subject.get("service") is not None:
                services.add(f.subject["service"])
        return jobs, ranks, services

    def _keep_jobs(self, jobs: pl.DataFrame, troubled: dict[str, int], omitted: dict[str, int]) -> set[str]:
        """The jobs this exposition shows: those with findings (paging ones first), then the latest to report."""
        last: dict[str, float] = {}
        signals = self.tracker.signals if self.tracker is not None else None
        if signals is not None:
            for job, ts in signals.progress.select(pl.col("job").cast(pl.String), "last_progress_ts").iter_rows():
                last[job] = ts or 0.0
            for frame in (signals.scores, signals.changes):
                for job in frame["job"].cast(pl.String).to_list():
                    last.setdefault(job, 0.0)
        for job, ts in jobs.select(pl.col("job").cast(pl.String), "last_report_ts").iter_rows():
            last[job] = max(last.get(job, 0.0), ts or 0.0)
        for job in troubled:
            last.setdefault(job, 0.0)
        if len(last) <= self.max_jobs:
            return set(last)
        ranked = sorted(last, key=lambda j: (troubled.get(j, 2), -last[j], j))
        omitted["job"] = len(ranked) - self.max_jobs
        return set(ranked[:self.max_jobs])

    def _storage(self) -> Iterable[Metric]:
        store = self.store
        memory = GaugeMetricFamily("fleetscope_collector_memory_bytes",
                                   "Bytes the collector holds in memory, by table (hot tier, rows waiting for a checkpoint, the goodput ledger's unsettled steps).",
                                   labels=["table"])
        if store.ready:
            for table, size in store.hot.memory().items():
                memory.add_metric([table], size)
        memory.add_metric(["unwritten"], store.unwritten_bytes())
        memory.add_metric(["goodput_unsettled"], store.goodput.memory())  # the ledger's steps of the last SETTLE_S
        yield memory
        early = CounterMetricFamily("fleetscope_collector_goodput_settled_early_steps",
                                    "Training steps the goodput ledger settled before their settle time, to keep its "
                                    "unsettled steps within their share of the memory budget.")
        early.add_metric([], store.goodput.settled_early)
        yield early
        rows = GaugeMetricFamily("fleetscope_collector_hot_rows", "Rows in the hot tier, by table.", labels=["table"])
        held = GaugeMetricFamily("fleetscope_collector_hot_held_seconds",
                                 "How far back the hot tier holds each table completely (older reads go to the warm tier).",
                                 labels=["table"])
        if store.ready:
            now = time.time()
            for table, n in store.hot.rows().items():
                rows.add_metric([table], n)
            for table, since in store.hot.held_since.items():
                if since is not None:
                    held.add_metric([table], max(0.0, now - since))
        yield from (rows, held)
        yield GaugeMetricFamily("fleetscope_collector_hot_steps_per_rank",
                                "Raw steps the hot tier keeps of each rank: raw_steps, fewer when they would take more "
                                "than their share of the memory budget.", value=store.hot.steps_per_rank)
        if self.memory_budget:
            yield GaugeMetricFamily("fleetscope_collector_memory_budget_bytes", "The memory budget the collector keeps within.",
                                    value=self.memory_budget)
        if store.governor is not None:
            yield GaugeMetricFamily("fleetscope_collector_hot_budget_bytes",
                                    "The hot tier's share of the memory budget now: a third, less while the process's "
                                    "resident memory runs near the budget.", value=store.hot.budget_bytes)
            yield GaugeMetricFamily("fleetscope_collector_resident_memory_high_bytes",
                                    "The highest resident memory of the collector and its ingest workers over the last "
                                    "upkeep pass, which sets the hot tier's budget.", value=store.governor.last_high)
            yield GaugeMetricFamily("fleetscope_collector_resident_memory_peak_bytes",
                                    "The highest resident memory of the collector and its ingest workers at any upkeep "
                                    "pass since it started (the kernel's peak is reset at each pass).", value=store.governor.peak)
        workers = self.decoders.pids() if self.decoders is not None else ()
        yield GaugeMetricFamily("fleetscope_collector_resident_memory_bytes", "Resident memory of the collector process "
                                "and its ingest worker processes.", value=rss() + sum(rss(pid) for pid in workers))
        yield GaugeMetricFamily("fleetscope_collector_ready", "1 once the store has replayed its log and serves.",
                                value=1 if store.ready else 0)
        yield GaugeMetricFamily("fleetscope_collector_storage_writable",
                                "0 while the store cannot write (disk full, failing checkpoints): ingest answers 503.",
                                value=0 if store.problem else 1)
        yield GaugeMetricFamily("fleetscope_collector_last_checkpoint_timestamp_seconds",
                                "Unix time of the last checkpoint committed (rows moved from the write-ahead log to "
                                "Parquet); the store's start while it has made none.", value=store.last_checkpoint_ts)
        yield GaugeMetricFamily("fleetscope_collector_wal_bytes", "Bytes in the write-ahead log not yet checkpointed.",
                                value=store.wal.size_bytes() if store.ready else 0)
        yield GaugeMetricFamily("fleetscope_collector_hot_maintenance_seconds", "Duration of the last hot-tier upkeep pass.",
                                value=store.hot.maintenance_s)

    def _keep_ranks(self, scores: pl.DataFrame, jobs: set[str], troubled: set[tuple[str, int]],
                    omitted: dict[str, int]) -> pl.DataFrame:
        """The straggler-score rows this exposition shows: ranks with findings, then the highest scores."""
        scores = scores.filter(pl.col("straggler_score").is_not_null())
        total = scores.height
        scores = scores.filter(pl.col("job").cast(pl.String).is_in(list(jobs)))
        if scores.height > self.max_ranks:
            flagged = pl.DataFrame(list(troubled), schema={"job": pl.String, "rank": scores.schema["rank"]}, orient="row")
            scores = (scores.with_columns(pl.col("job").cast(pl.String))
                      .join(flagged.with_columns(pl.lit(True).alias("_troubled")), on=["job", "rank"], how="left",
                            coalesce=True)
                      .sort([pl.col("_troubled").fill_null(False), "straggler_score"], descending=[True, True])
                      .head(self.max_ranks).drop("_troubled"))
        if total > scores.height:
            omitted["rank"] = total - scores.height
        return scores

    def _findings(self, found: list, jobs: set[str], troubled_ranks: set[tuple[str, int]],
                  omitted: dict[str, int]) -> Iterable[Metric]:
        if self.tracker is None:
            return
        signals = self.tracker.signals
        shown = self._keep_ranks(signals.scores, jobs, troubled_ranks, omitted) if signals is not None else None
        shown_ranks = set(shown.select(pl.col("job").cast(pl.String), "rank").iter_rows()) if shown is not None else set()
        labels = ["kind", "severity", "training_job", "rank", "node", "service"]
        active = GaugeMetricFamily("fleetscope_finding_active", "1 for each finding active now (see GET /v1/findings).",
                                   labels=labels + self._c)
        for f in found:
            job, rank = f.subject.get("job"), f.subject.get("rank")
            if job is not None and (job not in jobs or (rank is not None and (job, int(rank)) not in shown_ranks)):
                continue  # past the limits: GET /v1/findings lists it
            if f.active:
                subject = {"training_job": f.subject.get("job", ""), **{k: v for k, v in f.subject.items() if k != "job"}}
                active.add_metric([f.kind, f.severity, *(str(subject.get(k, "")) for k in labels[2:]), *self._cv], 1)
        yield active
        burn = GaugeMetricFamily("fleetscope_slo_burn_rate",
                                 "Share of bad requests in the window over the error budget (1 spends it exactly in the SLO window).",
                                 labels=["slo", "service", "window"] + self._c)
        budget = GaugeMetricFamily("fleetscope_slo_error_budget_remaining_ratio",
                                   "Error budget left over the SLO's window (1 untouched, 0 spent, below 0 overspent).",
                                   labels=["slo", "service"] + self._c)
        objective = GaugeMetricFamily("fleetscope_slo_objective", "The SLO's objective (0.99 for 99%).", labels=["slo", "service"] + self._c)
        for r in self.tracker.slo_report:
            for window, rate in r["burn_rate"].items():
                burn.add_metric([r["slo"], r["service"], window, *self._cv], rate)
            budget.add_metric([r["slo"], r["service"], *self._cv], r["error_budget_remaining_ratio"])
            objective.add_metric([r["slo"], r["service"], *self._cv], r["objective"])
        yield from (burn, budget, objective)
        if signals is None or shown is None:
            return
        score = GaugeMetricFamily("fleetscope_training_straggler_score",
                                  "How much longer the rank computes than its stage's median, over the last 20 steps (0.1 = 10%).",
                                  labels=["training_job", "rank", "node"] + self._c)
        for row in shown.iter_rows(named=True):
            score.add_metric([row["job"], str(row["rank"]), row["node"] or "", *self._cv], row["straggler_score"])
        age = GaugeMetricFamily("fleetscope_training_last_progress_age_seconds", "Seconds since any rank of the job finished a step.",
                                labels=["training_job"] + self._c)
        allowed = GaugeMetricFamily("fleetscope_training_hang_threshold_seconds",
                                    "Silence after which the job counts as hung: max(3 x median step, 30 s).", labels=["training_job"] + self._c)
        paused = GaugeMetricFamily("fleetscope_training_paused", "1 while a rank of the job declares a pause.", labels=["training_job"] + self._c)
        for row in signals.progress.iter_rows(named=True):
            if row["job"] not in jobs:
                continue
            age.add_metric([row["job"], *self._cv], row["silence_s"])
            allowed.add_metric([row["job"], *self._cv], row["hang_after_s"])
            paused.add_metric([row["job"], *self._cv], 1 if row["paused"] else 0)
        change = GaugeMetricFamily("fleetscope_training_step_time_change_ratio",
                                   "Median step time of the last 150 steps against 400 steps before them (0.03 = 3% slower).",
                                   labels=["training_job"] + self._c)
        for row in signals.changes.iter_rows(named=True):
            if row["job"] not in jobs:
                continue
            change.add_metric([row["job"], *self._cv], row["change_ratio"])
        yield from (score, age, allowed, paused, change)

    def _training(self, jobs: pl.DataFrame, keep: set[str]) -> Iterable[Metric]:
        last = GaugeMetricFamily("fleetscope_training_last_step", "Highest step number any rank of the job reported.", labels=["training_job"] + self._c)
        seen = GaugeMetricFamily("fleetscope_training_last_report_timestamp_seconds", "Unix time the job's last step ended.", labels=["training_job"] + self._c)
        p50 = GaugeMetricFamily("fleetscope_training_step_time_p50_seconds", "Median step time of the job over the collector's window.", labels=["training_job"] + self._c)
        tps = GaugeMetricFamily("fleetscope_training_tokens_per_second", "Tokens the job's ranks process per second, together.",
                                labels=["training_job"] + self._c)
        mfu = GaugeMetricFamily("fleetscope_training_mfu_ratio",
                                "Model FLOPs utilisation: achieved FLOP/s over the GPUs' dense BF16 peak (0-1).", labels=["training_job"] + self._c)
        for row in jobs.iter_rows(named=True):
            if row["job"] not in keep:
                continue
            if row["tokens_per_s"] is not None:
                tps.add_metric([row["job"], *self._cv], row["tokens_per_s"])
            if row["mfu"] is not None:
                mfu.add_metric([row["job"], *self._cv], row["mfu"])
            last.add_metric([row["job"], *self._cv], row["last_step"])
            seen.add_metric([row["job"], *self._cv], row["last_report_ts"])
            p50.add_metric([row["job"], *self._cv], row["step_time_p50_s"])
        yield from (last, seen, p50, tps, mfu)

    def _goodput(self, keep: set[str]) -> Iterable[Metric]:
        """Each shown job's goodput over its whole life (collector.goodput), shared for an analysis interval."""
        ratio = GaugeMetricFamily("fleetscope_training_goodput_ratio",
                                  "Productive GPU time over all the GPU time of the job's life, across its restarts (0-1).",
                                  labels=["training_job"] + self._c)
        badput = CounterMetricFamily("fleetscope_training_badput_seconds",
                                     "GPU seconds of the job's life that were not productive, by reason: recomputed, checkpoint, "
                                     "startup, hang, pause, data_stall, straggler_wait.", labels=["training_job", "reason"] + self._c)
        # A job's goodput moves slowly and costs a few ms to 0.1 s to read (collector.goodput): computed at most
        # every GOODPUT_EVERY_S for the jobs shown then, not at every scrape.
        now = time.monotonic()
        reports = self._goodput_cache[1]
        if now - self._goodput_cache[0] >= GOODPUT_EVERY_S or not keep <= reports.keys():
            reports = {job: self.store.goodput.report(job) for job in keep}
            self._goodput_cache = (now, reports)
        seen = {}
        for job in sorted(keep):
            report = reports.get(job)
            if report is None:
                continue
            if report.goodput_ratio is not None:
                ratio.add_metric([job, *self._cv], report.goodput_ratio)
            for reason in BADPUT:
                # A second can move between reasons as rows come late (a restore makes earlier steps recomputed):
                # the exported counter holds its highest value until the ledger's catches up.
                value = max(report.seconds[reason], self._badput.get((job, reason), 0.0))
                seen[(job, reason)] = value
                badput.add_metric([job, reason, *self._cv], value)
        with self._lock:
            self._badput = seen
        yield from (ratio, badput)

    def _inference(self, troubled: set[str], omitted: dict[str, int]) -> Iterable[Metric]:
        """Each service and model over the last RECENT_S, from the client's request events where it has any in the
        window (source="client"), else from its servers' histogram and counter deltas (source="server"): one
        source per (service, model), so summing over `source` never counts a request twice."""
        rows = recent_inference(self.store.frame("requests"), self.store.frame("server_stats"),
                                self.store.frame("server_histograms"), time.time() - RECENT_S, RECENT_S)
        if len(rows) > self.max_services:
            # The services with findings (a burning SLO), then the most failing, then the latest to serve.
            omitted["service"] = len(rows) - self.max_services
            rows = sorted(rows, key=lambda r: (r["service"] in troubled, r["error_ratio"] or 0.0, r["last_ts"] or 0.0),
                          reverse=True)[:self.max_services]
        labels = ["service", "model", "source"] + self._c
        families = {
            "error_ratio": GaugeMetricFamily("fleetscope_inference_error_ratio",
                                             "Share of requests that failed over the last 5 minutes (aborted ones too).", labels=labels),
            "requests_per_s": GaugeMetricFamily("fleetscope_inference_requests_per_second",
                                                "Requests finished per second over the last 5 minutes.", labels=labels),
            "output_tokens_per_s": GaugeMetricFamily("fleetscope_inference_output_tokens_per_second",
                                                     "Output tokens generated per second over the last 5 minutes.", labels=labels),
        }
        for what, name in (("e2e", "end-to-end latency"), ("ttft", "time to first token"), ("tpot", "time per output token")):
            for q in ("p50", "p95", "p99"):
                families[f"{what}_{q}_s"] = GaugeMetricFamily(
                    f"fleetscope_inference_{what}_{q}_seconds",
                    f"{q[1:]}th percentile {name} over the last 5 minutes (source=\"server\": interpolated within the "
                    "server's histogram buckets).", labels=labels)
        for row in rows:
            values = [row["service"], row["model"], row["source"], *self._cv]
            for key, family in families.items():
                if row.get(key) is not None:
                    family.add_metric(values, row[key])
        yield from families.values()
