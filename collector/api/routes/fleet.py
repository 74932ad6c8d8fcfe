"""GET /v1/nodes, /v1/nodes/{node} and /v1/gpus: the latest state of each node and GPU."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Query

from collector.api.deps import ReadAuth, StoreDep
from collector.fleet import fleet_gpus, health_events, node_gpus, node_series, nodes_overview

router = APIRouter(tags=["fleet"], dependencies=[ReadAuth])


@router.get("/v1/nodes")
def list_nodes(store: StoreDep) -> dict:
    nodes = nodes_overview(store.frame("hosts"), store.frame("gpus"), time.time())
    return {"nodes": nodes.to_dicts()}


@router.get("/v1/gpus")
def list_gpus(store: StoreDep) -> dict:
    return {"gpus": fleet_gpus(store.frame("gpus")).to_dicts()}


@router.get("/v1/nodes/{node}")
def get_node(node: str, store: StoreDep) -> dict:
    nodes = nodes_overview(store.frame("hosts"), store.frame("gpus"), time.time()).filter(node=node)
    if nodes.height == 0:
        raise HTTPException(404, f"no node {node!r} has reported")
    return {"node": nodes.to_dicts()[0], "gpus": node_gpus(store.frame("gpus"), node).to_dicts()}


@router.get("/v1/nodes/{node}/series")
def get_node_series(node: str, store: StoreDep, minutes: float = Query(60, gt=0, le=7 * 24 * 60)) -> dict:
    """The node's host and GPU frames over the last `minutes`, and its GPUs' health events."""
    host, gpu = node_series(store.frame("hosts"), store.frame("gpus"), node, time.time() - minutes * 60)
    if host.height == 0 and gpu.height == 0:
        raise HTTPException(404, f"no frames from node {node!r} in the last {minutes:g} minutes")
    return {"node": node, "host": host.to_dicts(), "gpus": gpu.to_dicts(),
            "events": health_events(store.frame("gpus"), node).to_dicts()}
