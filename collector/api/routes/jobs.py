"""GET /v1/jobs, /v1/jobs/{job} (step-time quantiles per rank) and /v1/jobs/{job}/steps (over time)."""

from __future__ import annotations

import polars as pl
from fastapi import APIRouter, HTTPException, Query

from collector.api.deps import ReadAuth, StoreDep
from collector.training import jobs_overview, rank_breakdown, rank_step_matrix, rank_step_quantiles, step_series, with_mfu

router = APIRouter(tags=["training"], dependencies=[ReadAuth])


def _job_steps(store, job: str) -> pl.DataFrame:
    steps = store.frame("steps")
    if steps.filter(pl.col("job") == job).height == 0:
        raise HTTPException(404, f"no job {job!r} has reported a step")
    return steps


@router.get("/v1/jobs")
def list_jobs(store: StoreDep) -> dict:
    return {"jobs": with_mfu(jobs_overview(store.frame("steps")), store.frame("gpus")).to_dicts()}


@router.get("/v1/jobs/{job}")
def get_job(job: str, store: StoreDep) -> dict:
    steps = _job_steps(store, job)
    overview = with_mfu(jobs_overview(steps.filter(pl.col("job") == job)), store.frame("gpus")).to_dicts()[0]
    pauses = store.frame("pauses").filter(pl.col("job") == job).sort("ts").tail(50)
    ranks = rank_step_quantiles(steps, job).join(rank_breakdown(steps, job), on="rank", how="left")
    return {"job": overview, "ranks": ranks.to_dicts(), "pauses": pauses.drop("agent_id").to_dicts()}


@router.get("/v1/jobs/{job}/steps")
def get_job_steps(job: str, store: StoreDep, last: int = Query(500, ge=1, le=100_000)) -> dict:
    steps = _job_steps(store, job)
    return {"job": job, "steps": step_series(steps, job, last=last).to_dicts()}


@router.get("/v1/jobs/{job}/matrix")
def get_job_matrix(job: str, store: StoreDep, last: int = Query(100, ge=1, le=1000)) -> dict:
    """Each rank's compute time relative to its stage's median, per step of the last `last` steps."""
    steps = _job_steps(store, job)
    return {"job": job, "cells": rank_step_matrix(steps, job, last).to_dicts()}
