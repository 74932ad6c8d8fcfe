"""The memory governor: the hot tier's budget follows the process's measured resident memory, and the reading of
that memory (the kernel's peak since the last pass, and the child processes') is real."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from collector.hot import HotTier
from collector.memory import FLOOR, GROWTH, HIGH, LOW, NOMINAL, Governor, ProcessMemory
from collector.store import Backlogged, Store
from collector.tables import batch_frames
from tests.collector.test_hot import frames_batch

MiB = 2**20


def _filled_tier(hours: float = 1.0) -> tuple[HotTier, float]:
    now = time.time()
    hot = HotTier(window_s=6 * 3600, raw_s=300)
    b, _ = frames_batch(0, now - hours * 3600, hours * 3600, nodes=8, gpus=8, every=10)
    hot.append(batch_frames(b))
    hot.maintain(now)
    return hot, now


def test_over_the_high_mark_the_hot_tier_gives_back_the_overshoot_and_the_next_pass_trims_to_it():
    hot, now = _filled_tier()
    held = hot.held()
    budget = int(held / NOMINAL * 2)  # a third of it is twice what the tier holds: nothing to trim at first
    readings = iter([int(0.5 * budget), int(HIGH * budget) + held // 8])
    gov = Governor(budget, hot, high=lambda: next(readings))
    assert hot.budget_bytes == int(NOMINAL * budget)
    assert gov.observe() == int(NOMINAL * budget)  # room to spare: the nominal share, which it does not fill
    rolled_since = hot.held_since["gpus_1m"]

    new = gov.observe()  # an eighth of the tier's bytes over the mark: counted from what it holds, not its budget
    assert new == held - held // 8 > int(FLOOR * budget) and gov.last_high == int(HIGH * budget) + held // 8
    hot.maintain(now + 1)
    assert hot.held() <= new
    assert hot.held_since["gpus_1m"] > rolled_since  # by dropping its oldest minutes (they are on disk)


def test_the_hot_tier_never_gets_less_than_its_floor_and_grows_back_slowly_to_its_share():
    hot, _ = _filled_tier()
    budget = 4 * 2**30
    readings, clock = [2 * budget], [0.0]
    gov = Governor(budget, hot, high=lambda: readings[-1], clock=lambda: clock[0])
    clock[0] += 10
    assert gov.observe() == int(FLOOR * budget)  # far over: the floor
    readings.append(int((HIGH + LOW) / 2 * budget))  # between the marks: kept where it is
    clock[0] += 600
    assert gov.observe() == int(FLOOR * budget)
    readings.append(int(LOW * budget) - 1)  # room again: GROWTH of the budget a minute, passes 15 s apart
    seen = []
    for _ in range(60):
        clock[0] += 15
        seen.append(gov.observe())
    quarter = int(GROWTH * budget * 15 / 60)
    assert seen[0] == int(FLOOR * budget) + quarter
    assert all(b - a == quarter for a, b in zip(seen, seen[1:]) if b < int(NOMINAL * budget))
    assert seen[-1] == int(NOMINAL * budget) and seen[-10] < seen[-1]  # about 13 minutes from the floor
    clock[0] += 3600  # a long gap counts as a minute at most: one pass never jumps back to the full share
    gov.observe()
    readings.append(2 * budget)
    gov.observe()
    clock[0] += 3600
    readings.append(0)
    assert gov.observe() == int(FLOOR * budget) + int(GROWTH * budget)
    assert gov.peak == 2 * budget and gov.last_high == 0  # the highest reading, and the last


def test_the_store_steers_its_hot_tier_with_each_upkeep_pass(tmp_path):
    now = time.time()
    store = Store(tmp_path, window_s=6 * 3600, raw_s=300, memory_budget=256 * MiB)
    assert store.governor is not None and store.hot.budget_bytes == int(NOMINAL * 256 * MiB)
    b, body = frames_batch(0, now - 3600, 3600, nodes=8, gpus=8, every=10)
    store.ingest(b, body)
    store.maintain_hot(now)
    held = store.hot.held()
    assert 0 < held < store.hot.budget_bytes
    store.governor.high = lambda: int(HIGH * 256 * MiB) + held // 2  # as if a read had just taken that much
    store.maintain_hot(now + 1)
    assert store.hot.budget_bytes == max(int(FLOOR * 256 * MiB), held - held // 2)
    assert store.hot.held() <= store.hot.budget_bytes
    assert Store(tmp_path / "unbounded").governor is None  # no budget, nothing to steer
    store.wal.close()


def _hold(mib: int, ready, done) -> None:
    block = bytearray(mib * MiB)
    block[::4096] = b"\x01" * len(block[::4096])  # touched: resident
    ready.set()
    done.wait(30)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_the_reading_is_the_peak_since_the_last_one_and_counts_the_child_processes():
    memory = ProcessMemory()
    base = memory.high()
    block = bytearray(200 * MiB)
    block[::4096] = b"\x01" * len(block[::4096])
    del block  # gone before the reading: only the kernel's peak saw it
    assert memory.high() >= base + 150 * MiB
    assert memory.high() < base + 100 * MiB  # the peak was reset by the last reading

    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(150, ready, done))
    child.start()
    try:
        assert ready.wait(60)
        assert child.pid in memory.children()
        assert memory.high() >= base + 150 * MiB
    finally:
        done.set()
        child.join(30)
    assert memory.high() < base + 100 * MiB


def test_where_the_peak_cannot_be_reset_the_current_resident_memory_is_read(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self" / "task" / "1").mkdir(parents=True)
    (proc / "self" / "status").write_text("Name:\tx\nVmHWM:\t  900000 kB\nVmRSS:\t  100000 kB\n")
    (proc / "self" / "clear_refs").mkdir()  # writing to it fails, as in a sandbox that forbids it
    memory = ProcessMemory(proc)
    assert memory.high() == 100000 * 1024 and memory.resets is False
    assert memory.high() == 100000 * 1024  # and goes on reading the current one


def test_the_hot_tiers_budget_and_the_high_are_exported(tmp_path):
    from collector.metrics import CollectorMetrics
    from collector.findings import FindingsTracker

    store = Store(tmp_path, memory_budget=256 * MiB)
    store.maintain_hot()
    families = {m.name: m for m in CollectorMetrics(store, FindingsTracker(), memory_budget=256 * MiB).collect()}
    assert families["fleetscope_collector_hot_budget_bytes"].samples[0].value == store.hot.budget_bytes
    assert families["fleetscope_collector_resident_memory_high_bytes"].samples[0].value == store.governor.last_high > 0
    store.wal.close()


def test_the_hot_tiers_backlog_counts_the_rows_no_pass_has_seen_yet(tmp_path):
    now = time.time()
    hot = HotTier(window_s=6 * 3600, raw_s=300)
    first, _ = frames_batch(0, now - 600, 300, nodes=4, gpus=8, every=10)
    second, _ = frames_batch(1, now - 300, 300, nodes=4, gpus=8, every=10)
    frames = batch_frames(first)
    hot.append(frames)
    assert hot.fresh_bytes == frames["gpus"].estimated_size() + frames["hosts"].estimated_size() > 0
    hot.maintain(now)
    assert hot.fresh_bytes == 0
    more = batch_frames(second)
    hot.append(more)
    assert hot.fresh_bytes == more["gpus"].estimated_size() + more["hosts"].estimated_size()


def test_past_its_backlog_limit_the_store_refuses_ingest_until_a_pass_and_asks_for_one_at_half(tmp_path):
    now = time.time()
    store = Store(tmp_path, window_s=6 * 3600, raw_s=300, memory_budget=2048 * MiB)
    assert store.backlog_limit == 64 * MiB  # a 32nd of the budget
    assert Store(tmp_path / "small", memory_budget=128 * MiB).backlog_limit == 16 * MiB  # never under 16 MiB
    woken = []
    store.wake_upkeep = lambda: woken.append(True)
    b, body = frames_batch(0, now - 600, 300, nodes=4, gpus=8, every=10)
    store.ingest(b, body)
    backlog = store.hot.fresh_bytes
    store.backlog_limit = 2 * backlog + 2  # half of it is just over the backlog
    store.admit()
    assert woken == []
    store.backlog_limit = 2 * backlog - 2  # past half: a pass is asked for, the batch still comes in
    store.admit()
    assert woken == [True]
    store.backlog_limit = backlog - 1
    with pytest.raises(Backlogged, match="catching up"):
        store.admit()
    store.maintain_hot(now)
    store.admit()  # the pass has seen the rows: in again
    store.wal.close()
