"""The read routes write their frames with polars (collector.api.encoding): the JSON must be byte for byte what
FastAPI wrote before from `frame.to_dicts()` (a route returning a dict, serialised by pydantic against its
`dict` response model), and the OpenAPI document must describe the routes as before."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest
from fastapi import FastAPI, Response
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from collector.api import create_app
from collector.api.encoding import frame_json, json_bytes
from collector.fleet import fleet_gpus, node_series
from collector.settings import Settings
from tests.conftest import wait_ready

INGEST, READ = "ingest-secret", "read-secret"
W, R = {"Authorization": f"Bearer {INGEST}"}, {"Authorization": f"Bearer {READ}"}
NAN, INF = float("nan"), float("inf")


def old_path(content: dict) -> bytes:
    """The bytes FastAPI answered with from a route annotated `-> dict` returning `content` with each frame in it
    as `frame.to_dicts()`; asserts that json_bytes writes the same."""
    app = FastAPI()

    @app.get("/old")
    def old() -> dict:
        return {k: v.to_dicts() if isinstance(v, pl.DataFrame) else v for k, v in content.items()}

    @app.get("/new", response_model=dict)
    def new() -> Response:
        return Response(json_bytes(content), media_type="application/json")

    with TestClient(app) as client:
        before, after = client.get("/old"), client.get("/new")
    assert before.headers["content-type"] == after.headers["content-type"] == "application/json"
    assert after.content == before.content
    return before.content


def nasty() -> pl.DataFrame:
    """Every dtype the read routes answer with, and the values whose JSON could differ between writers."""
    n = 8
    return pl.DataFrame({
        "node": ["node-0", "nœud-é", "ノード", "a\"b\\c", "tab\tnl\nnul\x00", "\u2028\u2029", "emoji 😀", None],
        "f64": [1.0, NAN, INF, -INF, None, 1e20, 1e-7, 123456789.12345679],
        # Float32: to_dicts widens 0.9f to 0.8999999761581421; polars alone would write 0.9
        "f32": pl.Series([0.9, NAN, INF, None, 66.3, 1e20, 1.98e9, -0.0], dtype=pl.Float32),
        "u64": pl.Series([2**64 - 1, 0, None, 2**53 + 1, 1, 2, 3, 4], dtype=pl.UInt64),
        "i64": pl.Series([-(2**63), 2**63 - 1, None, -1, 0, 2**53, 5, 6], dtype=pl.Int64),
        "i16": pl.Series([0, 1, 2, 3, None, 5, 6, -7], dtype=pl.Int16),
        "u32": pl.Series([0, 1, 2, 3, None, 5, 6, 2**32 - 1], dtype=pl.UInt32),
        "up": [True, False, None, True, True, False, True, False],
        "health": pl.Series(["healthy", "degraded", None, "unhealthy"] * 2, dtype=pl.Categorical),
        "state": pl.Series(["a", "b", None, "a"] * 2, dtype=pl.Enum(["a", "b"])),
        "reasons": [["thermal", "xid 79"], [], None, ["é"], ["x"], [], None, ["\x01"]],
        "reasons_cat": pl.Series([["a"], [], None, ["b"]] * 2, dtype=pl.List(pl.Categorical)),
        "clocks": pl.Series([[1.1, NAN], None, [], [INF], [0.9], [1e-7], [2.0], [None]], dtype=pl.List(pl.Float32)),
        "nothing": pl.Series([None] * n, dtype=pl.Null),
        "pair": [{"a": 1.5, "b": "x"}, None, {"a": NAN, "b": None}, {"a": None, "b": "é"}] * 2,
    }).with_columns(pl.col("pair").struct.with_fields(pl.field("a").cast(pl.Float32).alias("c")))


def test_frames_are_written_as_fastapi_wrote_their_dicts():
    frame = nasty()
    body = old_path({"node": "nœud-é", "gpus": frame, "since": 1.5e9, "until": NAN, "n": 2**64 - 1,
                     "record": {"xids_by_code": {"79": 2}, "unhealthy_seconds": 0.1}, "empty": frame.head(0)})
    gpus = json.loads(body)["gpus"]
    assert gpus[0]["f32"] == 0.8999999761581421 and gpus[1]["f64"] is None and gpus[2]["f64"] is None
    assert gpus[0]["u64"] == 2**64 - 1 and gpus[1]["node"] == "nœud-é"
    # one column at a time too, so that a difference names its dtype
    for name in frame.columns:
        old_path({"x": frame.select(name)})


@pytest.mark.parametrize("frame", [
    pl.DataFrame({"a": pl.Series([], dtype=pl.Int64), "b": pl.Series([], dtype=pl.Float32)}),  # no rows
    pl.DataFrame(),  # no columns
    pl.DataFrame({"a": [None, None]}).select(pl.lit(None).alias("a")).head(0),
    # dtypes polars writes otherwise (datetimes with a space, not a "T") or not at all (binary): through to_dicts
    pl.DataFrame({"when": pl.Series([0, 10**15], dtype=pl.Datetime("us")), "x": [1.5, NAN]}),
    pl.DataFrame({"blob": [b"ab", b"\x00"], "x": [1, 2]}),
    pl.DataFrame({"t": [{"when": 0}]}).with_columns(pl.col("t").struct.field("when").cast(pl.Datetime("ms")).alias("w")),
], ids=["no rows", "no columns", "null column", "datetime", "binary", "struct with a datetime"])
def test_frames_of_other_shapes_and_dtypes(frame):
    old_path({"rows": frame})


def test_frame_json_alone():
    frame = nasty()
    assert frame_json(frame) == TypeAdapter(list).dump_json(frame.to_dicts())


def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({INGEST}), read_tokens=frozenset({READ}))


T0 = float(int(time.time()) - 600)
NODES = ["node-0", "nœud-é", "ノード\u2028x"]


def gpu(node: str, i: int, k: int) -> dict:
    if i == 3:  # every optional field left out: nulls
        return {"index": i, "uuid": f"GPU-{node}-{i}"}
    return {"index": i, "uuid": f"GPU-{node}-{i}", "name": 'H100 "SXM" “x”', "utilization_ratio": 0.9,
            "memory_used_bytes": 2**53 - k, "memory_total_bytes": 2**53, "temperature_celsius": 66.3 + i,
            "power_watts": 610.7, "sm_clock_hertz": 1.98e9, "clock_event_mask": 64 * (i == 1),
            "health": ("healthy", "degraded", "unhealthy")[(i + k) % 3], "xid_total": k // 3,
            "health_reasons": ["thermal", "xid 79"] if i == 2 else [], "ecc_corrected_total": k, "remap_pending": i == 0}


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as c:
        wait_ready(c)
        for j, node in enumerate(NODES):
            frames = [{"v": 1, "kind": "host", "node": node, "ts": T0 + 5 * k, "cpu_utilization_ratio": 0.31,
                       "memory_used_bytes": 4123, "memory_total_bytes": 2**53, "load1": 12.5 + k,
                       "network_receive_bytes_total": 1e6 * k, "gpus": [gpu(node, i, k) for i in range(4)]}
                      for k in range(12)]
            steps = [{"v": 1, "kind": "step", "job": "jöb", "rank": j, "world_size": 3, "step": k, "ts": T0 + k,
                      "duration_s": 1.0 + 0.1 * j, "node": node} for k in range(10)]
            body = {"v": 1, "agent_id": f"agent-{j}", "seq": 0, "node": node, "sent_ts": T0 + 60, "events": steps,
                    "frames": frames}
            assert c.post("/v1/ingest", content=json.dumps(body), headers=W).status_code == 200
        yield c


def test_gpus_answer_is_the_json_the_dicts_gave(client):
    store = client.app.state.store
    answer = client.get("/v1/gpus", headers=R)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.content == old_path({"gpus": fleet_gpus(store.hot.latest("gpus"))})
    gpus = answer.json()["gpus"]
    assert {g["node"] for g in gpus} == set(NODES) and len(gpus) == 12
    nulls = next(g for g in gpus if g["index"] == 3)
    assert nulls["temperature_celsius"] is None and nulls["health_reasons"] is None
    assert next(g for g in gpus if g["index"] == 0)["utilization_ratio"] == 0.8999999761581421  # a float32, widened


def test_node_series_answer_is_the_json_the_dicts_gave(client):
    from collector import history
    from collector.fleet import health_events

    store, node, since, until = client.app.state.store, NODES[2], T0 - 10, T0 + 100
    answer = client.get(f"/v1/nodes/{node}/series", params={"since": since, "until": until}, headers=R)
    assert answer.status_code == 200
    host = history.samples(store, "hosts", since, until, ("node", [node]), 500)
    gpus = history.samples(store, "gpus", since, until, ("node", [node]), 500)
    host_out, gpu_out = node_series(host, gpus, since, until, 500)
    events = answer.json()["events"]  # their order among equal start times is not fixed: taken as answered
    assert len(events) == health_events(gpus).height > 0
    assert answer.content == old_path({"node": node, "since": since, "until": until, "host": host_out, "gpus": gpu_out,
                                       "events": events})


def test_read_routes_keep_their_openapi_description(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/nodes", "/v1/gpus", "/v1/nodes/{node}", "/v1/nodes/{node}/series", "/v1/gpus/{uuid}/history",
                 "/v1/jobs/{job}", "/v1/jobs/{job}/steps", "/v1/services", "/v1/services/{service}",
                 "/v1/services/{service}/series"):
        schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["type"] == "object" and schema["additionalProperties"] is True, (path, schema)
