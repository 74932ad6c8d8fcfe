"""The collector's HTTP API: ingest, auth, bad input, queries, persistence."""

from __future__ import annotations

import json
import statistics
import time

import polars as pl
import pytest
from fastapi.testclient import TestClient

from tests.conftest import wait_ready, wait_until

from collector.api import create_app
from collector.settings import Settings
from collector.store import Store
from collector.tables import conform

INGEST, READ = "ingest-secret", "read-secret"
# Events are dated ten minutes ago: the collector refuses records dated ahead of its clock (collector.bounds).
T0 = float(int(time.time()) - 600)
W = {"Authorization": f"Bearer {INGEST}"}
R = {"Authorization": f"Bearer {READ}"}


def settings(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({INGEST}), read_tokens=frozenset({READ}), **kw)


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as c:
        wait_ready(c)
        yield c


def step(job, rank, n, duration, **kw):
    return {"v": 1, "kind": "step", "job": job, "rank": rank, "world_size": 2, "step": n,
            "ts": T0 + n, "duration_s": duration, "node": f"node-{rank}", **kw}


def request(service, model, e2e, ttft, status="ok"):
    return {"v": 1, "kind": "request", "service": service, "model": model, "ts": T0,
            "e2e_s": e2e, "ttft_s": ttft, "status": status, "output_tokens": 10}


def batch(seq, events=(), frames=(), agent="agent-a"):
    return {"v": 1, "agent_id": agent, "seq": seq, "node": "node-0", "sent_ts": T0,
            "events": list(events), "frames": list(frames)}


def post(client, body, headers=W):
    return client.post("/v1/ingest", content=json.dumps(body), headers=headers)


def test_step_quantiles_per_rank_are_exact(client):
    durations = {0: [1.0, 1.1, 1.2, 1.3, 5.0], 1: [2.0, 2.0, 2.0, 2.0, 2.0]}
    events = [step("llm", r, n, d) for r, ds in durations.items() for n, d in enumerate(ds)]
    assert post(client, batch(0, events)).json() == {"agent_id": "agent-a", "seq": 0, "events": 10, "frames": 0, "duplicate": False}
    body = client.get("/v1/jobs/llm", headers=R).json()
    ranks = {r["rank"]: r for r in body["ranks"]}
    assert ranks[0]["step_time_p50_s"] == pytest.approx(statistics.median(durations[0]))
    # linear interpolation, as numpy's default: p95 of [1, 1.1, 1.2, 1.3, 5] = 1.3 + 0.8 * 3.7
    assert ranks[0]["step_time_p95_s"] == pytest.approx(1.3 + 0.8 * 3.7)
    assert ranks[1]["step_time_p99_s"] == pytest.approx(2.0)
    assert ranks[0]["node"] == "node-0" and ranks[1]["steps"] == 5
    jobs = client.get("/v1/jobs", headers=R).json()["jobs"]
    assert [j["job"] for j in jobs] == ["llm"] and jobs[0]["ranks"] == 2 and jobs[0]["last_step"] == 4
    series = client.get("/v1/jobs/llm/steps", headers=R).json()["steps"]
    assert [s["step"] for s in series] == [0, 1, 2, 3, 4]
    assert series[4]["step_time_max_s"] == 5.0


def test_service_latency_quantiles_exclude_failed_requests(client):
    events = [request("chat", "m", e2e, e2e / 4) for e2e in (0.1, 0.2, 0.3, 0.4)]
    events.append(request("chat", "m", 30.0, 29.0, status="error"))
    post(client, batch(0, events))
    (model,) = client.get("/v1/services/chat", headers=R).json()["models"]
    assert model["requests"] == 5 and model["error_ratio"] == pytest.approx(0.2)
    assert model["e2e_p50_s"] == pytest.approx(0.25)
    assert model["ttft_p99_s"] == pytest.approx(0.075 + 0.97 * 0.025)  # TTFTs of the ok requests: 0.025 .. 0.1
    assert client.get("/v1/services", headers=R).json()["services"][0]["requests"] == 5


def test_a_batch_is_applied_once(client):
    assert post(client, batch(7, [step("j", 0, 0, 1.0)])).json()["duplicate"] is False
    assert post(client, batch(7, [step("j", 0, 0, 1.0)])).json()["duplicate"] is True
    assert post(client, batch(7, [step("j", 0, 0, 1.0)], agent="agent-b")).json()["duplicate"] is False
    assert client.get("/v1/jobs/j", headers=R).json()["ranks"][0]["steps"] == 2


def test_nodes_and_gpus_from_host_frames(client):
    frame = {"v": 1, "kind": "host", "node": "node-0", "ts": T0, "cpu_utilization_ratio": 0.5,
             "memory_used_bytes": 10, "memory_total_bytes": 100, "labels": {"cluster": "east", "rack": "r12"},
             "gpus": [{"index": 0, "uuid": "GPU-a", "utilization_ratio": 0.9, "temperature_celsius": 70.0, "power_watts": 500.0},
                      {"index": 1, "uuid": "GPU-b", "up": False}]}
    later = {**frame, "ts": frame["ts"] + 5, "gpus": [{**frame["gpus"][0], "temperature_celsius": 75.0}, frame["gpus"][1]]}
    post(client, batch(0, frames=[frame, later]))
    (node,) = client.get("/v1/nodes", headers=R).json()["nodes"]
    assert node["node"] == "node-0" and node["gpu_count"] == 1 and node["gpus_down"] == 1
    assert (node["cluster"], node["rack"]) == ("east", "r12")
    assert node["gpu_temperature_max_celsius"] == 75.0  # from the latest frame only
    detail = client.get("/v1/nodes/node-0", headers=R).json()
    assert [g["uuid"] for g in detail["gpus"]] == ["GPU-a", "GPU-b"]
    assert len(client.get("/v1/gpus", headers=R).json()["gpus"]) == 2
    assert client.get("/v1/nodes/nope", headers=R).status_code == 404


@pytest.mark.parametrize(
    "headers, status",
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Basic abc"}, 401), (R, 403)],
)
def test_ingest_needs_an_ingest_token(client, headers, status):
    resp = post(client, batch(0, [step("j", 0, 0, 1.0)]), headers=headers)
    assert resp.status_code == status and resp.json()["detail"]
    assert client.get("/v1/jobs", headers=R).json()["jobs"] == []


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/nodes", "/v1/services", "/v1/gpus", "/metrics"])
def test_reads_need_a_read_token(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers=W).status_code == 403  # an ingest token cannot read the fleet
    assert client.get(path, headers=R).status_code == 200


def test_healthz_needs_no_token(client):
    assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"v": 1, "agent_id": ', 400, ["not valid JSON"]),
        (json.dumps(batch(3, [step("j", 0, 0, -1.0)])).encode(), 422, ["batch 3 from agent agent-a", "$.events[0].duration_s"]),
        (json.dumps(batch(3, [step("j", "zero", 0, 1.0)])).encode(), 422, ["$.events[0].rank", "int"]),
        (json.dumps({**batch(3), "v": 2}).encode(), 422, ["unsupported schema version 2"]),
        (json.dumps({k: v for k, v in batch(3).items() if k != "node"}).encode(), 422, ["node"]),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_nothing_is_stored(client, body, status, words):
    resp = client.post("/v1/ingest", content=body, headers=W)
    assert resp.status_code == status
    for word in words:
        assert word in resp.json()["detail"]
    assert client.get("/v1/jobs", headers=R).json()["jobs"] == []
    metrics = client.get("/metrics", headers=R).text
    assert 'fleetscope_collector_events_ingested_total{kind="step"} 0.0' in metrics


def test_an_oversized_body_is_refused(tmp_path):
    with TestClient(create_app(settings(tmp_path, max_body_bytes=1000))) as c:
        wait_ready(c)
        big = batch(0, [step("j", 0, n, 1.0) for n in range(50)])
        resp = post(c, big)
        assert resp.status_code == 413 and "limit of 1000" in resp.json()["detail"]
        # without a Content-Length header (chunked), the limit still holds
        resp = c.post("/v1/ingest", content=iter([json.dumps(big).encode()]), headers=W)
        assert resp.status_code == 413
        assert c.get("/v1/jobs", headers=R).json()["jobs"] == []


def test_rows_are_persisted_as_parquet_and_read_back_on_restart(tmp_path):
    s = settings(tmp_path)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        post(c, batch(0, [step("persisted", 0, n, 1.0 + n) for n in range(3)]))
    # shutdown persisted them
    files = list((tmp_path / "data" / "kind=steps").glob("date=*/hour=*/*.parquet"))
    assert files, "no Parquet partition written"
    store = Store(s.data_dir, window_s=10 * 365 * 86400)
    assert sorted(store.frame("steps")["step"].to_list()) == [0, 1, 2]


def test_collector_metrics_pass_promtool(client):
    import subprocess

    from tests.conftest import require_binary

    promtool = require_binary("promtool")
    post(client, batch(0, [step("j", 0, 0, 1.0), request("chat", "m", 0.2, 0.1)]))
    text = client.get("/metrics", headers=R).text
    assert 'fleetscope_training_last_step{training_job="j"} 0.0' in text
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_openapi_documents_the_ingest_body(client):
    spec = client.get("/openapi.json").json()
    assert "Batch" in spec["components"]["schemas"] and "StepEvent" in spec["components"]["schemas"]
    body = spec["paths"]["/v1/ingest"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Batch"}


def test_settings_refuse_to_run_without_tokens(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEETSCOPE_INGEST_TOKEN", raising=False)
    monkeypatch.delenv("FLEETSCOPE_READ_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no ingest token"):
        Settings(data_dir=tmp_path)


def test_declared_pauses_are_kept_with_the_job(client):
    pause = {"v": 1, "kind": "pause", "job": "llm", "rank": 0, "world_size": 2, "reason": "checkpoint",
             "phase": "begin", "ts": T0 + 10}
    post(client, batch(0, [step("llm", 0, 0, 1.0), pause, {**pause, "phase": "end", "ts": T0 + 70, "duration_s": 60.0}]))
    pauses = client.get("/v1/jobs/llm", headers=R).json()["pauses"]
    assert [(p["phase"], p["reason"], p["duration_s"]) for p in pauses] == [("begin", "checkpoint", None), ("end", "checkpoint", 60.0)]


def test_scraped_servers_get_quantiles_from_their_histograms(client):
    def frame(ts, counts, ok):
        return {"v": 1, "service": "chat", "model": "llama", "server": "http://n1:8000/metrics", "kind": "vllm",
                "ts": ts, "interval_s": 5.0,
                "histograms": {"ttft": {"le": [0.1, 0.5, 1.0, 1e300], "counts": counts, "sum": 2.0, "count": counts[-1]}},
                "gauges": {"running": 4, "waiting": 1, "kv_cache": 0.5},
                "counters": {"requests_ok": ok, "requests_error": 1, "generation_tokens": 500}}
    body = batch(0)
    body["servers"] = [frame(T0, [0, 5, 5, 5], 4), frame(T0 + 5, [0, 5, 10, 10], 9)]
    assert post(client, body).status_code == 200
    detail = client.get("/v1/services/chat", headers=R).json()
    (ttft,) = detail["scraped_latency"]
    # summed deltas: 10 in (0.1, 0.5], 5 in (0.5, 1.0] -> median at rank 7.5 lies in the first: 0.1 + 0.4 * 0.75
    assert ttft["metric"] == "ttft" and ttft["count"] == 15 and ttft["p50_s"] == pytest.approx(0.4)
    (scraped,) = detail["scraped"]
    assert scraped["requests"] == 15 and scraped["error_ratio"] == pytest.approx(2 / 15)
    assert scraped["generation_tokens_per_s"] == pytest.approx(100.0) and scraped["waiting"] == 1
    assert detail["models"] == []  # nothing instrumented with the client
    assert client.get("/v1/services", headers=R).json()["scraped"][0]["service"] == "chat"


def _post_a_straggling_job(client) -> None:
    import time as _time

    from bench.traces import Trace, generate

    steps, _ = generate(Trace(ranks=8, steps=40, slow_rank=6, slow_factor=0.15, instrument="comm", start_ts=_time.time() - 60))
    events = [{"v": 1, "kind": "step", "job": "found", "rank": r["rank"], "world_size": 8, "step": r["step"], "ts": r["ts"],
               "duration_s": r["duration_s"], "node": r["node"], "gpu_uuid": r["gpu_uuid"],
               "phases": {k: r[f"phase_{k}_s"] for k in ("data", "forward", "backward", "comm", "optimizer")
                          if r[f"phase_{k}_s"] is not None},
               } for r in steps.iter_rows(named=True)]
    assert post(client, batch(0, events)).status_code == 200
    client.app.state.analyse_now()


def test_findings_are_served_and_exported_as_metrics(client):
    _post_a_straggling_job(client)
    (f,) = client.get("/v1/findings", headers=R).json()["findings"]
    assert f["kind"] == "straggler" and f["subject"]["rank"] == 6 and f["active"] and f["probable_causes"]
    assert client.get("/v1/findings?kind=hang", headers=R).json()["findings"] == []
    assert client.get("/v1/findings?job=other", headers=R).json()["findings"] == []
    assert client.get("/v1/findings").status_code == 401
    text = client.get("/metrics", headers=R).text
    assert 'fleetscope_finding_active{kind="straggler",node="node-000",rank="6",service="",severity="page",training_job="found"} 1.0' in text
    assert 'fleetscope_training_straggler_score{node="node-000",rank="6",training_job="found"}' in text
    assert 'fleetscope_training_last_progress_age_seconds{training_job="found"}' in text


def test_with_a_cluster_name_every_finding_job_and_service_series_carries_it(tmp_path):
    """Several clusters' collectors feed one VictoriaMetrics: their findings, job summaries, goodput and services must
    not clash. Prometheus' external_labels would add `cluster` to what it remote-writes, but not to what Grafana
    reads from each cluster's own Prometheus, nor when one Prometheus scrapes several collectors."""
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(settings(tmp_path, cluster="west"))) as c:
        wait_ready(c)
        _post_a_straggling_job(c)
        assert post(c, batch(1, [request("chat", "m", 0.5, 0.1)])).status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics", headers=R).text)}
    scoped = [name for name in families if name.startswith(("fleetscope_finding", "fleetscope_training", "fleetscope_goodput",
                                                             "fleetscope_inference", "fleetscope_slo"))]
    for needed in ("fleetscope_finding_active", "fleetscope_training_straggler_score", "fleetscope_inference_requests"):
        assert any(name.startswith(needed) for name in scoped), f"{needed}: no such family, the test proves nothing"
    unlabelled = sorted({s.name for name in scoped for s in families[name].samples if s.labels.get("cluster") != "west"})
    assert not unlabelled, f"series without cluster=\"west\": {unlabelled}"
    # the collector's own health is the collector's, not a cluster's view: left as it is
    assert all("cluster" not in s.labels for s in families["fleetscope_collector_batches"].samples)


def test_throughput_and_mfu_when_the_job_declares_its_flops_per_token(client):
    frame = {"v": 1, "kind": "host", "node": "node-0", "ts": T0,
             "gpus": [{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA H100 80GB HBM3"} for i in range(2)]}
    events = [step("mfu", r, n, 1.0, tokens=100_000, samples=8, flops_per_token=4.0e9, gpu_uuid=f"GPU-{r}")
              for r in range(2) for n in range(4)]
    # steps of 1 s starting 1 s apart: 4 steps span 4 s; 2 ranks x 4 x 100,000 tokens
    for e in events:
        e["ts"] = T0 + e["step"]
    assert post(client, batch(0, events, frames=[frame])).status_code == 200
    job = client.get("/v1/jobs/mfu", headers=R).json()["job"]
    assert job["tokens_per_s"] == pytest.approx(200_000) and job["samples_per_s"] == pytest.approx(16)
    assert job["mfu"] == pytest.approx(200_000 * 4.0e9 / (2 * 989e12))
    text = client.get("/metrics", headers=R).text
    assert 'fleetscope_training_mfu_ratio{training_job="mfu"}' in text


def test_node_series_give_network_and_disk_rates(client):
    import time as _time

    now = _time.time()
    frames = [{"v": 1, "kind": "host", "node": "n9", "ts": now - 10 + 5 * i, "cpu_utilization_ratio": 0.5,
               "network_receive_bytes_total": 1000.0 + 5000.0 * i, "disk_written_bytes_total": 10.0 * i} for i in range(3)]
    post(client, batch(0, frames=frames))
    host = client.get("/v1/nodes/n9/series?minutes=5", headers=R).json()["host"]
    assert [h["network_receive_bytes_per_second"] for h in host] == [None, 1000.0, 1000.0]
    assert host[2]["disk_written_bytes_per_second"] == 2.0
    assert client.get("/v1/nodes/nobody/series", headers=R).status_code == 404


def test_a_big_job_answers_with_its_slowest_ranks_and_a_bounded_matrix(client):
    events = [step("huge", r, n, 1.0, metrics={"sync_arrival_s": 0.9 if r == 77 else 0.5}) | {"world_size": 300}
              for r in range(300) for n in range(70)]
    assert post(client, batch(0, events)).status_code == 200
    detail = client.get("/v1/jobs/huge", params={"top": 5}, headers=R).json()
    assert detail["ranks_total"] == 300 and len(detail["ranks"]) == 5 and 77 in [r["rank"] for r in detail["ranks"]]
    matrix = client.get("/v1/jobs/huge/matrix", params={"last": 70}, headers=R).json()
    assert matrix["ranks_total"] == 300 and matrix["ranks_shown"] == 64  # 300 x 70 cells is more than 20,000
    assert len(matrix["cells"]) == 64 * 70 and 77 in {c["rank"] for c in matrix["cells"]}
    small = client.get("/v1/jobs/huge/matrix", params={"last": 10}, headers=R).json()
    assert small["ranks_shown"] == 300


def test_series_are_bounded_by_max_points_and_ranges_are_checked(client):
    import time as _time

    now = _time.time()
    frames = [{"v": 1, "kind": "host", "node": "n9", "ts": now - 3000 + k * 5, "cpu_utilization_ratio": 0.5,
               "gpus": [{"index": 0, "uuid": "G9", "utilization_ratio": 0.5}]} for k in range(600)]
    assert post(client, batch(0, frames=frames)).status_code == 200
    series = client.get("/v1/nodes/n9/series", params={"since": now - 3600, "max_points": 50}, headers=R).json()
    assert 0 < len(series["host"]) <= 50 and 0 < len(series["gpus"]) <= 50
    full = client.get("/v1/nodes/n9/series", params={"since": now - 3600}, headers=R).json()
    assert 50 < len(full["host"]) <= 500  # the default: at most 500 points
    r = client.get("/v1/nodes/n9/series", params={"since": now, "until": now - 60}, headers=R)
    assert r.status_code == 422 and "after" in r.json()["detail"]


def test_the_store_says_why_it_is_not_ready(tmp_path):
    app = create_app(settings(tmp_path))
    with TestClient(app) as c:  # the store opens in the background; until then reads and ingest get 503
        wait_ready(c)
        app.state.store.ready = False
        app.state.store.startup = {"phase": "replaying the write-ahead log"}
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json() == {"status": "starting", "phase": "replaying the write-ahead log"}
        assert c.get("/readyz").status_code == 503  # not ready to serve yet
        assert c.get("/livez").json() == {"status": "alive", "ready": False, "can_write": True}  # but not to restart
        assert c.get("/v1/jobs", headers=R).status_code == 503
        assert post(c, batch(0, [step("j", 0, 0, 1.0)])).status_code == 503
        app.state.store.ready = True
        app.state.store.problem = "checkpoint failed: [Errno 28] No space left on device"
        assert c.get("/healthz").json() == {"status": "cannot_write", "reason": "checkpoint failed: [Errno 28] No space left on device"}
        assert c.get("/v1/jobs", headers=R).status_code == 200  # reads keep working
        # so a load balancer keeps sending reads (readiness), and a supervisor does not restart it (liveness)
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ingest"] == "cannot_write" and "No space" in ready.json()["reason"]
        assert c.get("/livez").json() == {"status": "alive", "ready": True, "can_write": False}
        app.state.store.problem = None


def test_a_matrix_whose_steps_median_is_zero_answers_null_cells_not_500(client):
    """A job whose ranks all report a sync arrival of 0 (valid: no time before the wait) has a median compute time
    of 0 for each step: its cells over it are 0/0, which the matrix's JSON (allow_nan=False) refused with a 500."""
    events = [step("zero", r, n, 1.0, metrics={"sync_arrival_s": 0.0}) | {"world_size": 4}
              for r in range(4) for n in range(5)]
    assert post(client, batch(0, events)).status_code == 200
    got = client.get("/v1/jobs/zero/matrix", params={"last": 5}, headers=R)
    assert got.status_code == 200, got.text
    cells = got.json()["cells"]
    assert len(cells) == 20 and all(c["relative"] is None and c["compute_s"] == 0.0 for c in cells)


def test_requests_and_pauses_keep_their_slurm_and_pod_ids_across_a_restart(tmp_path):
    # The wire carries them on every kind of event (fleetscope.schema); the tables once dropped them for these two,
    # and a pause's world size, local rank, pid and GPU.
    slurm = {"job": "4242", "step": "0", "user": "ana", "partition": "gpu"}
    pod = {"namespace": "serving", "pod": "vllm-0", "container": "vllm"}
    pause = {"v": 1, "kind": "pause", "job": "llm", "rank": 1, "world_size": 2, "reason": "checkpoint",
             "phase": "begin", "ts": T0 + 10, "slurm": slurm, "pod": pod, "local_rank": 1, "pid": 4242,
             "gpu_uuid": "GPU-1"}
    events = [step("llm", 0, 0, 1.0), {**request("chat", "m", 0.2, 0.1), "slurm": slurm, "pod": pod}, pause,
              request("chat", "m", 0.3, 0.1)]
    s = settings(tmp_path)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        assert post(c, batch(0, events)).status_code == 200
    store = Store(s.data_dir, window_s=10 * 365 * 86400)  # from the Parquet the shutdown wrote
    requests = store.frame("requests").sort("e2e_s")
    assert [None if t is None else json.loads(t) for t in requests["slurm"].cast(pl.String).to_list()] == [slurm, None]
    assert [None if t is None else json.loads(t) for t in requests["pod"].cast(pl.String).to_list()] == [pod, None]
    pauses = store.frame("pauses")
    assert json.loads(pauses["slurm"].cast(pl.String).item()) == slurm
    assert json.loads(pauses["pod"].cast(pl.String).item()) == pod
    assert pauses.select("world_size", "local_rank", "pid", pl.col("gpu_uuid").cast(pl.String)).row(0) == (2, 1, 4242, "GPU-1")
    # A file written before these columns existed reads back with them null.
    old = pl.DataFrame({"ts": [T0], "job": ["llm"], "rank": [0], "reason": ["checkpoint"], "phase": ["end"],
                        "duration_s": [1.0], "node": ["n"], "agent_id": ["a"]})
    assert conform(old, "pauses").select("slurm", "pod", "pid", "gpu_uuid").row(0) == (None, None, None, None)


def test_a_flood_past_the_hot_tiers_backlog_is_answered_503_until_the_upkeep_it_wakes_catches_up(tmp_path):
    # No analysis pass for an hour after the first: only the backlog can bring the next one.
    with TestClient(create_app(settings(tmp_path, analysis_interval_s=3600.0))) as c:
        wait_ready(c)
        store = c.app.state.store
        wait_until(lambda: store.hot.maintenance_s > 0, what="the first upkeep pass")
        store.backlog_limit = 1  # any backlog is past it
        first = [step("flood", r, 0, 1.0) for r in range(2)]
        second = [step("flood", r, 1, 1.0) for r in range(2)]
        assert post(c, batch(0, first)).status_code == 200  # the backlog was empty
        refused = post(c, batch(1, second))
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "catching up" in refused.json()["detail"] and "keeps the batch" in refused.json()["detail"]
        # The refusal woke the upkeep: the batch sent again goes in, and both are there once.
        wait_until(lambda: post(c, batch(1, second)).status_code == 200, what="the batch sent again to go in")
        ranks = c.get("/v1/jobs/flood", headers=R).json()["ranks"]
        assert sorted((r["rank"], r["steps"]) for r in ranks) == [(0, 2), (1, 2)]
        metrics = c.get("/metrics", headers=R).text
        count = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith('fleetscope_collector_ingest_rejected_total{reason="backlog"}'))
        assert count >= 1
