"""The pod of each training rank and inference replica on Kubernetes, through the real app: ingest, the job and the
service answers, the same after a restart, and nothing of it in the collector's /metrics."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from collector.api import create_app
from collector.pods import PodLinks
from tests.collector.test_api import R, batch, post, settings
from tests.collector.test_slurm import frame
from tests.conftest import wait_ready

T0 = float(int(time.time()) - 900)
VERIFIED = {"namespace": "training", "pod": "llm-worker-0", "container": "trainer", "verified": True}


def step(rank: int, n: int, pod: dict | None, ts: float) -> dict:
    event = {"v": 1, "kind": "step", "job": "llm", "rank": rank, "world_size": 2, "step": n, "ts": ts,
             "duration_s": 1.0, "pid": 100 + rank, "node": f"gpu-{rank}"}
    return {**event, "pod": pod} if pod is not None else event


def request(pod: dict | None, node: str, ts: float, model: str = "llama") -> dict:
    event = {"v": 1, "kind": "request", "service": "chat", "model": model, "ts": ts, "e2e_s": 0.5, "pid": 7,
             "node": node}
    return {**event, "pod": pod} if pod is not None else event


EVENTS = ([step(0, n, VERIFIED, T0 + n) for n in range(5)]
          # rank 1 over UDP: the client's own description, unverified; then its pod restarted under a new name
          + [step(1, n, {"namespace": "training", "pod": "llm-worker-1"}, T0 + n) for n in range(3)]
          + [step(1, n, {"namespace": "training", "pod": "llm-worker-1-b"}, T0 + n) for n in range(3, 5)]
          + [request({"namespace": "serving", "pod": "vllm-0", "container": "vllm", "verified": True}, "gpu-0", T0 + i)
             for i in range(4)]
          + [request({"namespace": "serving", "pod": "vllm-1"}, "gpu-1", T0 + 10, model="llama-lora")]
          + [request(None, "gpu-2", T0 + 11)])  # a replica outside Kubernetes names no pod


def test_ranks_and_replicas_show_their_pods_on_the_api_and_keep_them_across_a_restart(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        assert post(client, batch(0, EVENTS)).status_code == 200
        job = client.get("/v1/jobs/llm", headers=R).json()
        service = client.get("/v1/services/chat", headers=R).json()
        metrics = client.get("/metrics", headers=R).text
    assert job["pods"] == [
        {"rank": 0, "namespace": "training", "pod": "llm-worker-0", "container": "trainer", "verified": True,
         "node": "gpu-0", "last_step_ts": T0 + 4},
        {"rank": 1, "namespace": "training", "pod": "llm-worker-1-b", "container": None, "verified": False,
         "node": "gpu-1", "last_step_ts": T0 + 4}]
    assert {r["rank"] for r in job["ranks"]} == {0, 1}
    replicas = service["replicas"]
    assert [(r["node"], r["pod"], r["verified"], r["requests"], r["models"]) for r in replicas] == [
        ("gpu-1", "vllm-1", False, 1, ["llama-lora"]), ("gpu-0", "vllm-0", True, 4, ["llama"])]
    assert replicas[1]["container"] == "vllm" and replicas[1]["first_request_ts"] == T0
    assert "vllm-0" not in metrics and "llm-worker" not in metrics  # no pod label on the collector's series

    with TestClient(create_app(settings(tmp_path))) as client:  # from the checkpoint
        wait_ready(client)
        assert client.get("/v1/jobs/llm", headers=R).json()["pods"] == job["pods"]
        assert client.get("/v1/services/chat", headers=R).json()["replicas"] == replicas


def test_links_unit_only_the_ranks_asked_a_verified_reading_wins_and_retention():
    pods = PodLinks(retention_s=60)
    rows = [{"job": "a", "rank": r, "step": 1, "ts": time.time(), "duration_s": 1.0, "node": "n",
             "pod": '{"namespace":"ns","pod":"p%d"}' % r} for r in range(4)]
    pods.observe("steps", frame(rows))
    pods.observe("steps", frame([{**rows[0], "pod": None}]))  # a step without a pod leaves the rank's pod alone
    assert [p["pod"] for p in pods.ranks("a", [3, 1, 99])] == ["p1", "p3"]
    assert len(pods.ranks("a")) == 4 and pods.ranks("nope") == []
    restored = PodLinks()
    restored.restore(pods.snapshot())
    assert restored.ranks("a") == pods.ranks("a")
    old = PodLinks(retention_s=60)
    old.observe("steps", frame([{**rows[0], "ts": time.time() - 3600}]))
    old.restore(old.snapshot())
    assert old.ranks("a") == []
