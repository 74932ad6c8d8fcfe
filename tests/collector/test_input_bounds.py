"""Input bounds on ingest (collector.bounds), JSON depth, and the bounded cardinality of the collector's /metrics."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_ready

from collector.api import create_app
from collector.settings import load_config
from collector.store import Store
from fleetscope.schema import decode_batch

from tests.collector.test_api import INGEST, READ, R, W, client, settings  # noqa: F401 - the client fixture

DAY = 86400.0


def step(job, rank, n, ts, duration=1.0, world_size=2):
    return {"v": 1, "kind": "step", "job": job, "rank": rank, "world_size": world_size, "step": n, "ts": ts,
            "duration_s": duration, "node": f"node-{rank}"}


def request(ts, service="chat", status="ok"):
    return {"v": 1, "kind": "request", "service": service, "model": "m", "ts": ts, "e2e_s": 0.2, "status": status}


def pause(ts, job="llm"):
    return {"v": 1, "kind": "pause", "job": job, "rank": 0, "world_size": 2, "reason": "checkpoint", "phase": "begin", "ts": ts}


def host(ts, node="node-0"):
    return {"v": 1, "kind": "host", "node": node, "ts": ts, "cpu_utilization_ratio": 0.5,
            "gpus": [{"index": 0, "uuid": f"GPU-{node}", "utilization_ratio": 0.9}]}


def server(ts):
    return {"v": 1, "service": "scraped", "model": "m", "server": "http://s", "kind": "vllm", "ts": ts, "interval_s": 5.0,
            "counters": {"requests_ok": 5}}


def batch(seq, events=(), frames=(), servers=(), agent="agent-a"):
    return {"v": 1, "agent_id": agent, "seq": seq, "node": "node-0", "sent_ts": time.time(),
            "events": list(events), "frames": list(frames), "servers": list(servers)}


def post(client, body):
    return client.post("/v1/ingest", content=json.dumps(body), headers=W)


def metric(text: str, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def job_steps(client, job) -> list[int]:
    return sorted(s["step"] for s in client.get(f"/v1/jobs/{job}/steps?last=1000", headers=R).json()["steps"])


def test_records_dated_ahead_or_past_retention_are_refused_one_by_one_and_the_rest_stored_once(client):
    now = time.time()
    body = batch(0, events=[step("llm", 0, 0, now - 5), step("llm", 0, 1, now + 3600), request(now - 2),
                            request(now - 31 * DAY), pause(now + 86400 * 365), request(now + 590)],
                 frames=[host(now - 1), host(9.9e9, node="node-9")], servers=[server(now - 3), server(now + 7200)])
    reply = post(client, body)
    assert reply.status_code == 200
    got = reply.json()
    assert (got["events"], got["frames"], got["refused"], got["duplicate"]) == (3, 1, 5, False)
    assert [(r["field"], r["index"], r["kind"], r["reason"]) for r in got["refusals"]] == [
        ("events", 1, "step", "future"), ("events", 3, "request", "too_old"), ("events", 4, "pause", "future"),
        ("frames", 1, "host_frame", "future"), ("servers", 1, "server_frame", "future")]
    assert "$.events[1].ts" in got["refusals"][0]["message"] and "ahead of the collector's clock" in got["refusals"][0]["message"]
    assert "older than the collector's retention" in got["refusals"][1]["message"]
    # a resend of the same batch is a duplicate: nothing is applied twice
    assert post(client, body).json()["duplicate"] is True
    assert job_steps(client, "llm") == [0]
    assert client.get("/v1/jobs/llm", headers=R).json()["pauses"] == []
    assert client.get("/v1/services/chat", headers=R).json()["models"][0]["requests"] == 2  # now-2 and now+590
    assert [n["node"] for n in client.get("/v1/nodes", headers=R).json()["nodes"]] == ["node-0"]
    text = client.get("/metrics", headers=R).text
    assert metric(text, "fleetscope_collector_events_refused_total", kind="step", reason="future") == 1
    assert metric(text, "fleetscope_collector_events_refused_total", kind="request", reason="too_old") == 1
    assert metric(text, "fleetscope_collector_events_refused_total", kind="host_frame", reason="future") == 1
    assert metric(text, "fleetscope_collector_events_refused_total", kind="server_frame", reason="future") == 1
    assert metric(text, "fleetscope_collector_events_ingested_total", kind="step") == 1
    assert metric(text, "fleetscope_collector_events_ingested_total", kind="request") == 2


def test_a_clean_batch_gets_the_reply_it_always_got(client):
    reply = post(client, batch(0, events=[step("llm", 0, 0, time.time() - 1)])).json()
    assert reply == {"agent_id": "agent-a", "seq": 0, "events": 1, "frames": 0, "duplicate": False}


def test_a_batch_of_nothing_but_refused_records_is_acknowledged_and_not_retried(client):
    body = batch(0, events=[step("llm", 0, 0, 9.9e9)])
    got = post(client, body).json()
    assert (got["events"], got["refused"], got["duplicate"]) == (0, 1, False)
    assert post(client, body).json()["duplicate"] is True
    assert client.get("/v1/jobs", headers=R).json()["jobs"] == []


def test_the_future_allowance_and_the_retention_are_settings(tmp_path):
    now = time.time()
    with TestClient(create_app(settings(tmp_path, max_future_skew_s=7200.0, retention_s=3600.0))) as c:
        wait_ready(c)
        got = post(c, batch(0, events=[step("llm", 0, 0, now + 3600), step("llm", 0, 1, now - 7200)])).json()
        assert [(r["index"], r["reason"]) for r in got["refusals"]] == [(1, "too_old")]


def test_a_step_number_that_jumps_is_refused_but_a_restarted_job_may_go_back(client):
    now = time.time()
    post(client, batch(0, events=[step("llm", r, n, now - 100 + n) for n in range(50) for r in (0, 1)]))
    got = post(client, batch(1, events=[
        step("llm", 0, 2**53, now - 40),  # the attack: the job's latest step would be 2^53
        step("llm", 7, 2**53, now - 40),  # a rank the collector has not seen starts where its job is
        step("llm", 0, 50, now - 40),
        step("llm", 1, 49 + 1_000_000, now - 40),  # exactly the allowed jump
        step("llm", 0, 51 + 1_000_001, now - 39),  # one past it (above step 51, the highest so far... 50)
        step("other", 0, 2**40, now - 40),  # a job new to the collector may start anywhere
    ])).json()
    assert [(r["index"], r["reason"]) for r in got["refusals"]] == [(0, "step_jump"), (1, "step_jump"), (4, "step_jump")]
    assert "above the highest step (49) of job 'llm' rank 0" in got["refusals"][0]["message"]
    assert got["events"] == 3
    # a restart from a checkpoint goes back: fine
    got = post(client, batch(2, events=[step("llm", 0, 10, now - 20), step("llm", 1, 10, now - 20)])).json()
    assert "refused" not in got and got["events"] == 2
    assert client.get("/v1/jobs/llm", headers=R).json()["job"]["last_step"] == 49 + 1_000_000
    text = client.get("/metrics", headers=R).text
    assert metric(text, "fleetscope_collector_events_refused_total", kind="step", reason="step_jump") == 3


def test_the_step_history_survives_a_crash_and_a_restart(tmp_path):
    now = time.time()

    def body(seq, events):
        raw = json.dumps(batch(seq, events=events)).encode()
        return decode_batch(raw), raw

    s = Store(tmp_path / "a")
    s.ingest(*body(0, [step("llm", 0, n, now - 60 + n) for n in range(10)]))
    del s  # a crash: the replayed log rebuilds the history
    again = Store(tmp_path / "a")
    assert again.ingest(*body(1, [step("llm", 0, 2**53, now - 30)])).refused == 1
    again.checkpoint()
    again.close()
    # a clean restart: the history comes from the steps the hot tier reads back
    third = Store(tmp_path / "a")
    result = third.ingest(*body(2, [step("llm", 0, 2**53, now - 20), step("llm", 3, 2**53, now - 20), step("llm", 0, 11, now - 20)]))
    assert (result.refused, result.events) == (2, 1)
    assert sorted(third.frame("steps")["step"].to_list()) == [*range(10), 11]


def test_refused_records_never_reach_the_log(tmp_path):
    now = time.time()
    raw = json.dumps(batch(0, events=[step("llm", 0, 0, now - 1), step("llm", 0, 1, 9.9e9)])).encode()
    s = Store(tmp_path / "a")
    assert s.ingest(decode_batch(raw), raw).refused == 1
    (record,) = [payload for _, payload in s.wal.replay(after=0)]
    assert [e.ts for e in decode_batch(record).events] == [now - 1]


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"v": 1, "agent_id": "a", "seq": 0, "node": "n", "sent_ts": 1, "events": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    # msgspec skips what comes before a union's tag, recursively
    b'{"v": 1, "agent_id": "a", "seq": 0, "node": "n", "sent_ts": 1, "events": [{"x": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b', "kind": "step"}]}',
    b'{"v": 1, "agent_id": ' + b"[" * 65 + b"]" * 65 + b"}",
], ids=["array", "in-events", "before-a-tag", "just-past-the-limit"])
def test_deeply_nested_json_is_a_400_that_says_so(client, body):
    resp = client.post("/v1/ingest", content=body, headers=W)
    assert resp.status_code == 400, resp.text
    assert "nested more than 64 levels deep" in resp.json()["detail"]
    assert metric(client.get("/metrics", headers=R).text, "fleetscope_collector_ingest_rejected_total", reason="too_deep") == 1
    assert post(client, batch(0, events=[step("llm", 0, 0, time.time() - 1)])).json()["events"] == 1


def test_nesting_within_the_limit_is_judged_by_the_schema(client):
    body = b'{"v": 1, "agent_id": ' + b"[" * 60 + b"]" * 60 + b', "seq": 0, "node": "n", "sent_ts": 1}'
    resp = client.post("/v1/ingest", content=body, headers=W)
    assert resp.status_code == 422 and "agent_id" in resp.json()["detail"]


def test_the_bounds_and_limits_are_read_from_the_config_file(tmp_path):
    path = tmp_path / "collector.toml"
    path.write_text('[collector]\nmax_future_skew = "2m"\nmax_step_jump = 5000\nmetrics_max_jobs = 10\n'
                    "metrics_max_services = 20\nmetrics_max_ranks = 30\n")
    kwargs, _ = load_config(path)
    s = settings(tmp_path, **kwargs)
    assert (s.max_future_skew_s, s.max_step_jump, s.metrics_max_jobs, s.metrics_max_services, s.metrics_max_ranks) == (
        120.0, 5000, 10, 20, 30)
    path.write_text("[collector]\nmax_step_jump = 1.5\n")
    with pytest.raises(ValueError, match="max_step_jump.*whole number"):
        load_config(path)
    path.write_text("[collector]\nmetrics_max_job = 1\n")
    with pytest.raises(ValueError, match="unknown setting.*'metrics_max_job'"):
        load_config(path)
    with pytest.raises(ValueError, match="metrics_max_ranks must be positive"):
        settings(tmp_path, metrics_max_ranks=0)


def test_the_metrics_export_at_most_the_configured_jobs_services_and_ranks(tmp_path):
    now = time.time()
    limits = {"metrics_max_jobs": 5, "metrics_max_services": 3, "metrics_max_ranks": 4}
    with TestClient(create_app(settings(tmp_path, **limits))) as c:
        wait_ready(c)
        # a job that hangs (its last step ended two minutes ago), then 40 fresher ones
        post(c, batch(0, events=[step("stuck", r, n, now - 200 + n) for n in range(10) for r in range(2)]))
        post(c, batch(1, events=[step(f"flood-{i}", r, n, now - 20 + n) for i in range(40) for n in range(3) for r in range(2)]))
        # a wide job: 16 ranks, rank 5 much slower (a straggler)
        post(c, batch(2, events=[{**step("wide", r, n, now - 30 + n, duration=0.9 if r == 5 else 0.5, world_size=16),
                                  "phases": {"comm": 0.0 if r == 5 else 0.4}} for n in range(25) for r in range(16)]))
        post(c, batch(3, events=[request(now - 5, service=f"svc-{i}") for i in range(20)]
                     + [request(now - 10, service="failing", status="error")]))
        c.app.state.analyse_now()
        findings = c.get("/v1/findings", headers=R).json()["findings"]
        assert {(f["kind"], f["subject"]["job"]) for f in findings} >= {("hang", "stuck"), ("straggler", "wide")}
        text = c.get("/metrics", headers=R).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["training_job"] for f in families.values() for s in f.samples if "training_job" in s.labels}
    assert len(jobs) == 5 and "stuck" in jobs  # the troubled job stays, whatever came after it
    scored = {(s.labels["training_job"], s.labels["rank"]) for s in families["fleetscope_training_straggler_score"].samples}
    assert len(scored) == 4 and ("wide", "5") in scored  # the straggler first, then the highest scores
    active = {(s.labels["kind"], s.labels["training_job"]) for s in families["fleetscope_finding_active"].samples}
    assert {("straggler", "wide"), ("hang", "stuck")} <= active
    services = {s.labels["service"] for s in families["fleetscope_inference_error_ratio"].samples}
    assert len(services) == 3 and "failing" in services
    assert metric(text, "fleetscope_collector_metrics_omitted", kind="job") == 42 - 5
    assert metric(text, "fleetscope_collector_metrics_omitted", kind="service") == 21 - 3
    # everything is still stored and served by the API
    with TestClient(create_app(settings(tmp_path, **limits))) as c:
        wait_ready(c)
        assert len(c.get("/v1/jobs", headers=R).json()["jobs"]) == 42


def test_every_shipped_scrape_job_has_a_sample_limit():
    from pathlib import Path

    import yaml

    from fleetscope.demo import prometheus_config

    root = Path(__file__).resolve().parents[2]
    for name, config in (("deploy/prometheus.yml", (root / "deploy/prometheus.yml").read_text()),
                         ("fleetscope demo", prometheus_config(2, "token", []))):
        jobs = yaml.safe_load(config)["scrape_configs"]
        assert {j["job_name"] for j in jobs} == {"fleetscope-agent", "fleetscope-collector"}, name
        # generous for an agent (about 1,700 series with 8 GPUs) and the collector at its default limits
        assert all(j.get("sample_limit") == 20000 for j in jobs), name
