"""A training job linked to its Slurm jobs, one per incarnation, through the real app: ingest, the jobs list,
the job, its goodput incarnations, and the same after a collector restart (checkpoint and WAL replay)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.slurm import SlurmLinks
from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready

T0 = float(int(__import__("time").time()) - 900)


def steps(first: int, last: int, t: float, pid: int, slurm: dict | None, node: str = "gpu-1", **first_fields) -> list[dict]:
    out = []
    for i, n in enumerate(range(first, last + 1)):
        for rank in (0, 1):
            event = {"v": 1, "kind": "step", "job": "llm", "rank": rank, "world_size": 2, "step": n, "ts": t + i,
                     "duration_s": 1.0, "pid": pid + rank, "node": node}
            if slurm is not None:
                event["slurm"] = slurm
            out.append({**event, **first_fields} if i == 0 else event)
    return out


FIRST = {"job": "100", "step": "0", "user": "alice", "partition": "gpu", "name": "llm"}
SECOND = {"job": "205", "step": "0", "user": "alice", "partition": "gpu-long", "array_job": "200", "array_task": "5",
          "name": "llm"}
REQUEUED = {**SECOND, "restart_count": 1}
EVENTS = (steps(0, 29, T0, 100, FIRST, process_start_ts=T0 - 5)
          # a new sbatch of the same job name: a new Slurm job id, resumed from a checkpoint
          + steps(20, 49, T0 + 100, 300, SECOND, process_start_ts=T0 + 90, restored_step=20)
          # the same Slurm job requeued (node failure): the id stays, SLURM_RESTART_COUNT counts up; on another node
          + steps(40, 69, T0 + 200, 500, REQUEUED, node="gpu-2", process_start_ts=T0 + 190, restored_step=40))


def test_a_job_lists_its_slurm_jobs_one_per_incarnation_and_keeps_them_across_a_restart(tmp_path):
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        assert post(client, batch(0, EVENTS)).status_code == 200
        # a job outside Slurm has none
        assert post(client, batch(1, [{**e, "job": "plain"} for e in steps(0, 3, T0, 900, None)])).status_code == 200
        job = client.get("/v1/jobs/llm", headers=R).json()
        jobs = {j["job"]: j for j in client.get("/v1/jobs", headers=R).json()["jobs"]}
        ranged = {j["job"]: j for j in client.get("/v1/jobs", params={"since": T0 - 10}, headers=R).json()["jobs"]}
        goodput = client.get("/v1/jobs/llm/goodput", headers=R).json()
    links = job["slurm"]
    assert [(s["slurm_job"], s["restart_count"]) for s in links] == [("100", 0), ("205", 0), ("205", 1)]
    assert links[0] == {"slurm_job": "100", "restart_count": 0, "user": "alice", "partition": "gpu", "array_job": None,
                        "array_task": None, "name": "llm", "steps": ["0"], "first_step_ts": T0,
                        "last_step_end_ts": T0 + 30, "nodes": ["gpu-1"], "ranks": 2}
    assert (links[1]["partition"], links[1]["array_job"], links[1]["array_task"]) == ("gpu-long", "200", "5")
    assert links[2]["nodes"] == ["gpu-2"]
    for listing in (jobs, ranged):
        assert listing["llm"]["slurm_job_ids"] == ["100", "205", "205"]
        assert (listing["llm"]["slurm_job"], listing["llm"]["slurm_user"], listing["llm"]["slurm_partition"]) == (
            "205", "alice", "gpu-long")
        assert listing["plain"]["slurm_job_ids"] == [] and listing["plain"]["slurm_job"] is None
    assert [i["slurm_jobs"] for i in goodput["incarnations"]] == [["100"], ["205"], ["205"]]

    with TestClient(create_app(settings(tmp_path))) as client:  # from the checkpoint
        wait_ready(client)
        again = client.get("/v1/jobs/llm", headers=R).json()["slurm"]
    assert again == links


def test_the_links_come_back_from_the_wal_when_no_checkpoint_holds_them(tmp_path):
    """A crash before any checkpoint: the replayed rows rebuild the links."""
    import json

    from collector.store import Store
    from fleetscope.schema import decode_batch

    store = Store(tmp_path / "data", fsync=False)
    store.ingest(decode_batch(json.dumps(batch(0, EVENTS)).encode()))
    store.wal.close()
    replayed = Store(tmp_path / "data", fsync=False, start=False)
    links = SlurmLinks()
    replayed.observers = (*replayed.observers, links.observe)
    replayed.open()
    assert [s["slurm_job"] for s in links.links("llm")] == ["100", "205", "205"]


def frame(rows: list[dict]) -> pl.DataFrame:
    from collector.tables import frame_from_rows

    return frame_from_rows("steps", rows)


def test_links_unit_rows_snapshot_and_bounds():
    links = SlurmLinks(retention_s=3600)
    rows = [{"job": "a", "rank": r, "step": 1, "ts": 1000.0 + r, "duration_s": 2.0, "node": f"n{r}",
             "slurm": '{"job":"7","step":"%d","user":"u","partition":"p"}' % r} for r in range(3)]
    rows.append({"job": "a", "rank": 9, "step": 1, "ts": 999.0, "duration_s": 1.0, "node": "n9", "slurm": None})
    links.observe("steps", frame(rows))
    links.observe("pauses", frame(rows[:1]))  # only step rows count
    (link,) = links.links("a")
    assert (link["steps"], link["ranks"], link["nodes"], link["first_step_ts"], link["last_step_end_ts"]) == (
        ["0", "1", "2"], 3, ["n0", "n1", "n2"], 1000.0, 1004.0)
    restored = SlurmLinks()
    restored.restore(links.snapshot())
    assert restored.links("a") == links.links("a")
    assert links.links("nope") == [] and links.summary("nope")["slurm_job_ids"] == []
    # a job whose last step is older than the retention is dropped at the next snapshot
    old = SlurmLinks(retention_s=60)
    old.observe("steps", frame(rows[:1]))
    old.restore(old.snapshot())
    assert old.links("a") == []


def test_steps_without_the_slurm_column_in_old_files_are_read_as_outside_slurm():
    from collector.tables import SCHEMAS, conform

    old = pl.DataFrame({"ts": [1.0], "job": ["a"], "rank": [0]})
    assert conform(old, "steps").schema == pl.Schema(SCHEMAS["steps"])
    assert conform(old, "steps")["slurm"].to_list() == [None]


@pytest.mark.parametrize("text", ["not json", "[1]", '{"user":"x"}'])
def test_a_column_value_that_is_not_slurm_ids_is_skipped(text):
    links = SlurmLinks()
    links.observe("steps", frame([{"job": "a", "rank": 0, "step": 1, "ts": 1.0, "duration_s": 1.0, "slurm": text}]))
    assert links.links("a") == []


def test_a_service_lists_the_slurm_jobs_that_served_it_and_keeps_them_across_a_restart(tmp_path):
    served = {"job": "300", "step": "0", "user": "bob", "partition": "serve", "name": "vllm"}
    requeued = {**served, "restart_count": 1}

    def requests(t: float, slurm: dict | None, node: str) -> list[dict]:
        event = {"v": 1, "kind": "request", "service": "chat", "model": "llama", "e2e_s": 0.5, "node": node}
        return [{**event, "ts": t + i, **({"slurm": slurm} if slurm else {})} for i in range(5)]

    events = requests(T0, served, "gpu-1") + requests(T0 + 100, requeued, "gpu-2") + requests(T0 + 200, None, "gpu-3")
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        assert post(client, batch(0, events)).status_code == 200
        links = client.get("/v1/services/chat", headers=R).json()["slurm"]
    assert links == [
        {"slurm_job": "300", "restart_count": 0, "user": "bob", "partition": "serve", "array_job": None,
         "array_task": None, "name": "vllm", "steps": ["0"], "first_request_ts": T0, "last_request_end_ts": T0 + 4.5,
         "nodes": ["gpu-1"]},
        {"slurm_job": "300", "restart_count": 1, "user": "bob", "partition": "serve", "array_job": None,
         "array_task": None, "name": "vllm", "steps": ["0"], "first_request_ts": T0 + 100,
         "last_request_end_ts": T0 + 104.5, "nodes": ["gpu-2"]}]
    with TestClient(create_app(settings(tmp_path))) as client:  # from the checkpoint
        wait_ready(client)
        assert client.get("/v1/services/chat", headers=R).json()["slurm"] == links


def test_a_snapshot_from_before_services_were_linked_still_restores_the_jobs():
    links = SlurmLinks()
    rows = [{"job": "a", "rank": 0, "step": 1, "ts": 1000.0, "duration_s": 2.0, "node": "n0",
             "slurm": '{"job":"7","step":"0","user":"u","partition":"p"}'}]
    links.observe("steps", frame(rows))
    saved = json.loads(bytes(links.snapshot()))
    assert saved["v"] == 2 and set(saved["services"]) == set()
    restored = SlurmLinks()
    restored.restore(json.dumps(saved["jobs"]).encode())  # the old form: the jobs' map alone
    assert restored.links("a") == links.links("a") and restored.service_links("a") == []
