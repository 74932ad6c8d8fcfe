"""The wire schema refuses bad records with a message that names the field."""

from __future__ import annotations

import json

import pytest

from fleetscope.schema import MalformedError, RequestEvent, SchemaError, StepEvent, decode_batch, decode_event, encode

STEP = {"v": 1, "kind": "step", "job": "j", "rank": 0, "world_size": 2, "step": 3, "ts": 1.7e9, "duration_s": 0.5}


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


def test_a_valid_step_and_request_round_trip():
    step = decode_event(raw({**STEP, "phases": {"forward": 0.2}, "tokens": 10}))
    assert isinstance(step, StepEvent) and step.phases == {"forward": 0.2} and step.tokens == 10
    assert decode_event(encode(step)) == step
    req = decode_event(raw({"v": 1, "kind": "request", "service": "s", "model": "m", "ts": 1.0, "e2e_s": 0.1, "ttft_s": 0.05}))
    assert isinstance(req, RequestEvent) and req.status == "ok"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"duration_s": -3}, "$.duration_s"),
        ({"duration_s": 0}, "$.duration_s"),
        ({"rank": "zero"}, "$.rank"),
        ({"rank": -1}, "$.rank"),
        ({"job": ""}, "$.job"),
        ({"world_size": 0}, "$.world_size"),
        ({"phases": {"forward": -1}}, "$.phases"),
        ({"surprise": 1}, "surprise"),
        ({"job": "a\u0007b"}, "$.job"),
        ({"phases": {"for\nward": 0.1}}, "$.phases"),
        ({"rank": 2**24}, "$.rank"),
        ({"pid": 2**31}, "$.pid"),
        ({"restored_step": -1}, "$.restored_step"),
        ({"process_start_ts": 1e11}, "$.process_start_ts"),
    ],
)
def test_bad_fields_are_named(change, field):
    with pytest.raises(SchemaError) as err:
        decode_event(raw({**STEP, **change}))
    assert field in str(err.value)


def test_a_step_that_begins_an_incarnation_round_trips_and_older_steps_still_decode():
    first = decode_event(raw({**STEP, "process_start_ts": 1.7e9 - 30, "restored_step": 3}))
    assert (first.process_start_ts, first.restored_step) == (1.7e9 - 30, 3)
    assert decode_event(encode(first)) == first
    plain = decode_event(raw(STEP))  # what clients before goodput send
    assert (plain.process_start_ts, plain.restored_step) == (None, None)
    assert b"restored_step" not in encode(plain)


def test_missing_field_is_named():
    body = dict(STEP)
    del body["duration_s"]
    with pytest.raises(SchemaError, match="duration_s"):
        decode_event(raw(body))


def test_unknown_version_is_refused_before_anything_else():
    with pytest.raises(SchemaError, match="unsupported schema version 2"):
        decode_event(raw({"v": 2, "kind": "step", "anything": "goes"}))
    with pytest.raises(SchemaError, match='missing required field "v"'):
        decode_event(raw({"kind": "step"}))


def test_malformed_json_is_its_own_error():
    with pytest.raises(MalformedError):
        decode_batch(b'{"v": 1,')


def test_batch_errors_name_the_batch_and_the_agent():
    batch = {"v": 1, "agent_id": "gpu-012", "seq": 17, "node": "gpu-012", "sent_ts": 1.0, "events": [{**STEP, "duration_s": -3}]}
    with pytest.raises(SchemaError) as err:
        decode_batch(raw(batch))
    assert "batch 17 from agent gpu-012" in str(err.value) and "$.events[0].duration_s" in str(err.value)


def test_numbers_json_turns_into_infinity_are_refused():
    with pytest.raises(SchemaError, match=r"\$.ts"):
        decode_event(raw(STEP).replace(b'"ts": 1700000000.0', b'"ts": 1e999'))
    with pytest.raises(SchemaError, match=r"\$.metrics"):
        decode_event(raw({**STEP, "metrics": {"loss": 1.0}}).replace(b'"loss": 1.0', b'"loss": 1e999'))
