"""Durability faults injected into a real collector process: a file-size limit and a full file system
(ENOSPC), SIGKILL at each step of a checkpoint, a slow log replay; every acknowledged batch is still
there afterwards, once, and the collector recovers by itself."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from collector.store import Store
from tests.conftest import free_port, wait_until
from tests.e2e.conftest import INGEST, READ, gauge

ENV = {"FLEETSCOPE_INGEST_TOKEN": INGEST, "FLEETSCOPE_READ_TOKEN": READ}
W = {"Authorization": f"Bearer {INGEST}"}
R = {"Authorization": f"Bearer {READ}"}


class Collector:
    def __init__(self, data_dir: Path, log: Path, *, fsize: int | None = None, fault: str | None = None,
                 config: Path | None = None, checkpoint_interval: str = "1s") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{self.port}",
                "--data-dir", str(data_dir), "--checkpoint-interval", checkpoint_interval]
        if config is not None:
            argv += ["--config", str(config)]
        env = {**os.environ, **ENV}
        if fault:
            env["FLEETSCOPE_FAULT"] = fault

        def limits() -> None:
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.log = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, preexec_fn=limits)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def healthz(self) -> tuple[int, dict]:
        r = self.client.get("/healthz")
        return r.status_code, r.json()

    def wait_ready(self) -> None:
        wait_until(lambda: self.healthz()[0] == 200, timeout=60, what="the collector to be ready")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)
        self.client.close()
        self.log.close()


@pytest.fixture
def collectors(tmp_path):
    started: list[Collector] = []

    def start(**kw) -> Collector:
        c = Collector(tmp_path / "data", tmp_path / "collector.log", **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        c.kill()


def body(seq: int, agent: str = "agent-a", events: int = 200) -> bytes:
    now = time.time()
    return json.dumps({"v": 1, "agent_id": agent, "seq": seq, "node": "n1", "sent_ts": now, "events": [
        {"v": 1, "kind": "step", "job": "durable", "rank": i % 50, "world_size": 50, "step": seq * 10 + i // 50,
         "ts": now, "duration_s": 0.5, "phases": {"data": 0.1, "forward": 0.1, "backward": 0.2, "optimizer": 0.05}}
        for i in range(events)]}).encode()


def send_until_acknowledged(c: Collector, seq: int, refusals: list, *, deadline_s: float = 60) -> None:
    """As the agent does: resend the same batch until the collector acknowledges it."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            r = c.client.post("/v1/ingest", content=body(seq), headers=W)
            if r.status_code == 200:
                return
            assert r.status_code == 503, (r.status_code, r.text)
            refusals.append((seq, r.json()["detail"]))
        except httpx.HTTPError as exc:
            refusals.append((seq, str(exc)))
        assert time.monotonic() < deadline, f"batch {seq} never acknowledged: {refusals[-3:]}"
        time.sleep(0.2)


def stored_steps(data_dir: Path) -> list[tuple[int, int]]:
    """(rank, step) of every row on disk and in the WAL, read by a store of our own."""
    store = Store(data_dir, memory_budget=512 * 2**20)
    rows = store.scan("steps").select("rank", "step").collect().rows()
    store.wal.close()
    return sorted(rows)


def committed_segment(data_dir: Path) -> int:
    """The WAL segment the last committed checkpoint covers (each checkpoint, failed or not, takes the next one)."""
    path = data_dir / "checkpoint.json"
    return json.loads(path.read_bytes())["segment"] if path.exists() else -1


def wait_for_two_checkpoints(data_dir: Path) -> None:
    """Until two more checkpoints have committed: the second one began after every batch acknowledged so far
    (a checkpoint already under way when this is called may have rotated the WAL before the last of them)."""
    start = committed_segment(data_dir)
    wait_until(lambda: committed_segment(data_dir) >= start + 2, timeout=60, interval=0.1,
               what=f"two checkpoints after segment {start}")


EXPECTED = lambda batches: sorted((i % 50, seq * 10 + i // 50) for seq in range(batches) for i in range(200))  # noqa: E731


def test_a_file_size_limit_refuses_batches_with_503_and_every_acknowledged_one_survives(collectors, tmp_path):
    c = collectors(fsize=1_500_000, checkpoint_interval="2s")
    c.wait_ready()
    refusals: list = []
    unhealthy = []
    for seq in range(60):
        send_until_acknowledged(c, seq, refusals)
        status, health = c.healthz()
        if status != 200:
            unhealthy.append(health)
    assert refusals, "the WAL never reached the file-size limit: the test proves nothing"
    assert any("log" in detail for _, detail in refusals)
    assert all(h["status"] == "cannot_write" and h["reason"] for h in unhealthy)
    c.kill()
    assert stored_steps(tmp_path / "data") == EXPECTED(60)


def test_a_full_file_system_is_survived_and_the_collector_recovers_by_itself(collectors, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the file-size-limit test covers the refused append")
    try:
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * 3_000_000)
        c = Collector(small / "data", tmp_path / "collector.log", checkpoint_interval="1s")
        try:
            c.wait_ready()
            refusals: list = []
            seq = 0
            while not refusals and seq < 200:  # fill the disk
                r = c.client.post("/v1/ingest", content=body(seq), headers=W)
                if r.status_code == 200:
                    seq += 1
                else:
                    assert r.status_code == 503, r.text
                    refusals.append(r.json()["detail"])
            assert refusals, "the disk never filled"
            wait_until(lambda: c.healthz()[0] == 503, timeout=30, what="/healthz to say the store cannot write")
            assert c.healthz()[1]["status"] == "cannot_write"
            # What FleetscopeCollectorStorageFailing and FleetscopeCollectorCheckpointStale read: no checkpoint commits.
            assert gauge(c.url + "/metrics", "fleetscope_collector_storage_writable", READ) == 0
            stuck = gauge(c.url + "/metrics", "fleetscope_collector_last_checkpoint_timestamp_seconds", READ)
            time.sleep(2.5)  # two checkpoint intervals, each failing
            assert gauge(c.url + "/metrics", "fleetscope_collector_last_checkpoint_timestamp_seconds", READ) == stuck
            assert c.client.get("/v1/jobs", headers=R).status_code == 200  # reads keep working
            # The probes Kubernetes uses: still ready to serve reads, and alive (no restart, which frees no disk).
            assert c.client.get("/readyz").status_code == 200 and c.client.get("/readyz").json()["ingest"] == "cannot_write"
            assert c.client.get("/livez").status_code == 200
            ballast.unlink()  # space returns
            acknowledged = seq
            for more in range(acknowledged, acknowledged + 10):
                send_until_acknowledged(c, more, refusals)
            wait_until(lambda: c.healthz()[0] == 200, timeout=30, what="the collector to recover by itself")
            assert gauge(c.url + "/metrics", "fleetscope_collector_storage_writable", READ) == 1
            wait_until(lambda: gauge(c.url + "/metrics", "fleetscope_collector_last_checkpoint_timestamp_seconds", READ) > stuck, timeout=30,
                       what="a checkpoint to commit after space returned")
        finally:
            c.kill()
        assert stored_steps(small / "data") == EXPECTED(acknowledged + 10)
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# A checkpoint every half second: each test below waits for the faulty one (the second) and for two more after it.
QUICK = "0.5s"
CHECKPOINT_STEPS = ["checkpoint.rotated", "checkpoint.part_written", "checkpoint.extras_written",
                    "checkpoint.commit_file_written", "checkpoint.committed", "checkpoint.wal_dropped"]


def slo_config(tmp_path: Path) -> Path:
    """A config with an SLO, so that a checkpoint writes the SLO ledger's state too."""
    config = tmp_path / "collector.toml"
    config.write_text('[[slo]]\nname = "x"\nservice = "s"\nindicator = "availability"\nobjective = 0.99\n')
    return config


@pytest.mark.parametrize("point", CHECKPOINT_STEPS)
def test_sigkill_at_each_step_of_a_checkpoint_loses_and_duplicates_nothing(collectors, tmp_path, point):
    config = slo_config(tmp_path)
    c = collectors(fault=f"{point}=kill@2", config=config, checkpoint_interval=QUICK)
    c.wait_ready()
    refusals: list = []
    seq = 0
    while c.proc.poll() is None and seq < 300:
        try:
            r = c.client.post("/v1/ingest", content=body(seq), headers=W)
        except httpx.HTTPError:
            break  # killed mid-request: that batch was never acknowledged
        if r.status_code == 200:
            seq += 1
        time.sleep(0.02)
    c.proc.wait(timeout=30)
    assert c.proc.returncode == -signal.SIGKILL, "the fault never fired"
    again = collectors(config=config, checkpoint_interval=QUICK)
    again.wait_ready()
    for more in range(seq, seq + 5):  # the agent resends the unacknowledged batch, then goes on
        send_until_acknowledged(again, more, refusals)
    wait_for_two_checkpoints(tmp_path / "data")  # the restarted collector checkpoints what it replayed, once
    again.kill()
    assert stored_steps(tmp_path / "data") == EXPECTED(seq + 5)


@pytest.mark.parametrize("point", CHECKPOINT_STEPS)
def test_an_error_at_each_step_of_a_checkpoint_is_survived_and_loses_and_duplicates_nothing(collectors, tmp_path, point):
    """The checkpoint fails (an OSError, as a full disk or an I/O error gives) at one step, in a real collector that
    goes on running: the next checkpoints write its rows again, once, and after a restart every acknowledged batch is
    there exactly once."""
    config = slo_config(tmp_path)
    c = collectors(fault=f"{point}=raise@2", config=config, checkpoint_interval=QUICK)
    c.wait_ready()
    refusals: list = []
    seq = 0
    log = tmp_path / "collector.log"
    deadline = time.monotonic() + 30
    while f"fault injected at {point}" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the fault never fired"
        send_until_acknowledged(c, seq, refusals)
        seq += 1
        time.sleep(0.05)
    for more in range(seq, seq + 5):  # ingest goes on through the failed checkpoint
        send_until_acknowledged(c, more, refusals)
    seq += 5
    wait_until(lambda: c.healthz()[0] == 200, timeout=30, what="a later checkpoint to succeed")
    wait_for_two_checkpoints(tmp_path / "data")  # a checkpoint or two after it
    assert c.proc.poll() is None, "the collector died of a failed checkpoint"
    c.kill()
    assert stored_steps(tmp_path / "data") == EXPECTED(seq)
    again = collectors(config=config, checkpoint_interval=QUICK)  # and a restart replays and reads it back the same
    again.wait_ready()
    again.kill()
    assert stored_steps(tmp_path / "data") == EXPECTED(seq)


def test_healthz_says_starting_until_the_log_is_replayed(collectors, tmp_path):
    c = collectors(checkpoint_interval="1h")
    c.wait_ready()
    for seq in range(20):
        assert c.client.post("/v1/ingest", content=body(seq), headers=W).status_code == 200
    c.kill()
    slow = collectors(fault="open.replaying=sleep:4", checkpoint_interval="1h")
    # Every phase before ready answers 503 "starting"; the earlier ones (the checkpoint, the hot tier) can be
    # seen first on a slow machine, so wait for the replay's, which the fault holds for 4 s.
    seen = []

    def replaying():
        status, health = slow.healthz()
        if status == 503:
            seen.append(health)
        return (status, health) if health.get("phase") == "replaying the write-ahead log" else None

    status, health = wait_until(replaying, timeout=30, what="/healthz to say it replays the log")
    assert status == 503 and health == {"status": "starting", "phase": "replaying the write-ahead log"}, seen
    assert all(h["status"] == "starting" for h in seen), seen
    assert slow.client.get("/livez").status_code == 200  # alive while it replays: no liveness restart loop
    r = slow.client.post("/v1/ingest", content=body(20), headers=W)
    assert r.status_code == 503 and "starting" in r.json()["detail"]
    slow.wait_ready()
    assert slow.client.post("/v1/ingest", content=body(20), headers=W).status_code == 200
    slow.kill()
    assert stored_steps(tmp_path / "data") == EXPECTED(21)
