"""A client newer than the node's agent: fields the agent does not know are dropped and named, never a refusal
that would lose every event of the job (agents and users' client packages are upgraded on their own schedules)."""

from __future__ import annotations

import json
import logging

import pytest

from agent.listener import Listener
from fleetscope.schema import SchemaError, decode_batch, decode_client_event, encode

STEP = {"v": 1, "kind": "step", "job": "j", "rank": 0, "world_size": 2, "step": 3, "ts": 1.0, "duration_s": 0.5, "pid": 7}


@pytest.fixture
def listener():
    got = []
    lst = Listener("127.0.0.1", 0, node="n1", deliver=got.append)
    lst.delivered = got
    yield lst
    lst.stop()


def test_a_newer_clients_event_is_kept_without_the_fields_this_agent_does_not_know(listener, caplog):
    newer = {**STEP, "energy_j": 12.5, "slurm": {"job": "42", "user": "ada", "gpus_per_task": 8}}
    with caplog.at_level(logging.WARNING):
        event = listener.handle(json.dumps(newer).encode())
        listener.handle(json.dumps(newer).encode())
    assert event is not None and event.step == 3 and event.slurm.job == "42" and event.slurm.user == "ada"
    assert len(listener.delivered) == 2 and listener.unknown_fields == 2 and listener.rejected.total() == 0
    # named once, not per event
    lines = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(lines) == 1 and "$.energy_j" in lines[0] and "$.slurm.gpus_per_task" in lines[0]
    # what the agent ships is its own schema: the strict collector takes it
    decode_batch(json.dumps({"v": 1, "node": "n1", "agent_id": "a", "seq": 1, "sent_ts": 1.0,
                             "events": [json.loads(encode(event))]}).encode())
    assert ("fleetscope_agent_events_unknown_fields_total", 2.0, ()) in [(r.name, r.value, r.labels) for r in listener.readings()]


@pytest.mark.parametrize("bad", [
    {**STEP, "extra": 1, "duration_s": "slow"},          # a known field still has to be right
    {**STEP, "extra": 1, "v": 9},                        # and the version still comes first
    {**STEP, "extra": 1, "job": "a\u0007b"},             # no control characters in names
    {**STEP, "extra": 1, "kind": "mystery"},             # an unknown kind is not a newer field
])
def test_everything_else_stays_strict(listener, bad):
    assert listener.handle(json.dumps(bad).encode()) is None
    assert listener.delivered == [] and listener.unknown_fields == 0


def test_the_collector_stays_strict_about_unknown_fields():
    # agents are the operator's to upgrade with the collector; a batch with a field the collector does not know is
    # an error that names it
    body = {"v": 1, "node": "n1", "agent_id": "a", "seq": 1, "sent_ts": 1.0, "events": [{**STEP, "extra": 1}]}
    with pytest.raises(SchemaError, match="extra"):
        decode_batch(json.dumps(body).encode())


def test_a_strict_event_decodes_the_same_both_ways():
    event, dropped = decode_client_event(json.dumps(STEP).encode())
    assert dropped == [] and event.job == "j" and event.pid == 7
