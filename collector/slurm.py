"""Which Slurm jobs ran each training job: one per incarnation (a new sbatch of the same job name is a new
Slurm job id; a requeue keeps the id and counts SLURM_RESTART_COUNT up; each srun is a new step). And which
Slurm jobs served each inference service (a vLLM server started by sbatch), from its request rows.

A store observer of step and request rows (their `slurm` column: the Slurm ids the client or the agent put on
the event, fleetscope.schema.SlurmIds, as JSON) and a `Persisted` (snapshotted with each checkpoint), like the
goodput ledger, so the links cover a job's whole life and survive a collector restart. The goodput API pairs
them with its incarnations by time (`incarnations_of`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import polars as pl

from collector.snapshots import JsonSnapshot
from collector.tables import JsonCells

MAX_LINKS = 256  # Slurm jobs kept per training job: the newest
MAX_NODES = 1024  # nodes named per link (the count goes on)
MAX_RANKS = 1 << 20
_IDS = ("user", "partition", "array_job", "array_task", "name")


@dataclass
class _Link:
    slurm_job: str
    restart_count: int
    first_ts: float
    last_ts: float
    ids: dict = field(default_factory=dict)  # user, partition, array_job, array_task, name
    steps: set = field(default_factory=set)  # Slurm step ids (srun launches)
    nodes: set = field(default_factory=set)
    ranks: set = field(default_factory=set)


# The rows each kind of table links: (the name they are linked to, its rank column or None, the seconds a row lasts)
_KINDS = {"steps": ("job", "rank", "duration_s"), "requests": ("service", None, "e2e_s")}


class SlurmLinks:
    """Per training job, the Slurm jobs whose processes reported its steps, and per inference service, those whose
    processes reported its requests (see the module docstring)."""

    def __init__(self, retention_s: float | None = None) -> None:
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[tuple[str, int], _Link]] = {}
        self._services: dict[str, dict[tuple[str, int], _Link]] = {}
        self._ids = JsonCells("job")  # the column's JSON text -> its ids (a few per job)

    def observe(self, kind: str, frame: pl.DataFrame) -> None:
        """A store observer: see each new step and request row once (ingest and WAL replay)."""
        if kind not in _KINDS or "slurm" not in frame.columns or frame.height == 0:
            return
        slurm = frame.get_column("slurm")
        if slurm.null_count() == frame.height:  # not a Slurm job: the usual case costs this much
            return
        name_column, rank_column, seconds_column = _KINDS[kind]
        n = frame.height
        columns = [frame.get_column(c).to_list() if c is not None else [None] * n
                   for c in (name_column, "slurm", "node", rank_column, "ts", seconds_column)]
        # Plain lists (a batch holds a few rows; expressions cost more there), folded per (name, ids) first.
        folded: dict[tuple[str, str], list] = {}
        for name, text, node, rank, ts, duration in zip(*columns):
            if text is None:
                continue
            acc = folded.get((name, text))
            end = ts + (duration or 0.0)
            if acc is None:
                folded[(name, text)] = [ts, end, {node}, {rank} if rank is not None else set()]
                continue
            acc[0], acc[1] = min(acc[0], ts), max(acc[1], end)
            acc[2].add(node)
            if rank is not None:
                acc[3].add(rank)
        table = self._jobs if kind == "steps" else self._services
        with self._lock:
            for (name, text), (ts, end, nodes, ranks) in folded.items():
                ids = self._ids(text)
                if ids is None:
                    continue
                self._add(table.setdefault(name, {}), ids, ts, end, nodes, ranks)

    def _add(self, links: dict[tuple[str, int], _Link], ids: dict, ts: float, end: float, nodes: set, ranks: set) -> None:
        key = (ids["job"], int(ids.get("restart_count") or 0))
        link = links.get(key)
        if link is None:
            link = links[key] = _Link(key[0], key[1], ts, end)
            if len(links) > MAX_LINKS:
                del links[min(links, key=lambda k: links[k].last_ts)]
        link.first_ts, link.last_ts = min(link.first_ts, ts), max(link.last_ts, end)
        for name in _IDS:
            if ids.get(name) is not None:
                link.ids[name] = ids[name]
        if ids.get("step") is not None:
            link.steps.add(str(ids["step"]))
        if len(link.nodes) < MAX_NODES:
            link.nodes |= {n for n in nodes if n is not None}
        if len(link.ranks) < MAX_RANKS:
            link.ranks |= ranks

    # --- reads ------------------------------------------------------------------------------------
    def links(self, job: str) -> list[dict]:
        """The job's Slurm jobs, oldest first."""
        with self._lock:
            links = sorted(self._jobs.get(job, {}).values(), key=lambda link: (link.first_ts, link.slurm_job))
            return [_row(link) for link in links]

    def service_links(self, service: str) -> list[dict]:
        """The Slurm jobs whose processes served the inference service's requests, oldest first."""
        with self._lock:
            links = sorted(self._services.get(service, {}).values(), key=lambda link: (link.first_ts, link.slurm_job))
            return [_row(link, "request") for link in links]

    def summary(self, job: str) -> dict:
        """What a list of jobs shows: every Slurm job id (oldest first), and the newest one's user and partition."""
        links = self.links(job)
        latest = links[-1] if links else {}
        return {"slurm_job_ids": [link["slurm_job"] for link in links], "slurm_job": latest.get("slurm_job"),
                "slurm_user": latest.get("user"), "slurm_partition": latest.get("partition")}

    def incarnations_of(self, job: str, incarnations: list[dict]) -> list[list[str]]:
        """For each of the job's incarnations (first_step_ts, last_step_end_ts), the Slurm jobs whose steps
        overlap it in time."""
        links = self.links(job)
        return [[link["slurm_job"] for link in links
                 if link["first_step_ts"] <= inc["last_step_end_ts"] and link["last_step_end_ts"] >= inc["first_step_ts"]]
                for inc in incarnations]

    # --- checkpoint -------------------------------------------------------------------------------
    def snapshot(self) -> JsonSnapshot:
        """For the store's checkpoint: each link's fields copied now (links change in place), encoded when the
        checkpoint writes them, off the store's gate."""
        now = time.time()
        with self._lock:
            if self.retention_s is not None:
                for table in (self._jobs, self._services):
                    for name in [n for n, links in table.items()
                                 if max(link.last_ts for link in links.values()) < now - self.retention_s]:
                        del table[name]
            doc = {"v": 2, **{key: {name: [_dump(link) for link in links.values()] for name, links in table.items()}
                              for key, table in (("jobs", self._jobs), ("services", self._services))}}
        return JsonSnapshot(lambda: doc)

    def restore(self, data: bytes | JsonSnapshot) -> None:
        saved = json.loads(bytes(data))
        # Before services were linked, the snapshot was the jobs' map itself (a job's value is a list, never 2).
        jobs, services = (saved["jobs"], saved["services"]) if saved.get("v") == 2 else (saved, {})
        with self._lock:
            self._jobs, self._services = (
                {name: {(d["slurm_job"], d["restart_count"]): _load(d) for d in links} for name, links in table.items()}
                for table in (jobs, services))


def _row(link: _Link, rows: str = "step") -> dict:
    """A link as the API shows it: a training job's (rows "step": its steps' times and ranks) or a service's
    (rows "request": its requests' times)."""
    out = {"slurm_job": link.slurm_job, "restart_count": link.restart_count,
           **{name: link.ids.get(name) for name in _IDS},
           "steps": sorted(link.steps, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)),
           f"first_{rows}_ts": link.first_ts, f"last_{rows}_end_ts": link.last_ts, "nodes": sorted(link.nodes)}
    if rows == "step":
        out["ranks"] = len(link.ranks)
    return out


def _dump(link: _Link) -> dict:
    return {"slurm_job": link.slurm_job, "restart_count": link.restart_count, "first_ts": link.first_ts,
            "last_ts": link.last_ts, "ids": link.ids, "steps": sorted(link.steps), "nodes": sorted(link.nodes),
            "ranks": sorted(link.ranks)}


def _load(d: dict) -> _Link:
    return _Link(d["slurm_job"], d["restart_count"], d["first_ts"], d["last_ts"], dict(d["ids"]), set(d["steps"]),
                 set(d["nodes"]), set(d["ranks"]))
