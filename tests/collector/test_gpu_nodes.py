"""The GPU directory: a quiet GPU's history scan is narrowed to the nodes it was seen on, across restarts."""

from __future__ import annotations

import json
import time

import polars as pl
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.history import GpuNodes, _gpu_nodes
from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready


def latest(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"uuid": pl.Categorical, "node": pl.Categorical, "ts": pl.Float64}, orient="row")


def test_the_directory_keeps_every_node_a_gpu_was_seen_on_and_forgets_past_retention():
    now = time.time()
    d = GpuNodes(retention_s=86400)
    d.update(latest([("G1", "n1", now - 100), ("G2", "n2", now - 90000)]))
    d.update(latest([("G1", "n7", now)]))  # moved (an RMA'd GPU back in another node)
    d.update(latest([("G1", "n1", now - 50)]))  # an older sample of a known pair changes nothing but its time
    assert d.nodes_of(["G1"]) == ["n1", "n7"] and d.nodes_of(["G1", "G2"]) == ["n1", "n2", "n7"]
    assert d.nodes_of(["G1", "G9"]) is None  # one unknown GPU: no narrowing at all
    again = GpuNodes(retention_s=86400)
    again.restore(bytes(d.snapshot()))  # G2 last seen past retention: forgotten
    assert again.nodes_of(["G1"]) == ["n1", "n7"] and again.nodes_of(["G2"]) is None


def test_a_gpu_the_hot_tier_no_longer_holds_is_looked_up_on_its_node(tmp_path):
    """Before, only GPUs in the hot tier's latest frames narrowed the scan: a GPU quiet for longer than the window
    read every node's row groups of a month."""
    now = time.time()
    frames = [{"v": 1, "kind": "host", "node": f"n{k}", "ts": now - 30,
               "gpus": [{"index": 0, "uuid": f"GPU-{k}", "utilization_ratio": 0.5}]} for k in range(3)]
    app = create_app(settings(tmp_path, raw_window_s=60.0))
    with TestClient(app) as c:
        wait_ready(c)
        assert post(c, batch(0, frames=frames)).status_code == 200
        app.state.analyse_now()  # the analysis pass keeps the directory
        store = app.state.store
        assert _gpu_nodes(store, ["GPU-1"]) == ["n1"]
        # the GPU goes quiet for longer than the hot tier keeps it: only the directory knows its node now
        store.hot._latest["gpus"] = store.hot._latest["gpus"].clear()
        store.hot._fresh["gpus"].clear()
        assert store.hot.latest("gpus").height == 0
        assert _gpu_nodes(store, ["GPU-1"]) == ["n1"]
        assert _gpu_nodes(store, ["GPU-404"]) == []  # unknown: the scan is not narrowed
        store.checkpoint()
        history = c.get("/v1/gpus/GPU-1/history", headers=R)
        assert history.status_code == 200
    with TestClient(create_app(settings(tmp_path))) as c:  # restarted: the directory came back with the checkpoint
        wait_ready(c)
        assert json.loads(bytes(c.app.state.store.persisted["gpu_nodes"].snapshot()))["GPU-1"].keys() == {"n1"}
