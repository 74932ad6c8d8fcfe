"""Findings: what holds work back, each with its subject, severity, start, evidence and probable causes.

`analyse` is pure: it takes the store's frames and the time and returns the findings active now.
`FindingsTracker` keeps them over time: when each started, and the ones resolved recently.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import polars as pl

from collector.attribution import SampleSource, probable_causes
from collector.rollups import step_aggregates
from collector.training import (kept, REGRESSION_THRESHOLD, STRAGGLER_PAGE_SHARE, node_scores, progress, rising_nodes, slow_nodes,
                                step_time_change, straggler_scores, stragglers)

RECENT_S = 3600.0  # resolved findings stay listed this long


@dataclass
class Finding:
    kind: str  # straggler | slow_node | hang | stopped | regression
    severity: str  # page | ticket
    subject: dict
    start_ts: float
    evidence: dict
    causes: list[dict] = field(default_factory=list)
    active: bool = True
    resolved_ts: float | None = None

    @property
    def key(self) -> tuple:
        return (self.kind, tuple(sorted(self.subject.items())))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "subject": self.subject, "start_ts": self.start_ts,
                "active": self.active, "resolved_ts": self.resolved_ts, "evidence": self.evidence,
                "probable_causes": self.causes}


ANALYSED_STEPS = 600  # each job's last steps: all that the detectors look at
# ... and their columns (not the free-form phases and metrics, the agent, Slurm and pod labels).
ANALYSED_COLUMNS = frozenset({"ts", "job", "rank", "local_rank", "world_size", "step", "stage", "duration_s", "failed",
                              "process_start_ts", "restored_step", "incarnation", "phase_data_s", "phase_forward_s",
                              "phase_backward_s", "phase_optimizer_s", "phase_comm_s", "sync_arrival_s", "node",
                              "gpu_uuid", "pid", "tokens", "samples", "flops_per_token"})


@dataclass
class Signals:
    """The numbers behind the findings, for the collector's /metrics."""

    scores: pl.DataFrame
    progress: pl.DataFrame
    changes: pl.DataFrame


def _severity(share: float, page_share: float) -> str:
    """A slow rank or node pages when the job loses at least `page_share` of its throughput to it; else a ticket."""
    return "page" if share >= page_share else "ticket"


def analyse(steps: pl.DataFrame, pauses: pl.DataFrame, now: float, *, samples: SampleSource,
            aggs: pl.DataFrame | None = None, page_share: float = STRAGGLER_PAGE_SHARE) -> tuple[list[Finding], Signals | None]:
    """Findings from each rank's recent steps, the per-step aggregates of each job (computed from
    `steps` when not given) and the GPU and host samples that `samples` serves for attribution.
    A straggler or slow node pages only when its peers wait at least `page_share` of each step for it."""
    out: list[Finding] = []
    if steps.height == 0:
        return out, None
    # The columns the detectors read, as a view (a select shares the table's columns): every filter and sort below
    # then copies these only, not the whole table (at 16,384 ranks each copy of it was 375 MB of the peak).
    steps = kept(steps.select(c for c in steps.columns if c in ANALYSED_COLUMNS),
                 pl.col("step") > pl.col("step").max().over("job") - ANALYSED_STEPS)
    if aggs is None:
        aggs = step_aggregates(steps)
    prog = progress(steps, pauses, now)
    silent = set(prog.filter(pl.col("hung") | pl.col("stopped"))["job"].to_list())
    for row in prog.filter(pl.col("hung")).iter_rows(named=True):
        out.append(Finding("hang", "page", {"job": row["job"]}, row["last_progress_ts"], {
            "silence_s": round(row["silence_s"], 1), "hang_after_s": round(row["hang_after_s"], 1),
            "last_step": row["last_step"], "ranks_that_reported_last": row["last_reporters"],
            "ranks_that_stopped_first": row["first_stopped"]}))
    for row in prog.filter(pl.col("stopped")).iter_rows(named=True):
        out.append(Finding("stopped", "ticket", {"job": row["job"]}, row["last_progress_ts"], {
            "silence_s": round(row["silence_s"], 1), "last_step": row["last_step"]}))

    live = steps.filter(~pl.col("job").is_in(list(silent))) if silent else steps  # a hung job's last steps say nothing new
    scores = straggler_scores(live)
    job_peers = (live.select("job", "gpu_uuid", "node").unique()  # unique first: far fewer to cast to strings
                 .group_by(pl.col("job").cast(pl.String))
                 .agg(pl.col("gpu_uuid").drop_nulls().unique().cast(pl.String), pl.col("node").drop_nulls().unique().cast(pl.String)))
    peers = {r["job"]: (r["gpu_uuid"], r["node"]) for r in job_peers.iter_rows(named=True)}
    per_node = node_scores(scores)  # once, for both the slow nodes and the rising ones
    nodes = slow_nodes(per_node)
    slow_node_keys = {(r["job"], r["node"]) for r in nodes.iter_rows(named=True)}
    slow_node_keys |= {(r["job"], r["node"]) for r in rising_nodes(per_node).iter_rows(named=True)}
    for row in nodes.iter_rows(named=True):
        gpu_peers, node_peers = peers.get(row["job"], ([], []))
        out.append(Finding("slow_node", _severity(row["median_score"], page_share), {"job": row["job"], "node": row["node"]},
                           row["since_ts"] or now, {
            "slow_ranks": row["slow_rank_list"], "ranks_on_node": row["ranks"], "median_score": round(row["median_score"], 4),
            "threshold": round(row["threshold"], 4), "throughput_lost_share": round(row["median_score"], 4)},
            probable_causes(node=row["node"], gpu_uuid=None, peer_gpus=gpu_peers, peer_nodes=node_peers,
                            samples=samples, since=row["since_ts"] or now, until=now)))
    for row in stragglers(scores).iter_rows(named=True):
        if (row["job"], row["node"]) in slow_node_keys:
            continue  # reported once, as its node (or soon to be)
        gpu_peers, node_peers = peers.get(row["job"], ([], []))
        since = row["since_ts"] or now
        out.append(Finding("straggler", _severity(row["straggler_score"], page_share),
                           {"job": row["job"], "rank": row["rank"], "node": row["node"], "gpu_uuid": row["gpu_uuid"]}, since, {
            "straggler_score": round(row["straggler_score"], 4), "recent_score": round(row["recent_score"], 4),
            "threshold": round(row["threshold"], 4), "steps_seen": row["steps_seen"], "stage": row["stage"],
            # the others wait this long for it at every step: its share of the job's throughput
            "excess_s": round(row["excess_s"], 6), "step_s": round(row["step_s"], 6),
            "throughput_lost_share": round(row["straggler_score"], 4)},
            probable_causes(node=row["node"], gpu_uuid=row["gpu_uuid"], peer_gpus=gpu_peers, peer_nodes=node_peers,
                            samples=samples, since=since, until=now, data_vs_peers=row["data_vs_peers"])))
    changes = step_time_change(aggs.filter(~pl.col("job").is_in(list(silent))))
    for row in changes.filter(pl.col("change_ratio") >= REGRESSION_THRESHOLD).iter_rows(named=True):
        out.append(Finding("regression", "ticket", {"job": row["job"]}, row["recent_since_ts"], {
            "change_ratio": round(row["change_ratio"], 4), "recent_step_s": row["recent_s"], "baseline_step_s": row["baseline_s"]}))
    return out, Signals(scores, prog, changes)


def slo_findings(report: list[dict], now: float) -> list[Finding]:
    """An SLO burning its error budget too fast, by the SRE workbook's multiwindow rules."""
    from collector.slo import burning

    return [Finding("slo_burn", r["severity"], {"service": r["service"], "slo": r["slo"]}, now, {
        "rule": r["rule"], "burn_rate": {k: round(v, 3) for k, v in r["burn_rate"].items()},
        "objective": r["objective"], "error_budget_remaining_ratio": round(r["error_budget_remaining_ratio"], 4)})
        for r in burning(report)]


class FindingsTracker:
    """Findings over time: a finding keeps the start of its first sighting; one that disappears is resolved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple, Finding] = {}
        self.signals: Signals | None = None
        self.slo_report: list[dict] = []

    def update(self, current: list[Finding], signals: Signals | None = None, now: float | None = None,
               slo_report: list[dict] | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self.signals = signals
            self.slo_report = slo_report or []
            seen = set()
            for f in current:
                seen.add(f.key)
                old = self._by_key.get(f.key)
                if old is not None and old.active:
                    f.start_ts = min(old.start_ts, f.start_ts)
                self._by_key[f.key] = f
            for key, f in list(self._by_key.items()):
                if key not in seen and f.active:
                    f.active, f.resolved_ts = False, now
                if not f.active and f.resolved_ts is not None and f.resolved_ts < now - RECENT_S:
                    del self._by_key[key]

    def findings(self) -> list[Finding]:
        with self._lock:
            return sorted(self._by_key.values(), key=lambda f: (not f.active, -f.start_ts))
