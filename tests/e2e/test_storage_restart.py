"""A collector killed with SIGKILL and restarted answers as it did: with every kind of data it holds (steps,
requests, pauses, GPU and host frames, inference-server frames, SLO counts) both in Parquet and only
in the WAL, with its config file and without one."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_storage_faults import R, W, Collector

SLOS = """
[collector]
cluster = "restart-test"

[[slo]]
name = "chat-ttft"
service = "chat"
indicator = "ttft"
threshold_s = 0.3
objective = 0.99

[[slo]]
name = "scraped-e2e"
service = "scraped"
indicator = "e2e"
threshold_s = 1.0
objective = 0.99
"""


def batch(seq: int, t0: float) -> bytes:
    steps = [{"v": 1, "kind": "step", "job": "train", "rank": r, "world_size": 4, "step": seq * 10 + s, "ts": t0 + s,
              "duration_s": 1.0 + 0.1 * r, "tokens": 1000, "phases": {"data": 0.1, "forward": 0.3, "comm": 0.2},
              "metrics": {"loss": 2.0}} for s in range(10) for r in range(4)]
    requests = [{"v": 1, "kind": "request", "service": "chat", "model": "m", "ts": t0 + i / 10, "e2e_s": 0.5,
                 "ttft_s": 0.1 if i % 10 else 0.9, "output_tokens": 20, "status": "error" if i % 25 == 0 else "ok"}
                for i in range(100)]
    pauses = [{"v": 1, "kind": "pause", "job": "train", "rank": 0, "world_size": 4, "reason": "checkpoint",
               "phase": phase, "ts": t0 + 1, **({"duration_s": 2.0} if phase == "end" else {})} for phase in ("begin", "end")]
    frames = [{"v": 1, "kind": "host", "node": "n1", "ts": t0 + k * 5, "cpu_utilization_ratio": 0.4,
               "network_receive_bytes_total": 1e6 * (seq * 10 + k), "gpus": [
                   {"index": i, "uuid": f"GPU-{i}", "utilization_ratio": 0.9, "temperature_celsius": 70.0 + i,
                    "clock_event_mask": 0x40 if i == 1 else 0, "health": "degraded" if i == 1 else "healthy",
                    "health_reasons": ["hw_thermal_slowdown"] if i == 1 else [], "xid_total": seq if i == 2 else 0,
                    "xid_counts": {"13": seq} if i == 2 and seq else {}} for i in range(4)]} for k in range(2)]
    servers = [{"v": 1, "service": "scraped", "model": "m", "server": "http://s", "kind": "vllm", "ts": t0, "interval_s": 5.0,
                "histograms": {"e2e": {"le": [0.5, 1.0, 1e300], "counts": [5.0, 9.0, 10.0], "sum": 6.0, "count": 10.0}},
                "counters": {"requests_ok": 10.0}, "gauges": {"running": 2.0}}]
    return json.dumps({"v": 1, "agent_id": "agent-1", "seq": seq, "node": "n1", "sent_ts": t0,
                       "events": [*steps, *requests, *pauses], "frames": frames, "servers": servers}).encode()


PATHS = ["/v1/jobs", "/v1/jobs/train", "/v1/jobs/train/steps", "/v1/nodes", "/v1/gpus", "/v1/services", "/v1/services/chat",
         "/v1/services/scraped", "/v1/gpus/GPU-2/history", "/v1/nodes/n1/history", "/v1/slos"]
VOLATILE = {"age_s", "as_of", "since", "until", "silence_s", "error_budget_remaining_ratio"}


def answers(c: Collector) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return round(value, 6) if isinstance(value, float) else value
    out = {}
    for path in PATHS:
        r = c.client.get(path, headers=R)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        out[path] = strip(r.json())
    return out


@pytest.mark.parametrize("with_config", [True, False])
def test_a_restart_answers_as_before_with_data_on_disk_and_in_the_log(tmp_path, with_config):
    config = tmp_path / "collector.toml"
    config.write_text(SLOS)
    args = {"config": config} if with_config else {}
    c = Collector(tmp_path / "data", tmp_path / "a.log", checkpoint_interval="2s", **args)
    try:
        c.wait_ready()
        t0 = time.time() - 120
        for seq in range(3):  # checkpointed into Parquet ...
            assert c.client.post("/v1/ingest", content=batch(seq, t0 + seq * 10), headers=W).status_code == 200
        time.sleep(3)
        assert list((tmp_path / "data").glob("kind=requests/date=*/hour=*/*.parquet"))
        for seq in range(3, 5):  # ... and only in the WAL
            assert c.client.post("/v1/ingest", content=batch(seq, t0 + seq * 10), headers=W).status_code == 200
        before = answers(c)
        slos = {s["slo"]: s for s in before["/v1/slos"]["slos"]}
        if with_config:
            assert slos["chat-ttft"]["requests"] == 500 and slos["scraped-e2e"]["requests"] == 50
        metrics = c.client.get("/metrics", headers=R).text
        assert ('cluster="restart-test"' in metrics) == with_config
    finally:
        c.kill()  # SIGKILL: no final checkpoint
    again = Collector(tmp_path / "data", tmp_path / "b.log", checkpoint_interval="2s", **args)
    try:
        again.wait_ready()
        after = answers(again)
        for path in PATHS:
            assert after[path] == before[path], path
        assert after["/v1/jobs"]["jobs"][0]["step_events"] == 200
        assert after["/v1/gpus/GPU-2/history"]["record"]["xids_by_code"] == {"13": 4}
    finally:
        again.kill()
