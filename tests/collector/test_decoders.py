"""Ingest through worker processes (collector.decoders): the same replies, the same rows, the same ledger as without.

The shortcuts the collector's process takes with a worker's summary (collector.bounds.quick_screen, the goodput
ledger's StepSummary) are checked against the paths they skip, on batches made to hit every way out of them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.bounds import Bounds, StepHistory, quick_screen, screen
from collector.decoders import prepare
from collector.goodput_ledger import GoodputLedger, summarize
from collector.settings import Settings
from collector.tables import frame_from_rows
from fleetscope.schema import decode_batch
from tests.collector.test_goodput import T0, pause, run
from tests.conftest import wait_ready, wait_until

FLEET, READ = "fleet-secret", "read-secret"
RANKS = 4  # as tests.collector.test_goodput.run makes them
W, R = {"Authorization": f"Bearer {FLEET}"}, {"Authorization": f"Bearer {READ}"}


# --- the ledger's summary path ---------------------------------------------------------------------------------
def batches_of_a_job_with_restarts() -> list[tuple[list[dict], list[dict]]]:
    """(steps, pauses) batches: a job running on, a restart that goes back, a new rank, a pid change, a rank
    out of step order, two jobs in one batch, pauses begun and ended."""
    out = []
    out.append((run(0, 9, t=T0, pid=100), []))  # first steps: declared starts, the rows' path
    out.append((run(10, 24, t=T0 + 10, pid=100, more=True), []))  # goes on: the summary's path
    out.append((run(25, 30, t=T0 + 25, pid=100, more=True, data=lambda s, r: 0.01 * r,
                    compute=lambda s, r: 0.5 + 0.1 * r), []))
    out.append((run(31, 33, t=T0 + 31, pid=100, more=True), pause("checkpoint", T0 + 33.5, T0 + 34)))
    out.append((run(34, 40, t=T0 + 35, pid=100, more=True), []))  # the rank's pause ended by its next step
    out.append((run(20, 28, t=T0 + 50, pid=200, restored=20), []))  # restarted from step 20: a new incarnation
    out.append((run(29, 35, t=T0 + 59, pid=200, more=True), []))
    other = run(0, 3, t=T0 + 60, pid=300, job="other")
    out.append((run(36, 38, t=T0 + 66, pid=200, more=True) + other, []))  # two jobs, one new
    out.append((run(39, 45, t=T0 + 69, pid=200, more=True) + run(4, 9, t=T0 + 64, pid=300, job="other", more=True), []))
    out.append((run(46, 50, t=T0 + 76, pid=200, more=True, ranks=RANKS + 1), []))  # a rank new to the job
    out.append((run(51, 55, t=T0 + 81, pid=200, more=True, ranks=RANKS + 1), []))
    back = run(56, 60, t=T0 + 86, pid=200, more=True)
    back[0], back[-1] = back[-1], back[0]  # a rank's step 60 before its 56: the rows' path
    out.append((back, []))
    out.append((run(61, 64, t=T0 + 91, pid=201, more=True), []))  # another process, no declared start
    out.append((run(65, 70, t=T0 + 95, pid=201, more=True), []))
    return out


def blocks(ledger: GoodputLedger) -> dict:
    return {name: {key: dict(by_step) for key, by_step in job.blocks.items()} for name, job in ledger._jobs.items()}


def test_the_ledger_takes_a_workers_summary_as_it_takes_the_rows(monkeypatch):
    rows_path, summary_path = GoodputLedger(), GoodputLedger()
    used_rows = []
    real = GoodputLedger._steps
    monkeypatch.setattr(GoodputLedger, "_steps", lambda self, frame, now: used_rows.append(self is summary_path) or real(self, frame, now))
    for i, (steps, pauses) in enumerate(batches_of_a_job_with_restarts()):
        now = T0 + 100 + i
        frame = frame_from_rows("steps", steps)
        a = rows_path.tag(frame, now=now)["incarnation"].to_list()
        b = summary_path.tag(frame, now=now, summary=summarize(frame))["incarnation"].to_list()
        assert a == b, f"batch {i}"
        for ledger in (rows_path, summary_path):
            if pauses:
                ledger.observe("pauses", frame_from_rows("pauses", pauses), now=now)
    took_summary = used_rows.count(False) - used_rows.count(True)
    assert took_summary >= 7, "the batches that go on as before took the summary"
    assert used_rows.count(True) >= 6, "a start, a restart, a new rank or job, a step back, a new pid: the rows"
    a, b = blocks(rows_path), blocks(summary_path)
    assert a.keys() == b.keys() and all(a[j].keys() == b[j].keys() for j in a)
    for job in a:
        for key in a[job]:
            assert a[job][key].keys() == b[job][key].keys()
            for step, acc in a[job][key].items():
                assert b[job][key][step] == pytest.approx(acc, rel=1e-12), (job, key, step)
    for name, job in rows_path._jobs.items():
        other = summary_path._jobs[name]
        assert {r: (x.inc, x.pid, x.max_step) for r, x in job.ranks.items()} == \
               {r: (x.inc, x.pid, x.max_step) for r, x in other.ranks.items()}
        assert {i: sorted(m.pids) for i, m in job.incs.items()} == {i: sorted(m.pids) for i, m in other.incs.items()}
        assert job.pauses == other.pauses
    for job in ("llm", "other"):
        assert rows_path.report(job, now=T0 + 10_000).seconds == pytest.approx(
            summary_path.report(job, now=T0 + 10_000).seconds, rel=1e-9)


# --- the bounds' quick screen ----------------------------------------------------------------------------------
def test_the_quick_screen_passes_only_batches_the_screen_refuses_nothing_of_and_with_the_same_highs():
    rng = random.Random(7)
    now = 1_800_000_000.0
    bounds = Bounds(max_future_s=600.0, max_age_s=86400.0, max_step_jump=1000)
    passed = fell_back = 0
    for trial in range(400):
        history = StepHistory()
        history.raise_to({(f"j{j}", r): rng.randrange(0, 5000) for j in range(2) for r in range(3) if rng.random() < 0.8},
                         now)
        events = []
        for _ in range(rng.randrange(1, 12)):
            job, rank = f"j{rng.randrange(2)}", rng.randrange(3)
            base = (history.ranks.get((job, rank)) or (2500, 0))[0]
            odd = rng.random() < 0.04  # one record in 25 near or past a bound
            ts = now + (rng.choice([-90000, -86399, 599, 601, 700]) if odd else rng.uniform(-60, 5))
            odd = rng.random() < 0.04
            step = base + (rng.choice([-3, 999, 1000, 1001, 5000]) if odd else rng.choice([0, 1, 2, 7]))
            events.append({"v": 1, "kind": "step", "job": job, "rank": rank, "world_size": 3, "ts": ts,
                           "step": max(0, step), "duration_s": 1.0})
        body = json.dumps({"v": 1, "agent_id": "a", "seq": trial, "node": "n", "sent_ts": now, "events": events}).encode()
        prepared = prepare(body)
        quick = quick_screen(prepared.dated, prepared.ranks, now, bounds, history)
        full = screen(decode_batch(body), now, bounds, history)
        if quick is None:
            fell_back += 1
            continue
        passed += 1
        assert full.refused == 0, events
        assert quick == full.highs
    assert passed > 50 and fell_back > 50  # both ways were taken


def test_a_workers_summary_dates_and_names_every_record_of_each_kind():
    """`dated` spans every record's ts and `nodes` holds every node a record names (the batch's own besides), for
    steps, requests and pauses (taken from their frames) as for host and server frames."""
    rng = random.Random(11)
    now = 1_800_000_000.0
    for trial in range(60):
        events, named = [], set()
        for i in range(rng.randrange(0, 8)):
            kind = rng.choice(["step", "request", "pause"])
            ts = now + rng.uniform(-5000, 500)
            node = rng.choice([None, "n", "other-a", "other-b"])
            ev = {"v": 1, "kind": kind, "ts": ts, **({"node": node} if node else {})}
            if kind == "step":
                ev.update(job="j", rank=i, world_size=8, step=i, duration_s=1.0)
            elif kind == "request":
                ev.update(service="s", model="m", e2e_s=0.5)
            else:
                ev.update(job="j", rank=i, world_size=8, reason="checkpoint", phase="begin")
            events.append(ev)
            named |= {node} if node else set()
        frames = [{"v": 1, "kind": "host", "node": rng.choice(["n", "other-c"]), "ts": now + rng.uniform(-5000, 500)}
                  for _ in range(rng.randrange(0, 3))]
        servers = [{"v": 1, "service": "svc", "model": "m", "server": "http://s", "kind": "vllm", "node": "other-d",
                    "ts": now + rng.uniform(-5000, 500), "interval_s": 5.0}
                   for _ in range(rng.randrange(0, 2))]
        named |= {f["node"] for f in frames} | {s["node"] for s in servers}
        body = json.dumps({"v": 1, "agent_id": "a", "seq": trial, "node": "n", "sent_ts": now, "events": events,
                           "frames": frames, "servers": servers}).encode()
        prepared = prepare(body)
        stamps = [r["ts"] for r in (*events, *frames, *servers)]
        assert prepared.dated == ((min(stamps), max(stamps)) if stamps else None), trial
        assert prepared.nodes - {"n"} == named - {"n"}, trial
        assert prepared.nodes <= named | {"n"}, trial


# --- a collector with a worker ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """A collector without workers and one with a worker, both given every batch."""
    made = []
    for workers in (0, 1):
        settings = Settings(data_dir=tmp_path_factory.mktemp(f"w{workers}"), ingest_tokens=frozenset({FLEET}),
                            read_tokens=frozenset({READ}), agent_tokens=(("tok-a", "gpu-a"),), ingest_processes=workers)
        made.append(TestClient(create_app(settings)))
    for client in made:
        client.__enter__()
        wait_ready(client)
    decoders = made[1].app.state.decoders
    assert made[0].app.state.decoders is None
    wait_until(lambda: decoders.ready, timeout=60, what="the ingest worker")
    yield made
    for client in made:
        client.__exit__(None, None, None)


def both(apps, body: bytes, token: str = FLEET) -> list:
    return [c.post("/v1/ingest", content=body, headers={"Authorization": f"Bearer {token}"}) for c in apps]


def decoded(client) -> dict[str, float]:
    text = client.get("/metrics", headers=R).text
    return {where: float(text.split(f'fleetscope_collector_batches_decoded_total{{where="{where}"}} ')[1].split()[0])
            for where in ("worker", "collector")}


def steps_body(seq: int, first: int, last: int, *, agent: str = "agent-x", job: str = "wjob", node: str = "gpu-x",
               ts: float | None = None, **extra) -> bytes:
    t = time.time() - 60 if ts is None else ts
    events = [{"v": 1, "kind": "step", "job": job, "rank": rank, "world_size": 2, "step": step, "ts": t + step,
               "duration_s": 0.5, "phases": {"forward": 0.2, "backward": 0.25}, **extra}
              for step in range(first, last + 1) for rank in range(2)]
    frames = [{"v": 1, "kind": "host", "node": node, "ts": t, "cpu_utilization_ratio": 0.5,
               "gpus": [{"index": 0, "uuid": f"GPU-{node}", "utilization_ratio": 0.9, "xid_counts": {"79": 1}}]}]
    servers = [{"v": 1, "service": "svc", "model": "m", "server": "http://s", "kind": "vllm", "ts": t, "interval_s": 5.0,
                "counters": {"requests_ok": 5}}]
    return json.dumps({"v": 1, "agent_id": agent, "seq": seq, "node": node, "sent_ts": time.time(), "events": events,
                       "frames": frames, "servers": servers}).encode()


def test_batches_decoded_by_a_worker_are_answered_and_stored_as_without_one(apps):
    before = decoded(apps[1])
    for seq, (first, last) in enumerate([(0, 9), (10, 19), (20, 29)]):
        replies = both(apps, steps_body(seq, first, last))
        assert [r.status_code for r in replies] == [200, 200]
        assert replies[0].json() == replies[1].json()
    after = decoded(apps[1])
    # The first batch of new ranks is screened against its job by the collector itself; the others by the worker.
    assert after["worker"] - before["worker"] >= 2
    for path in ("/v1/jobs/wjob/steps?last=100", "/v1/nodes", "/v1/jobs/wjob", "/v1/jobs/wjob/goodput"):
        got = [c.get(path, headers=R) for c in apps]
        assert got[0].status_code == 200, path
        assert strip_times(got[0].json()) == strip_times(got[1].json()), path


def strip_times(value):
    """A reply without the fields that say when it was computed."""
    if isinstance(value, dict):
        return {k: strip_times(v) for k, v in value.items() if k not in ("now", "generated_at", "age_s", "as_of")}
    if isinstance(value, list):
        return [strip_times(v) for v in value]
    return value


def test_refusals_by_the_bounds_are_the_same_with_a_worker(apps):
    assert [r.status_code for r in both(apps, steps_body(0, 0, 4, agent="agent-b", job="bjob"))] == [200, 200]
    assert [r.status_code for r in both(apps, steps_body(1, 5, 9, agent="agent-b", job="bjob"))] == [200, 200]
    body = json.loads(steps_body(2, 10, 12, agent="agent-b", job="bjob"))
    body["events"][1]["ts"] = time.time() + 7200  # ahead of the clock
    body["events"][3]["step"] = 10**8  # a jump
    body["frames"][0]["ts"] = 1000.0  # older than retention
    replies = both(apps, json.dumps(body).encode())
    got = [r.json() for r in replies]
    assert got[0]["refused"] == got[1]["refused"] == 3
    assert [(x["field"], x["index"], x["reason"]) for x in got[0]["refusals"]] == \
           [(x["field"], x["index"], x["reason"]) for x in got[1]["refusals"]]
    assert [x["message"].split(":")[0] for x in got[0]["refusals"]] == [x["message"].split(":")[0] for x in got[1]["refusals"]]


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b'{"v": 1, "events": ' + b"[" * 10_000, 400),
    (json.dumps({"v": 1, "agent_id": "a", "seq": "one", "node": "n", "sent_ts": 1.0}).encode(), 422),
    (json.dumps({"v": 1, "agent_id": "a", "seq": 1, "node": "n", "sent_ts": 1.0,
                 "events": [{"v": 1, "kind": "step", "job": "j"}]}).encode(), 422),
])
def test_a_body_that_is_not_a_batch_gets_the_same_error_from_a_worker(apps, body, status):
    replies = both(apps, body)
    assert [r.status_code for r in replies] == [status, status]
    assert replies[0].json() == replies[1].json()


def test_a_record_for_another_node_is_refused_as_without_a_worker(apps):
    good = steps_body(0, 0, 3, agent="gpu-a", job="ajob", node="gpu-a")
    assert [r.status_code for r in both(apps, good, "tok-a")] == [200, 200]
    body = json.loads(steps_body(1, 4, 6, agent="gpu-a", job="ajob", node="gpu-a"))
    body["events"][2]["node"] = "gpu-b"
    replies = both(apps, json.dumps(body).encode(), "tok-a")
    assert [r.status_code for r in replies] == [403, 403]
    assert replies[0].json() == replies[1].json() and "events[2]" in replies[0].json()["detail"]


def test_the_collectors_resident_memory_counts_its_workers(apps):
    from collector.memory import rss as _rss

    pids = apps[1].app.state.decoders.pids()
    assert len(pids) == 1
    text = apps[1].get("/metrics", headers=R).text
    value = float(text.split("\nfleetscope_collector_resident_memory_bytes ")[1].split()[0])
    assert value >= 0.9 * _rss() + _rss(pids[0]) and _rss(pids[0]) > 10 * 2**20


def test_a_worker_that_dies_is_replaced_and_no_batch_is_lost(apps):
    client = apps[1]
    decoders = client.app.state.decoders
    replaced, dead = decoders.replaced, decoders.pids()
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    # The end of its channel tells the collector at once, not at the next batch.
    wait_until(lambda: decoders.replaced == replaced + 1, timeout=10, what="the dead worker noticed")
    here = decoded(client)["collector"]
    for seq in range(5):  # decoded here until the new worker is up
        reply = client.post("/v1/ingest", content=steps_body(seq, seq * 10, seq * 10 + 9, agent="agent-k", job="kjob"),
                            headers=W)
        assert reply.status_code == 200, reply.text
    wait_until(lambda: decoders.ready, timeout=60, what="a new ingest worker")
    assert decoders.replaced == replaced + 1 and not set(decoders.pids()) & set(dead)
    assert decoded(client)["collector"] > here  # the new worker was still starting (a spawn takes a second)
    before = decoded(client)["worker"]
    reply = client.post("/v1/ingest", content=steps_body(5, 50, 59, agent="agent-k", job="kjob"), headers=W)
    assert reply.status_code == 200 and decoded(client)["worker"] == before + 1
    steps = client.get("/v1/jobs/kjob/steps?last=1000", headers=R).json()["steps"]
    assert sorted({s["step"] for s in steps}) == list(range(60))


def test_a_worker_killed_with_batches_in_hand_loses_none(apps):
    """Batches sent to a worker that dies before it answers are decoded in the collector's process."""
    import asyncio

    from collector.decoders import Decoders

    body = steps_body(0, 0, 9, agent="agent-q", job="qjob")

    async def scenario():
        decoders = Decoders(1)
        decoders.start()
        while not decoders.ready:
            await asyncio.sleep(0.05)
        worker = decoders._workers[0]
        worker.process.kill()  # before it can read what follows
        answers = await asyncio.gather(*(decoders.prepare(body) for _ in range(20)))
        await decoders.close()
        return answers, decoders.replaced

    answers, replaced = asyncio.run(scenario())
    # Each is either the worker's answer (it read some before it died) or None: decode it here. None is lost or hangs.
    assert replaced == 1 and len(answers) == 20
    assert all(a is None or (a.seq == 0 and a.events == 20) for a in answers)


@pytest.mark.slow  # a real collector process: a few seconds
def test_the_workers_of_a_collector_killed_outright_end_themselves(tmp_path):
    import subprocess
    import sys

    import psutil

    from tests.conftest import free_port, stop_process

    port = free_port()
    env = {**os.environ, "FLEETSCOPE_INGEST_TOKEN": FLEET, "FLEETSCOPE_READ_TOKEN": READ}
    proc = subprocess.Popen([sys.executable, "-m", "fleetscope", "collector", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", str(tmp_path), "--ingest-processes", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = wait_until(lambda: [c for c in psutil.Process(proc.pid).children(recursive=True)
                                      if "spawn_main" in " ".join(c.cmdline())], timeout=60, what="the ingest worker")
    finally:
        stop_process(proc, signal.SIGKILL)

    def running() -> list:  # an ended worker may stay a zombie until this container's init reaps it
        out = []
        for p in workers:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = running()
    for p in alive:
        p.kill()
    assert not alive, "a worker outlived its collector"


def test_a_worker_that_cannot_start_is_not_restarted_in_a_tight_loop(monkeypatch):
    """A worker that dies before it starts (a broken install) is tried again after a growing delay; meanwhile
    prepare() answers None at once, so batches are decoded in the collector's process."""
    import asyncio

    from collector import decoders as module

    from tests.collector._dying_worker import die_at_once

    monkeypatch.setattr(module, "_serve", die_at_once)  # a spawned worker imports only its module

    async def scenario():
        decoders = module.Decoders(1)
        decoders.start()
        deadline = time.monotonic() + 60
        while decoders.replaced == 0 and time.monotonic() < deadline:  # the first dies as soon as it runs
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # a tight loop would have restarted it several times by now; the next try is 2 s away
        answer = await decoders.prepare(b"{}")
        spawned = decoders.replaced
        await decoders.close()
        return answer, spawned, decoders._failed_starts

    answer, replaced, failed = asyncio.run(scenario())
    assert answer is None
    assert replaced == 1 and failed == 1
