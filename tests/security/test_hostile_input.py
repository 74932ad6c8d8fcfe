"""Hostile input against a real collector over HTTP, each attack as the security review (issue 12) ran it.

Each test asserts that the attack fails and that the legitimate traffic around it is stored exactly once.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.traces import Trace, generate
from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.security.conftest import INGEST, READ

ROOT = Path(__file__).resolve().parents[2]
# An analysis pass every second rather than every 5 s (the default): each attack waits for a finding and then for
# a pass after the attack, and the attacks, not the analysis' cadence, are what these tests are about.
QUICK_ANALYSIS = '[collector]\nanalysis_interval = "1s"\n'


@pytest.fixture
def collector(collector_with):
    """A real collector at its defaults but for the analysis interval (this module's own, over conftest's)."""
    return collector_with(QUICK_ANALYSIS)


# --- speaking to the collector ------------------------------------------------------------------
def step(job, rank, n, ts, duration=1.0, world_size=2, **kw):
    return {"v": 1, "kind": "step", "job": job, "rank": rank, "world_size": world_size, "step": n, "ts": ts,
            "duration_s": duration, "node": f"node-{rank}", **kw}


def request(ts, status="ok"):
    return {"v": 1, "kind": "request", "service": "chat", "model": "m", "ts": ts, "e2e_s": 0.2, "status": status}


def post(collector, agent: str, seq: int, events: list) -> httpx.Response:
    body = {"v": 1, "agent_id": agent, "seq": seq, "node": "node-0", "sent_ts": time.time(), "events": events}
    return post_raw(collector, json.dumps(body).encode())


def post_raw(collector, body: bytes) -> httpx.Response:
    return httpx.post(collector.url + "/v1/ingest", content=body, headers={"Authorization": f"Bearer {INGEST}"}, timeout=60)


def get(collector, path: str) -> dict:
    status, body = http_get(collector.url + path, READ, timeout=30)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def metrics(collector) -> str:
    status, body = http_get(collector.url + "/metrics", READ, timeout=30)
    assert status == 200
    return body.decode()


def samples(text: str, name: str, **labels) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels) -> float | None:
    found = samples(text, name, **labels)
    return found[0].value if found else None


def analysed_since(collector, marker_job: str) -> bool:
    """Whether an analysis pass has run since `marker_job` was ingested (its progress is a signal of one)."""
    return value(metrics(collector), "fleetscope_training_last_progress_age_seconds", training_job=marker_job) is not None


def active(collector, kind: str, job: str) -> list[dict]:
    return [f for f in get(collector, f"/v1/findings?kind={kind}&job={job}")["findings"] if f["active"]]


def steps_by_rank(collector, job: str) -> dict[int, int]:
    return {r["rank"]: r["steps"] for r in get(collector, f"/v1/jobs/{job}?top=100000")["ranks"]}


# --- the attacks ----------------------------------------------------------------------------------
def test_a_step_dated_far_ahead_does_not_hide_a_due_hang(collector):
    now = time.time()
    # Two ranks whose last step ended two minutes ago: silent for longer than max(3 x 1 s, 30 s), a hang.
    assert post(collector, "node-a", 0, [step("stalled", r, n, now - 130 + n) for n in range(10) for r in range(2)]).json()["events"] == 20
    wait_until(lambda: active(collector, "hang", "stalled"), timeout=30, what="the hang finding")
    # The attack: one step of the job dated 2283 (it would make the job look busy until then), in a batch
    # that also carries a legitimate step of another job.
    reply = post(collector, "node-b", 0, [step("stalled", 0, 10, 9.9e9), step("bystander", 0, 0, time.time() - 1)])
    assert reply.status_code == 200
    wait_until(lambda: analysed_since(collector, "bystander"), timeout=30, what="an analysis after the attack")
    assert active(collector, "hang", "stalled"), "the hang finding was resolved by a step dated 2283"
    assert get(collector, "/v1/jobs/stalled")["job"]["last_step"] == 9
    assert steps_by_rank(collector, "stalled") == {0: 10, 1: 10} and steps_by_rank(collector, "bystander") == {0: 1}
    got = reply.json()  # the sender is told what was refused, and why
    assert (got["events"], got.get("refused")) == (1, 1)
    assert (got["refusals"][0]["index"], got["refusals"][0]["reason"]) == (0, "future")
    assert value(metrics(collector), "fleetscope_collector_events_refused_total", kind="step", reason="future") == 1


def test_a_step_numbered_2_to_the_53_does_not_push_the_real_steps_out_of_the_analysis(collector):
    now = time.time()
    # 8 ranks, 40 steps of 20 s, rank 6 computing 15% longer: a straggler (a hang is 60 s of silence away).
    trace, _ = generate(Trace(job="train", ranks=8, steps=40, step_s=20.0, slow_rank=6, slow_factor=0.15, start_ts=0.0))
    shift = now - 2 - max(r["ts"] + r["duration_s"] for r in trace.iter_rows(named=True))  # the last step just ended
    events = [step("train", r["rank"], r["step"], r["ts"] + shift, r["duration_s"], world_size=8, node=r["node"],
                   phases={k: r[f"phase_{k}_s"] for k in ("data", "forward", "backward", "optimizer")},
                   metrics={"sync_arrival_s": r["sync_arrival_s"]}) for r in trace.iter_rows(named=True)]
    assert post(collector, "node-a", 0, events).json()["events"] == 320
    wait_until(lambda: active(collector, "straggler", "train"), timeout=30, what="the straggler finding")
    # The attack: step 2^53 for a rank of the job and for a rank it does not have, beside the job's real
    # next step (rank 6 still slow) and a step of another job.
    last = [e for e in events if e["step"] == 39]
    following = [{**e, "step": 40, "ts": e["ts"] + e["duration_s"]} for e in last]
    attack = [step("train", 0, 2**53, now - 1, world_size=8), step("train", 99, 2**53, now - 1, world_size=100)]
    reply = post(collector, "node-b", 0, [*attack, *following, step("marker", 0, 0, now - 1)])
    assert reply.status_code == 200
    wait_until(lambda: analysed_since(collector, "marker"), timeout=30, what="an analysis after the attack")
    assert [f["subject"]["rank"] for f in active(collector, "straggler", "train")] == [6]
    assert get(collector, "/v1/jobs/train")["job"]["last_step"] == 40
    assert steps_by_rank(collector, "train") == {r: 41 for r in range(8)}
    series = get(collector, "/v1/jobs/train/steps?last=1000")["steps"]
    assert [s["step"] for s in series] == list(range(41)) and all(s["ranks"] == 8 for s in series)
    got = reply.json()
    assert (got["events"], got.get("refused")) == (9, 2)
    assert [(r["index"], r["reason"]) for r in got["refusals"]] == [(0, "step_jump"), (1, "step_jump")]


SLO = """
[[slo]]
name = "chat-availability"
service = "chat"
indicator = "availability"
objective = 0.99
"""


def test_requests_dated_a_year_ahead_do_not_dilute_a_burning_slo(collector_with):
    collector = collector_with(QUICK_ANALYSIS + SLO)
    now = time.time()
    # Half the requests of the last two minutes fail: 0.5 bad over a 1% budget burns it 50 times too fast.
    real = [request(now - 120 + i * 0.12, "error" if i % 2 else "ok") for i in range(1000)]
    assert post(collector, "node-a", 0, real).json()["events"] == 1000

    def burn_5m() -> float | None:
        return value(metrics(collector), "fleetscope_slo_burn_rate", slo="chat-availability", window="5m")

    wait_until(lambda: burn_5m() == pytest.approx(50.0, rel=0.02), timeout=30, what="a 50x burn rate")
    # The attack: 200,000 good requests dated a year ahead (in four batches under the body limit); the
    # last batch also carries the service's real traffic of the moment and a step of a job.
    year = 365 * 86400.0
    replies = []
    for seq in range(4):
        events = [request(now + year + i * 0.001) for i in range(50_000)]
        if seq == 3:
            events += [request(time.time() - 1, "error" if i % 2 else "ok") for i in range(100)]
            events.append(step("marker", 0, 0, time.time() - 1))
        replies.append(post(collector, "attacker", seq, events))
        assert replies[-1].status_code == 200
    wait_until(lambda: analysed_since(collector, "marker"), timeout=30, what="an analysis after the attack")
    assert burn_5m() == pytest.approx(50.0, rel=0.02), "future-dated good requests diluted the burn rate"
    (model,) = get(collector, "/v1/services/chat")["models"]
    assert model["requests"] == 1100
    for seq, reply in enumerate(replies):
        got = reply.json()
        assert got.get("refused") == 50_000 and len(got["refusals"]) == 100
        assert {(r["kind"], r["reason"]) for r in got["refusals"]} == {("request", "future")}
        assert got["events"] == (101 if seq == 3 else 0)
    text = metrics(collector)
    assert value(text, "fleetscope_collector_events_refused_total", kind="request", reason="future") == 200_000
    assert value(text, "fleetscope_collector_events_ingested_total", kind="request") == 1100


def test_deeply_nested_json_is_a_400_not_a_500(collector):
    deep = b"[" * 100_000 + b"]" * 100_000
    in_a_batch = (b'{"v": 1, "agent_id": "node-b", "seq": 0, "node": "n", "sent_ts": 1, "events": [{"phases": '
                  + deep + b', "kind": "step"}]}')
    for body in (deep, in_a_batch):
        resp = post_raw(collector, body)
        assert resp.status_code == 400, resp.text[:300]
        assert "nested more than 64 levels deep" in resp.json()["detail"]
    assert http_get(collector.url + "/healthz")[0] == 200
    assert post(collector, "node-a", 0, [step("after", 0, n, time.time() - 10 + n) for n in range(3)]).json()["events"] == 3
    assert post(collector, "node-a", 0, [step("after", 0, n, time.time() - 10 + n) for n in range(3)]).json()["duplicate"]
    assert steps_by_rank(collector, "after") == {0: 3}
    assert value(metrics(collector), "fleetscope_collector_ingest_rejected_total", reason="too_deep") == 2


def test_five_thousand_job_names_do_not_make_the_collector_metrics_exceed_the_scrape_limit(collector, procs, tmp_path):
    shipped = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "fleetscope-collector"]
    limit = job["sample_limit"]
    prometheus = require_binary("prometheus")
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "fleetscope-collector", "sample_limit": limit, "authorization": {"credentials": READ},
                                  "static_configs": [{"targets": [f"127.0.0.1:{collector.port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = f"http://127.0.0.1:{free_port()}"
    procs("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address={prom.removeprefix('http://')}"])

    def query(expr: str) -> list:
        status, body = http_get(f"{prom}/api/v1/query?query=" + urllib.parse.quote(expr))
        return json.loads(body)["data"]["result"] if status == 200 else []

    now = time.time()
    assert post(collector, "node-a", 0, [step("stalled", r, n, now - 130 + n) for n in range(10) for r in range(2)]).json()["events"] == 20
    wait_until(lambda: active(collector, "hang", "stalled"), timeout=30, what="the hang finding")
    # The attack: 5,000 job names, one step each (steps of 590 s: none of them will look hung during the
    # test), beside a legitimate step of another job.
    flood = [step(f"job-{i:04d}", 0, 0, now - 590, duration=590.0) for i in range(5000)]
    assert post(collector, "node-b", 0, [*flood, step("bystander", 0, 0, now - 1)]).json()["events"] == 5001
    jobs = 5002
    # The hung job's silence, as an analysis pass measures it, tells a pass that began after the flood.
    after = time.time() - (now - 120)
    age = 'fleetscope_training_last_progress_age_seconds{training_job="stalled"}'
    wait_until(lambda: (value(metrics(collector), age.split("{")[0], training_job="stalled") or 0) >= after,
               timeout=60, what="an analysis after the flood")
    # Prometheus, with the shipped limit, keeps scraping the collector: a scrape after that pass succeeds
    # (one over the limit fails whole, and all the collector's series go stale).
    wait_until(lambda: [r for r in query(age) if float(r["value"][1]) >= after], timeout=60,
               what="Prometheus to scrape the collector after the flood (within its sample_limit)")
    (up,) = query('up{job="fleetscope-collector"}')
    assert up["value"][1] == "1"
    text = metrics(collector)
    count = sum(len(f.samples) for f in text_string_to_metric_families(text))
    assert count < limit, f"the collector serves {count} samples, over the shipped sample_limit of {limit}"
    shown = {s.labels["training_job"] for f in text_string_to_metric_families(text) for s in f.samples if "training_job" in s.labels}
    assert len(shown) <= 500 and "stalled" in shown  # the troubled job stays on /metrics
    assert samples(text, "fleetscope_finding_active", kind="hang", training_job="stalled")
    assert value(text, "fleetscope_collector_metrics_omitted", kind="job") == jobs - 500
    # Everything was stored, once, and the query API lists it.
    assert len(get(collector, "/v1/jobs")["jobs"]) == jobs
    assert steps_by_rank(collector, "bystander") == {0: 1} and steps_by_rank(collector, "stalled") == {0: 10, 1: 10}
