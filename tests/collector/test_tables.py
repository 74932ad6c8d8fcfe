"""A batch's frames hold what the events said, in the tables' schemas, whichever of the builder's shortcuts apply."""

from __future__ import annotations

import json

import polars as pl
from polars.testing import assert_frame_equal

from collector.tables import SCHEMAS, batch_frames, frame_from_rows
from fleetscope.schema import decode_batch

TS = 1.7e9


def _batch(events: list[dict], node: str = "node-a") -> object:
    body = {"v": 1, "agent_id": "agent-a", "seq": 1, "node": node, "sent_ts": TS, "events": events}
    return decode_batch(json.dumps(body).encode())


def _step(rank: int, step: int, **extra) -> dict:
    return {"v": 1, "kind": "step", "job": "job-a", "rank": rank, "world_size": 4, "step": step, "ts": TS + step,
            "duration_s": 0.5, **extra}


def _expected(events: list[dict], node: str = "node-a") -> pl.DataFrame:
    """The same rows by the row-dict path (frame_from_rows), as the wire has them."""
    rows = []
    for e in events:
        row = {k: v for k, v in e.items() if k not in ("v", "kind", "slurm", "pod")}
        row.setdefault("node", node)
        row["agent_id"] = "agent-a"
        row["failed"] = e.get("failed", False)
        row["local_rank"], row["pid"] = e.get("local_rank", 0), e.get("pid", 0)
        for key in ("slurm", "pod"):
            row[key] = json.dumps(e[key], separators=(",", ":")) if key in e else None
        rows.append(row)
    return frame_from_rows("steps", rows)


def test_a_uniform_batch_with_nothing_optional_keeps_its_values_and_nulls():
    # One job, one node, one agent, no optional field: the all-null and one-valued columns' shortcuts.
    events = [_step(r, s, phases={"forward": 0.1, "backward": 0.2}) for s in range(3) for r in range(4)]
    frame = batch_frames(_batch(events))["steps"]
    assert frame.schema == pl.Schema(SCHEMAS["steps"])
    assert_frame_equal(frame, _expected(events), categorical_as_str=True)
    assert frame["tokens"].null_count() == frame.height and frame["phase_data_s"].null_count() == frame.height
    assert frame["job"].cast(pl.String).unique().to_list() == ["job-a"]


def test_a_mixed_batch_keeps_every_rows_own_values():
    events = [
        _step(0, 1, tokens=4096, phases={"data": 0.01, "checkpoint": 2.0}, metrics={"sync_arrival_s": 0.3, "loss": 2.5},
              slurm={"job": "77", "user": "ana"}, gpu_uuid="GPU-0"),
        _step(1, 1, node="node-b", pod={"namespace": "ml", "pod": "trainer-1"}, failed=True, stage=1, pid=42),
        _step(2, 1, metrics={"loss": 2.4}),
    ]
    frames = [batch_frames(_batch(events))["steps"], batch_frames(_batch(events[1:2]))["steps"]]
    assert_frame_equal(frames[0], _expected(events), categorical_as_str=True)
    assert_frame_equal(frames[1], _expected(events[1:2]), categorical_as_str=True)
    row = frames[0].row(0, named=True)
    assert json.loads(row["phases_other"]) == {"checkpoint": 2.0} and json.loads(row["metrics_other"]) == {"loss": 2.5}
    assert frames[0]["node"].cast(pl.String).to_list() == ["node-a", "node-b", "node-a"]
    # Frames of batches that took different shortcuts join as the hot tier joins them.
    uniform = batch_frames(_batch([_step(3, 2)]))["steps"]
    joined = pl.concat([*frames, uniform])
    assert joined.height == 5 and joined["tokens"].to_list() == [4096, None, None, None, None]
