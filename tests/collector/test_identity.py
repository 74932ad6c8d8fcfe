"""Agent identity at ingest: per-agent tokens, watermarks per (node, agent, boot epoch), the bound on sequence jumps."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.settings import Settings, parse_ingest_tokens
from collector.store import MAX_SEQ_JUMP, SequenceJump, Store
from fleetscope.schema import decode_batch
from tests.conftest import wait_ready

NOW = time.time() - 60
FLEET, TOKEN_A, TOKEN_B, READ = "fleet-tok", "tok-a", "tok-b", "read-tok"


def body(seq: int, *, node: str = "gpu-a", agent: str | None = None, epoch: str | None = "e1", step: int | None = None,
         frame_node: str | None = None) -> dict:
    out = {"v": 1, "agent_id": agent or f"{node}-1234", "seq": seq, "node": node, "sent_ts": NOW,
           "events": [{"v": 1, "kind": "step", "job": "j", "rank": 0, "world_size": 1, "step": seq if step is None else step,
                       "ts": NOW, "duration_s": 0.5}]}
    if epoch is not None:
        out["epoch"] = epoch
    if frame_node is not None:
        out["frames"] = [{"v": 1, "kind": "host", "node": frame_node, "ts": NOW}]
    return out


def batch(seq: int, **kw):
    raw = json.dumps(body(seq, **kw)).encode()
    return decode_batch(raw), raw


def steps(store: Store) -> list[int]:
    return sorted(store.frame("steps")["step"].to_list())


# --- the store ---------------------------------------------------------------------------------------------------
def test_a_new_epoch_numbers_from_zero_without_its_batches_taken_for_duplicates(tmp_path):
    s = Store(tmp_path, window_s=86400)
    for seq in (0, 1024, 2048):
        assert not s.ingest(*batch(seq, epoch="boot-1", step=seq)).duplicate
    # restarted: the same agent id, numbers from 0 again in a new epoch
    for seq in (0, 1024):
        assert not s.ingest(*batch(seq, epoch="boot-2", step=10_000 + seq)).duplicate
    # a batch of the old epoch, spooled before the restart and resent, is still known
    assert s.ingest(*batch(1024, epoch="boot-1", step=1024)).duplicate
    assert steps(s) == [0, 1024, 2048, 10_000, 11_024]


def test_watermarks_of_each_node_and_epoch_survive_a_checkpoint_and_a_restart(tmp_path):
    s = Store(tmp_path, window_s=86400)
    s.ingest(*batch(0, epoch="boot-1"))
    s.ingest(*batch(0, node="gpu-b", epoch="boot-1"))
    s.checkpoint()
    s.ingest(*batch(1024, epoch="boot-1"))
    del s
    again = Store(tmp_path, window_s=86400)
    assert again.ingest(*batch(0, epoch="boot-1")).duplicate
    assert again.ingest(*batch(1024, epoch="boot-1")).duplicate  # replayed from the WAL
    assert again.ingest(*batch(0, node="gpu-b", epoch="boot-1")).duplicate
    assert not again.ingest(*batch(0, epoch="boot-2")).duplicate


def test_a_checkpoint_written_before_epochs_still_deduplicates_batches_without_one(tmp_path):
    s = Store(tmp_path, window_s=86400)
    s.ingest(*batch(0, agent="old-agent", epoch=None))
    s.checkpoint()
    s.close()
    path = tmp_path / "checkpoint.json"
    state = json.loads(path.read_text())
    state["watermarks"] = {"old-agent": [0, time.time()]}  # as the store wrote it before epochs
    del state["marks"]
    path.write_text(json.dumps(state))
    again = Store(tmp_path, window_s=86400)
    assert again.ingest(*batch(0, agent="old-agent", epoch=None)).duplicate
    assert not again.ingest(*batch(0, agent="old-agent", epoch="boot-1")).duplicate


def test_a_sequence_number_far_above_the_watermark_is_refused_and_moves_nothing(tmp_path):
    s = Store(tmp_path, window_s=86400)
    with pytest.raises(SequenceJump, match="more than the"):
        s.ingest(*batch(2**53))  # the first batch of an epoch starts near 0
    s.ingest(*batch(0))
    with pytest.raises(SequenceJump):
        s.ingest(*batch(MAX_SEQ_JUMP + 1))
    # an agent's own pace (1,024 apart, splits inside the range, a spool that dropped batches) passes
    assert not s.ingest(*batch(1024 * 1000, step=1)).duplicate
    assert not s.ingest(*batch(1024 * 1000 + MAX_SEQ_JUMP, step=2)).duplicate
    assert not s.ingest(*batch(1024 * 1001 + MAX_SEQ_JUMP, step=3)).duplicate


# --- tokens ------------------------------------------------------------------------------------------------------
def test_ingest_token_lines_are_fleet_tokens_or_tokens_bound_to_a_node():
    fleet, agents = parse_ingest_tokens("# fleet token for the lab\nshared\ntok-a gpu-a\n  tok-b   gpu-b \n\nold1, old2")
    assert fleet == {"shared", "old1", "old2"}
    assert dict(agents) == {"tok-a": "gpu-a", "tok-b": "gpu-b"}
    with pytest.raises(ValueError, match="3 words"):
        parse_ingest_tokens("tok-a gpu-a extra")
    with pytest.raises(ValueError, match="listed twice"):
        parse_ingest_tokens("tok-a gpu-a\ntok-a gpu-b")


# --- the API -----------------------------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({FLEET}), read_tokens=frozenset({READ}),
                        agent_tokens=(("tok-a", "gpu-a"), ("tok-b", "gpu-b")))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def post(client, token: str, payload: dict):
    return client.post("/v1/ingest", content=json.dumps(payload), headers={"Authorization": f"Bearer {token}"})


def test_an_agent_token_writes_only_as_its_own_node(client):
    assert post(client, TOKEN_A, body(0)).status_code == 200
    assert post(client, TOKEN_A, body(0, agent="gpu-a")).status_code == 200  # agent_id = the node itself
    r = post(client, TOKEN_B, body(2**53, node="gpu-a"))  # B posing as A
    assert r.status_code == 403 and "'gpu-a' is not 'gpu-b'" in r.json()["detail"]
    r = post(client, TOKEN_B, body(1024, node="gpu-b", agent="gpu-a-1234"))
    assert r.status_code == 403 and "agent_id" in r.json()["detail"]
    r = post(client, TOKEN_B, body(1024, node="gpu-b", frame_node="gpu-a"))  # a frame for another node
    assert r.status_code == 403 and "frames[0]" in r.json()["detail"]
    # A's watermark did not move: its next batch is applied
    r = post(client, TOKEN_A, body(1024))
    assert r.status_code == 200 and r.json()["duplicate"] is False


def test_tokens_keep_their_scopes(client):
    assert client.get("/v1/nodes", headers={"Authorization": f"Bearer {TOKEN_A}"}).status_code == 403
    assert post(client, READ, body(0)).status_code == 403
    assert post(client, "nobody", body(0)).status_code == 401


def test_a_fleet_token_may_name_any_node_but_not_jump_its_numbers(client):
    assert post(client, FLEET, body(0, node="gpu-c")).status_code == 200
    r = post(client, FLEET, body(2**53, node="gpu-c"))
    assert r.status_code == 422 and "more than the 4294967296 allowed" in r.json()["detail"]
    r = post(client, FLEET, body(1024, node="gpu-c"))
    assert r.status_code == 200 and r.json()["duplicate"] is False


def test_identity_and_sequence_refusals_are_counted_on_the_collectors_metrics(client):
    import re

    post(client, TOKEN_B, body(0, node="gpu-a"))  # B posing as A
    post(client, FLEET, body(0, node="gpu-d"))
    post(client, FLEET, body(2**53, node="gpu-d"))
    text = client.get("/metrics", headers={"Authorization": f"Bearer {READ}"}).text

    def count(reason: str) -> float:
        m = re.search(rf'fleetscope_collector_ingest_rejected_total\{{reason="{reason}"\}} (\S+)', text)
        assert m, reason
        return float(m.group(1))

    assert count("identity") >= 1 and count("seq_jump") >= 1
