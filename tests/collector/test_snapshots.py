"""Persisted state is copied under the store's gate and encoded after it: snapshot() encodes nothing, and what it
took is the state at that moment, whatever ingest adds while the checkpoint writes it."""

from __future__ import annotations

import time

import polars as pl
import pytest

import collector.snapshots
from collector.pods import PodLinks
from collector.slo import Slo, SloLedger
from collector.slurm import SlurmLinks
from collector.tables import SCHEMAS, frame_from_rows

NOW = 1_800_000_000.0
SLOS = [Slo(name=f"chat-{i}", service="chat", indicator="availability", objective=0.99) for i in range(3)]


def requests(minutes: range, status: str = "ok") -> pl.DataFrame:
    return pl.DataFrame([{"ts": NOW - 60 * m, "service": "chat", "model": "m", "status": status, "e2e_s": 1.0}
                         for m in minutes], schema={k: SCHEMAS["requests"][k] for k in ("ts", "service", "model", "status", "e2e_s")})


def steps(first_ts: float, ranks: int, **extra) -> pl.DataFrame:
    return frame_from_rows("steps", [{"job": "a", "rank": r, "step": 1, "ts": first_ts + r, "duration_s": 1.0,
                                      "node": f"n{r}", **extra} for r in range(ranks)])


@pytest.fixture
def encodings(monkeypatch):
    """How many documents were JSON-encoded, by collector.snapshots (the checkpoint's writing, off the gate)."""
    count = [0]
    real = collector.snapshots.json.dumps

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(collector.snapshots.json, "dumps", counted)
    return count


def _slo_ledger():
    ledger = SloLedger(SLOS)
    ledger.observe(requests(range(0, 3000, 7)))  # two days of minutes, one in seven
    return ledger


def _pods():
    pods = PodLinks()
    pods.observe("steps", steps(time.time(), 50, pod='{"namespace":"ns","pod":"p"}'))
    pods.observe("requests", frame_from_rows("requests", [
        {"ts": time.time(), "service": "chat", "model": "m", "status": "ok", "e2e_s": 1.0, "node": "n",
         "pod": '{"namespace":"ns","pod":"r1"}'}]))
    return pods


def _slurm():
    links = SlurmLinks()
    links.observe("steps", steps(time.time(), 8, slurm='{"job":"7","step":"0","user":"u","partition":"p"}'))
    return links


def _more(thing) -> None:
    """What ingest adds while a checkpoint writes the snapshot taken before it."""
    if isinstance(thing, SloLedger):
        thing.observe(requests(range(0, 3000, 7), status="error"))  # the same minutes: their cells change
    elif isinstance(thing, PodLinks):
        thing.observe("steps", steps(time.time() + 100, 50, pod='{"namespace":"ns","pod":"q"}'))
        thing.observe("requests", frame_from_rows("requests", [
            {"ts": time.time() + 100, "service": "chat", "model": "m2", "status": "ok", "e2e_s": 1.0, "node": "n",
             "pod": '{"namespace":"ns","pod":"r1"}'}]))
    else:
        thing.observe("steps", steps(time.time() + 100, 16, slurm='{"job":"7","step":"1","user":"u","partition":"p"}'))


def _state(thing):
    if isinstance(thing, SloLedger):
        return thing.over(NOW - 3 * 86400, NOW + 60)
    if isinstance(thing, PodLinks):
        return thing.ranks("a"), thing.replicas("chat")
    return thing.links("a")


@pytest.mark.parametrize("make", [_slo_ledger, _pods, _slurm], ids=["slo", "pods", "slurm"])
def test_a_snapshot_encodes_nothing_and_holds_the_state_it_was_taken_at(make, encodings):
    thing = make()
    before = _state(thing)
    snap = thing.snapshot()  # under the store's gate: copies only
    assert encodings[0] == 0, "snapshot() encoded its document while the store's gate was held"
    _more(thing)
    assert _state(thing) != before, "the test's later ingest changed nothing: it proves nothing"
    restored = SloLedger(SLOS) if isinstance(thing, SloLedger) else type(thing)()
    restored.restore(bytes(snap))  # written after the gate, once
    assert encodings[0] == 1
    assert _state(restored) == before
