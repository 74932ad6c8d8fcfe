"""GET /v1/nodes, /v1/nodes/{node} and /v1/gpus: the latest state of each node and GPU."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException

from collector.api.deps import ReadAuth, StoreDep
from collector.fleet import fleet_gpus, node_gpus, nodes_overview

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
