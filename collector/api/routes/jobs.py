"""GET /v1/jobs, /v1/jobs/{job} (step-time quantiles per rank), /v1/jobs/{job}/steps (over time) and
/v1/jobs/{job}/goodput (where its GPU-hours went).

Job summaries and step series read the per-step aggregates (the hot tier's for its window, the warm
tier's before); per-rank figures read each rank's recent raw steps, which is what the hot tier keeps;
goodput reads the store's ledger (collector.goodput), which covers each job's whole life.
"""

from __future__ import annotations

import json

import polars as pl
from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from collector import goodput
from collector.api.deps import RangeDep, ReadAuth, StoreDep
from collector.api.encoding import json_response
from collector.training import (jobs_overview, rank_breakdown, rank_step_matrix, rank_step_quantiles, slowest_ranks,
                                step_series, with_mfu)
from collector.views import Views, jobs_now, roster

router = APIRouter(tags=["training"], dependencies=[ReadAuth])
MAX_RANKS = 1000  # per-rank rows in a job's answer unless asked for more: the slowest ones
MAX_CELLS = 20_000  # cells of a rank x step matrix unless asked for more


def _aggs(store, r, job: str | None = None) -> pl.DataFrame:
    """Per-step aggregates whose step ended in the range (default: the hot tier's window)."""
    if r.since is None and r.until is None:
        aggs = store.hot.step_aggs()
    else:
        since, until = r.resolve(store.window_s)
        lf = store.scan_derived("step_aggs", since, until)
        if job is not None:
            lf = lf.filter(pl.col("job") == job)
        aggs = lf.collect()
    return aggs.filter(pl.col("job") == job) if job is not None else aggs


def _steps(store, r, job: str | None = None) -> pl.DataFrame:
    steps = store.frame("steps")
    if job is not None:
        steps = steps.filter(pl.col("job") == job)
    if r.since is not None:
        steps = steps.filter(pl.col("ts") >= r.since)
    if r.until is not None:
        steps = steps.filter(pl.col("ts") <= r.until)
    return steps


def _whole(store, r) -> bool:
    """Whether the range covers every recent step the hot tier keeps (the usual case: the shared views)."""
    return (r.since is None or r.since <= (store.hot.steps_since or 0)) and r.until is None


def _ranks(store, views: Views, job: str) -> pl.DataFrame:
    """Per-rank figures of a job over all of its recent steps (a shared view)."""
    return views.get(("ranks", job), lambda: rank_step_quantiles(store.frame("steps"), job), rows=store.hot.rows()["steps"])


def _rank_rows(store, views: Views, steps: pl.DataFrame | None, job: str, limit: int) -> pl.DataFrame:
    """The `limit` slowest ranks of a job with their quantiles and phase breakdown: from `steps`, or (None)
    from all of its recent steps, then a shared view."""
    def compute(steps: pl.DataFrame | None = steps) -> pl.DataFrame:
        quantiles = rank_step_quantiles(steps, job) if steps is not None else _ranks(store, views, job)
        rows = steps if steps is not None else store.frame("steps").filter(pl.col("job") == job)
        if quantiles.height > limit:
            quantiles = slowest_ranks(quantiles, limit)
            rows = rows.filter(pl.col("rank").is_in(quantiles["rank"].implode()))
        return quantiles.join(rank_breakdown(rows, job), on="rank", how="left")

    if steps is not None:
        return compute()
    return views.get(("rank_rows", job, limit), compute, rows=store.hot.rows()["steps"])


def _known(store, views: Views, job: str) -> pl.DataFrame:
    """The job's row of the shared roster (empty for a job the hot tier holds no raw step of)."""
    return roster(store, views).filter(pl.col("job") == job)


def _with_slurm(request: Request, jobs: list[dict]) -> list[dict]:
    """Each job's Slurm job ids (oldest first) and the newest one's user and partition (collector/slurm.py)."""
    slurm = request.app.state.slurm
    return [{**row, **slurm.summary(row["job"])} for row in jobs]


@router.get("/v1/jobs")
def list_jobs(request: Request, store: StoreDep, r: RangeDep) -> dict:
    views = request.app.state.views
    if r.since is None and r.until is None:
        return {"jobs": _with_slurm(request, jobs_now(store, views).to_dicts())}
    overview = (jobs_overview(_aggs(store, r), roster=roster(store, views)) if _whole(store, r)
                else jobs_overview(_aggs(store, r), _steps(store, r)))
    return {"jobs": _with_slurm(request, with_mfu(overview, store.hot.latest("gpus")).to_dicts())}


@router.get("/v1/jobs/{job}", response_model=dict)
def get_job(job: str, request: Request, store: StoreDep, r: RangeDep,
            top: int | None = Query(None, ge=1, le=100_000, description="only the N ranks that computed longest "
                                                                       "(default: every rank up to 1,000, else 1,000)")) -> Response:
    views = request.app.state.views
    aggs = _aggs(store, r, job)  # the aggregates include the steps just reported
    if aggs.height == 0:
        raise HTTPException(404, f"no job {job!r} has reported a step in the range")
    # The range covers every recent step the hot tier keeps (the usual case): the shared views.
    known = _known(store, views, job) if _whole(store, r) else None
    steps = None if known is not None and known.height else _steps(store, r, job)
    overview = with_mfu(jobs_overview(aggs, steps, roster=known if steps is None else None),
                        store.hot.latest("gpus")).to_dicts()[0]
    pauses = store.frame("pauses").filter(pl.col("job") == job).sort("ts").tail(50)
    ranks = _rank_rows(store, views, steps, job, top if top is not None else MAX_RANKS)
    # Up to 100,000 ranks (top): written by polars (collector.api.encoding), the JSON FastAPI wrote from to_dicts.
    return json_response({"job": overview, "ranks": ranks, "ranks_total": overview["ranks"],
                          "ranks_cover_last_steps": store.hot.steps_per_rank,
                          # the Slurm jobs that ran it, one per incarnation (sbatch, requeue), oldest first: collector/slurm.py
                          "slurm": request.app.state.slurm.links(job),
                          # on Kubernetes, the pod of each rank in `ranks` (the newest that reported it): collector/pods.py
                          "pods": request.app.state.pods.ranks(job, ranks["rank"].to_list()),
                          "pauses": pauses.drop("agent_id")})


@router.get("/v1/jobs/{job}/steps", response_model=dict)
def get_job_steps(job: str, store: StoreDep, r: RangeDep, last: int | None = Query(None, ge=1, le=100_000)) -> Response:
    """Per step: start, ranks, median, p95 and slowest step time, and the incarnation of the job that ran it
    (a step that a restart ran again shows its latest run). At most max_points rows: longer ranges are cut
    into spans of steps (median of medians, highest p95 and max)."""
    series = step_series(_aggs(store, r, job), job)
    if series.height == 0:
        raise HTTPException(404, f"no job {job!r} has reported a step in the range")
    if last is not None:
        series = series.tail(last)
    if series.height > r.max_points:
        span = -(-series.height // r.max_points)
        series = (series.with_columns((pl.col("step") // span).alias("_bucket"))
                  .group_by("_bucket", maintain_order=True)
                  .agg(pl.col("step").first(), pl.col("ts").first(), pl.col("ranks").max(),
                       pl.col("step_time_p50_s").median(), pl.col("step_time_p95_s").max(), pl.col("step_time_max_s").max(),
                       pl.col("incarnation").max())
                  .drop("_bucket"))
    return json_response({"job": job, "steps": series})


@router.get("/v1/jobs/{job}/matrix")
def get_job_matrix(job: str, request: Request, store: StoreDep, last: int = Query(100, ge=1, le=1000),
                   top: int | None = Query(None, ge=1, le=4096, description="only the N ranks that computed longest "
                                                                            "(default: all when the matrix has at most "
                                                                            "20,000 cells, else 64)")) -> dict:
    """Each rank's compute time relative to its stage's median, per step of the last `last` steps."""
    views = request.app.state.views

    def compute() -> bytes | None:
        steps = store.frame("steps").filter(pl.col("job") == job)
        if steps.height == 0:
            return None
        total = steps["rank"].n_unique()
        chosen = None
        if top is not None or total * last > MAX_CELLS:
            chosen = slowest_ranks(_ranks(store, views, job), top or 64)["rank"].to_list()
        cells = rank_step_matrix(steps, job, last, chosen)
        return json.dumps({"job": job, "ranks_total": total, "ranks_shown": len(chosen) if chosen is not None else total,
                           "cells": cells.to_dicts()}, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    # A job the hot tier holds raw steps of: the shared view (never one for any name a client sends).
    body = (views.get(("matrix", job, last, top), compute, rows=store.hot.rows()["steps"])
            if _known(store, views, job).height else compute())
    if body is None:
        raise HTTPException(404, f"no job {job!r} has reported a step")
    return Response(body, media_type="application/json")


class GoodputSeconds(BaseModel):
    """GPU seconds (wall seconds x the job's world size) of each reason; see the README's Goodput section."""

    productive: float = Field(description="steps whose work was kept")
    recomputed: float = Field(description="the first run of steps that a later incarnation ran again after a restore")
    checkpoint: float = Field(description='declared pauses with reason "checkpoint"')
    startup: float = Field(description="process start to first step, and from one incarnation's last step to the next's start")
    hang: float = Field(description="undeclared silence between steps past the hang threshold")
    pause: float = Field(description="other declared pauses (evaluation, validation)")
    data_stall: float = Field(description="time in the data phase beyond the job's typical data phase")
    straggler_wait: float = Field(description="ranks waiting for the slowest rank of the step")


class GoodputIncarnation(BaseModel):
    number: int = Field(description="0 for the first run of the job the collector saw, then one per restart")
    start_ts: float = Field(description="the earliest process start of its ranks (its first step when unknown)")
    first_step_ts: float
    restored_from_step: int | None = Field(description="the checkpoint's step it declared it resumed from")
    first_step: int
    last_step: int
    last_step_end_ts: float
    pids: int = Field(description="processes seen")
    world_size: int
    slurm_jobs: list[str] = Field(default_factory=list, description="the Slurm job ids whose steps ran in it")


class GoodputBucket(GoodputSeconds):
    ts: float = Field(description="start of the bucket (whole minutes)")


class Goodput(BaseModel):
    job: str
    since: float | None
    until: float | None
    gpu_seconds: GoodputSeconds
    total_gpu_seconds: float
    goodput_ratio: float | None = Field(description="productive / total; null when nothing was counted")
    incarnations: list[GoodputIncarnation]
    over_time: list[GoodputBucket] = Field(description="GPU seconds per reason in buckets, at most max_points")


@router.get("/v1/jobs/{job}/goodput", response_model=Goodput)
def get_job_goodput(job: str, request: Request, store: StoreDep, r: RangeDep) -> Goodput:
    """Where the job's GPU time went over [since, until] (default: its whole life, across restarts)."""
    report = store.goodput.report(job, r.since, r.until)
    if report is None:
        raise HTTPException(404, f"no job {job!r} has reported a step or a pause")
    series = goodput.over_time(report.pieces, r.since, r.until, r.max_points)
    incarnations = report.incarnations.to_dicts()
    for row, slurm_jobs in zip(incarnations, request.app.state.slurm.incarnations_of(job, incarnations)):
        row["slurm_jobs"] = slurm_jobs
    return Goodput(job=job, since=r.since, until=r.until, gpu_seconds=GoodputSeconds(**report.seconds),
                   total_gpu_seconds=sum(report.seconds.values()), goodput_ratio=report.goodput_ratio,
                   incarnations=[GoodputIncarnation(**row) for row in incarnations],
                   over_time=[GoodputBucket(**row) for row in series.to_dicts()])
