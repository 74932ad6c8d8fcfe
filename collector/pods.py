"""Which Kubernetes pod ran each rank of a training job and each replica of an inference service.

A store observer of step and request rows (their `pod` column: the pod the agent read for the sender, or the
client's own description, fleetscope.schema.PodIds, as JSON) and a `Persisted` (snapshotted with each checkpoint),
like collector/slurm.py. Only the latest pod of each rank, and each replica (node, namespace, pod) of a service,
is kept, and none of it becomes a label of the collector's /metrics: a pod name is one per restart, so the API
and the console show it, and Prometheus gets it from the agent's fleetscope_gpu_pod_info where it needs to join.
"""

from __future__ import annotations

import json
import threading
import time

import polars as pl

from collector.snapshots import JsonSnapshot
from collector.tables import JsonCells

MAX_RANKS = 1 << 20  # ranks remembered per job
MAX_REPLICAS = 4096  # replicas remembered per service: the most recent
MAX_MODELS = 64


class PodLinks:
    """Per training job and rank, and per inference service replica, the pod that reported it (module docstring)."""

    def __init__(self, retention_s: float | None = None) -> None:
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._ranks: dict[str, dict[int, list]] = {}  # job -> rank -> [pod JSON, node, last ts]
        # service -> (node, namespace, pod) -> [container, verified, first ts, last ts, requests, models]
        self._replicas: dict[str, dict[tuple, list]] = {}
        self._ids = JsonCells("namespace", "pod")

    def observe(self, kind: str, frame: pl.DataFrame) -> None:
        """A store observer: see each new step and request row once (ingest and WAL replay)."""
        if kind not in ("steps", "requests") or "pod" not in frame.columns or frame.height == 0:
            return
        pods = frame.get_column("pod")
        if pods.null_count() == frame.height:  # not on Kubernetes: the usual case costs this much
            return
        if kind == "steps":
            self._observe_steps(frame)
        else:
            self._observe_requests(frame)

    def _observe_steps(self, frame: pl.DataFrame) -> None:
        latest: dict[tuple[str, int], list] = {}
        for job, rank, text, node, ts in zip(*(frame.get_column(c).to_list() for c in ("job", "rank", "pod", "node", "ts"))):
            if text is None:
                continue
            seen = latest.get((job, rank))
            if seen is None or ts >= seen[2]:
                latest[(job, rank)] = [text, node, ts]
        with self._lock:
            for (job, rank), entry in latest.items():
                ranks = self._ranks.setdefault(job, {})
                known = ranks.get(rank)
                if known is None and len(ranks) >= MAX_RANKS:
                    continue
                if known is None or entry[2] >= known[2]:
                    ranks[rank] = entry

    def _observe_requests(self, frame: pl.DataFrame) -> None:
        columns = (frame.get_column(c).to_list() for c in ("service", "model", "pod", "node", "ts"))
        folded: dict[tuple, list] = {}
        for service, model, text, node, ts in zip(*columns):
            if text is None:
                continue
            acc = folded.get((service, text, node))
            if acc is None:
                folded[(service, text, node)] = [ts, ts, 1, {model}]
            else:
                acc[0], acc[1] = min(acc[0], ts), max(acc[1], ts)
                acc[2] += 1
                acc[3].add(model)
        with self._lock:
            for (service, text, node), (first, last, count, models) in folded.items():
                ids = self._ids(text)
                if ids is None:
                    continue
                replicas = self._replicas.setdefault(service, {})
                key = (node, ids["namespace"], ids["pod"])
                replica = replicas.get(key)
                if replica is None:
                    replica = replicas[key] = [ids.get("container"), bool(ids.get("verified")), first, last, 0, set()]
                    if len(replicas) > MAX_REPLICAS:
                        del replicas[min(replicas, key=lambda k: replicas[k][3])]
                # a verified reading wins over a claim; the newest of each kind otherwise
                if ids.get("verified") or not replica[1]:
                    replica[0] = ids.get("container") or replica[0]
                    replica[1] = replica[1] or bool(ids.get("verified"))
                replica[2], replica[3] = min(replica[2], first), max(replica[3], last)
                replica[4] += count
                if len(replica[5]) < MAX_MODELS:
                    replica[5] |= models

    # --- reads ------------------------------------------------------------------------------------
    def ranks(self, job: str, ranks: list[int] | None = None) -> list[dict]:
        """The latest pod of each of the job's ranks (of `ranks` only, when given), by rank."""
        with self._lock:
            known = self._ranks.get(job, {})
            chosen = sorted(known) if ranks is None else sorted(r for r in set(ranks) if r in known)
            entries = [(rank, known[rank]) for rank in chosen]
        out = []
        for rank, (text, node, ts) in entries:
            ids = self._ids(text)
            if ids is not None:
                out.append({"rank": rank, "namespace": ids["namespace"], "pod": ids["pod"],
                            "container": ids.get("container"), "verified": bool(ids.get("verified")), "node": node,
                            "last_step_ts": ts})
        return out

    def replicas(self, service: str) -> list[dict]:
        """The service's replicas (node, namespace, pod), most recent request first."""
        with self._lock:
            items = sorted(self._replicas.get(service, {}).items(), key=lambda kv: -kv[1][3])
            return [{"node": node, "namespace": namespace, "pod": pod, "container": r[0], "verified": r[1],
                     "models": sorted(r[5]), "requests": r[4], "first_request_ts": r[2], "last_request_ts": r[3]}
                    for (node, namespace, pod), r in items]

    # --- checkpoint -------------------------------------------------------------------------------
    def snapshot(self) -> JsonSnapshot:
        """For the store's checkpoint: copied now (a rank's entry is replaced, never changed in place; each
        replica's list is copied), encoded when the checkpoint writes it, off the store's gate."""
        cutoff = time.time() - self.retention_s if self.retention_s is not None else None
        with self._lock:
            if cutoff is not None:
                for job in [j for j, ranks in self._ranks.items() if max(e[2] for e in ranks.values()) < cutoff]:
                    del self._ranks[job]
                for service in [s for s, reps in self._replicas.items() if max(r[3] for r in reps.values()) < cutoff]:
                    del self._replicas[service]
            ranks = {job: ranks.copy() for job, ranks in self._ranks.items()}
            replicas = {service: [[*key, *r[:5], sorted(r[5])] for key, r in reps.items()]
                        for service, reps in self._replicas.items()}
        return JsonSnapshot(lambda: {
            "ranks": {job: [[rank, *entry] for rank, entry in entries.items()] for job, entries in ranks.items()},
            "replicas": replicas,
        })

    def restore(self, data: bytes | JsonSnapshot) -> None:
        saved = json.loads(bytes(data))
        with self._lock:
            self._ranks = {job: {row[0]: list(row[1:]) for row in rows} for job, rows in saved.get("ranks", {}).items()}
            self._replicas = {service: {tuple(row[:3]): [*row[3:8], set(row[8])] for row in rows}
                              for service, rows in saved.get("replicas", {}).items()}
