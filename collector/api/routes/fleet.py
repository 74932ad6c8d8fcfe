"""GET /v1/nodes, /v1/gpus: the state of each node and GPU; a node's series; a GPU's or node's
reliability record over any range (from the warm tier where the hot tier no longer holds it)."""

from __future__ import annotations

import time

import polars as pl
from fastapi import APIRouter, HTTPException, Query, Request, Response

from collector import history
from collector.api.deps import RangeDep, ReadAuth, StoreDep
from collector.api.encoding import json_response
from collector.fleet import fleet_gpus, health_events, latest_per, node_gpus, node_series, nodes_overview
from collector.rollups import bounded_step, rollup_gpu_samples

router = APIRouter(tags=["fleet"], dependencies=[ReadAuth])
HISTORY_DEFAULT_S = 30 * 86400.0


def _latest(store, r) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each node's and GPU's latest frame in the range (now, by default: the hot tier's latest)."""
    hosts, gpus = store.hot.latest("hosts"), store.hot.latest("gpus")
    if r.until is not None and r.until < time.time() - store.hot.raw_s:
        # As of a past time: the last sample at or before it (from rollups or the warm tier).
        since = r.since if r.since is not None else r.until - 3600
        hosts = latest_per(history.samples(store, "hosts", since, r.until), "node")
        gpus = latest_per(history.samples(store, "gpus", since, r.until), "node", "index").with_columns(
            (pl.col("up_ratio") > 0).alias("up"))
        return hosts, gpus
    if r.since is not None:
        hosts, gpus = hosts.filter(pl.col("ts") >= r.since), gpus.filter(pl.col("ts") >= r.since)
    return hosts, gpus


FieldsQuery = Query(None, description="comma-separated columns to return (default: all), e.g. node,age_s")


def _only(frame: pl.DataFrame, fields: str | None) -> pl.DataFrame:
    if not fields:
        return frame
    wanted = [f.strip() for f in fields.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in frame.columns]
    if unknown:
        raise HTTPException(422, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(frame.columns)}")
    return frame.select(wanted)


# The answers holding frames are written by polars (collector.api.encoding: the same JSON as FastAPI wrote from
# `to_dicts`, a fraction of the time at 32,768 GPUs); response_model keeps the OpenAPI document as it was.
@router.get("/v1/nodes", response_model=dict)
def list_nodes(store: StoreDep, r: RangeDep, fields: str | None = FieldsQuery) -> Response:
    """Every node's latest frame (in [since, until] when given; as of `until` when it is in the past)."""
    hosts, gpus = _latest(store, r)
    return json_response({"nodes": _only(nodes_overview(hosts, gpus, time.time()), fields)})


@router.get("/v1/gpus", response_model=dict)
def list_gpus(store: StoreDep, r: RangeDep, fields: str | None = FieldsQuery,
              node: str | None = Query(None, description="comma-separated nodes: only their GPUs"),
              health: str | None = Query(None, description="comma-separated states: only GPUs in them, e.g. degraded,unhealthy")) -> Response:
    _, gpus = _latest(store, r)
    if node:
        gpus = gpus.filter(pl.col("node").is_in([n.strip() for n in node.split(",")]))
    if health:
        gpus = gpus.filter(pl.col("health").is_in([h.strip() for h in health.split(",")]))
    return json_response({"gpus": _only(fleet_gpus(gpus), fields)})


@router.get("/v1/nodes/{node}", response_model=dict)
def get_node(node: str, store: StoreDep, r: RangeDep) -> Response:
    hosts, gpus = _latest(store, r)
    nodes = nodes_overview(hosts.filter(pl.col("node") == node), gpus.filter(pl.col("node") == node), time.time())
    if nodes.height == 0:
        raise HTTPException(404, f"no node {node!r} has reported")
    return json_response({"node": nodes.to_dicts()[0], "gpus": node_gpus(gpus, node)})


@router.get("/v1/nodes/{node}/series", response_model=dict)
def get_node_series(node: str, store: StoreDep, r: RangeDep,
                    minutes: float | None = Query(None, gt=0, le=366 * 24 * 60, description="instead of since: the last N minutes")) -> Response:
    """The node's host and GPU samples over the range (default: the last hour), at most max_points per
    series, and its GPUs' health events."""
    since, until = r.resolve(3600.0)
    if minutes is not None and r.since is None:
        since = until - minutes * 60
    host = history.samples(store, "hosts", since, until, ("node", [node]), r.max_points)
    gpu = history.samples(store, "gpus", since, until, ("node", [node]), r.max_points)
    if host.height == 0 and gpu.height == 0:
        raise HTTPException(404, f"no frames from node {node!r} between {since:.0f} and {until:.0f}")
    events = health_events(gpu)
    host_out, gpu_out = node_series(host, gpu, since, until, r.max_points)
    return json_response({"node": node, "since": since, "until": until, "host": host_out, "gpus": gpu_out,
                          "events": events.head(r.max_points)})


def _history(store, r, key: tuple[str, list], what: str, *, series: bool) -> tuple[list[dict], pl.DataFrame, float, float]:
    since, until = r.resolve(HISTORY_DEFAULT_S)
    # The record is sums over the range: hourly rollups serve it as well as finer ones, at a fraction of the
    # rows; a series needs its max_points.
    points = r.max_points if series else max(1, int((until - since) // 3600))
    gpu = history.samples(store, "gpus", since, until, key, points)
    if gpu.height == 0:
        raise HTTPException(404, f"no samples of {what} between {since:.0f} and {until:.0f}")
    return history.gpu_reliability(gpu, since), gpu, since, until


def _series(gpu: pl.DataFrame, since: float, until: float, max_points: int) -> pl.DataFrame:
    every = bounded_step(since, until, max((until - since) / max_points, 60.0), max_points)
    rolled = rollup_gpu_samples(gpu, every) if gpu.height > max_points else gpu
    return rolled.select("ts", *(pl.col(c).cast(pl.Float64) for c in (
        "utilization_ratio", "temperature_celsius", "temperature_max_celsius", "power_watts", "sm_clock_hertz",
        "thermal_share", "power_cap_share", "hw_slowdown_share", "unhealthy_share")), "xid_total")


@router.get("/v1/gpus/{uuid}/history", response_model=dict)
def get_gpu_history(uuid: str, store: StoreDep, r: RangeDep) -> Response:
    """One GPU's reliability record over the range (default: 30 days): XIDs by code, ECC errors, row
    remapping, time throttled by reason, time unhealthy; and its series at most max_points long."""
    records, gpu, since, until = _history(store, r, ("uuid", [uuid]), f"GPU {uuid!r}", series=True)
    return json_response({"uuid": uuid, "since": since, "until": until, "record": records[0],
                          "series": _series(gpu, since, until, r.max_points)})


@router.get("/v1/nodes/{node}/history")
def get_node_history(node: str, request: Request, store: StoreDep, r: RangeDep) -> dict:
    """The reliability record of each GPU of a node over the range (default: 30 days), and the node's totals.
    A record over days changes little from minute to minute: one asked for again within a minute (the
    console refreshing) is served from the last answer."""
    since, until = r.resolve(HISTORY_DEFAULT_S)
    key = ("node-history", node, round(since / 60), round(until / 60))
    compute = lambda: _history(store, r, ("node", [node]), f"node {node!r}", series=False)[0]  # noqa: E731
    records = request.app.state.history_views.get(key, compute) if until - since > 6 * 3600 else compute()
    totals: dict = {"xids_by_code": {}, "xids_total": 0, "ecc_corrected": 0, "ecc_uncorrected": 0,
                    "unhealthy_seconds": 0.0, "throttle_seconds": {k: 0.0 for k in history.THROTTLE_REASONS}}
    for rec in records:
        for code, n in rec["xids_by_code"].items():
            totals["xids_by_code"][code] = totals["xids_by_code"].get(code, 0) + n
        for key in ("xids_total", "ecc_corrected", "ecc_uncorrected", "unhealthy_seconds"):
            totals[key] += rec[key]
        for reason, seconds in rec["throttle_seconds"].items():
            totals["throttle_seconds"][reason] += seconds
    return {"node": node, "since": since, "until": until, "totals": totals, "gpus": records}
