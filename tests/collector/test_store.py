"""Durability of the store: WAL replay, checkpoints, crash leftovers, compaction, retention."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from collector import partitions
from collector.store import Store
from fleetscope.schema import decode_batch

NOW = time.time()


def batch(seq: int, n: int = 3, agent: str = "a1", ts: float = NOW):
    events = [{"v": 1, "kind": "step", "job": "j", "rank": 0, "world_size": 1, "step": seq * 100 + i, "ts": ts + i,
               "duration_s": 0.5} for i in range(n)]
    body = json.dumps({"v": 1, "agent_id": agent, "seq": seq, "node": "n", "sent_ts": ts, "events": events}).encode()
    return decode_batch(body), body


def steps(store: Store) -> list[int]:
    return sorted(store.frame("steps")["step"].to_list())


def store(path: Path, **kw) -> Store:
    return Store(path, window_s=10 * 86400, **kw)


def test_acknowledged_batches_survive_a_crash_before_any_checkpoint(tmp_path):
    s = store(tmp_path)
    for seq in range(3):
        s.ingest(*batch(seq))
    del s  # the process dies: no checkpoint, no close
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    # and the replayed batches are still known: a resend is a duplicate
    assert again.ingest(*batch(2)).duplicate


def test_a_checkpoint_moves_rows_to_parquet_and_nothing_is_counted_twice(tmp_path):
    s = store(tmp_path)
    s.ingest(*batch(0))
    assert s.checkpoint() == 3
    s.ingest(*batch(1))
    del s  # crash after a checkpoint: batch 0 in Parquet, batch 1 only in the WAL
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2, 100, 101, 102]
    assert again.ingest(*batch(0)).duplicate and again.ingest(*batch(1)).duplicate
    # covered segments were deleted; the one holding batch 1 waits for the next checkpoint
    assert all(int(p.stem) > again.committed for p in (tmp_path / "wal").glob("*.wal"))


def test_files_of_a_checkpoint_that_never_committed_are_deleted(tmp_path):
    s = store(tmp_path)
    s.ingest(*batch(0))
    s.checkpoint()
    s.ingest(*batch(1))
    # a crash between writing the Parquet files and committing checkpoint 99
    frame = s.frame("steps").filter(pl.col("step") >= 100)
    partitions.write_checkpoint_parts(tmp_path, "steps", frame, 99, 99)
    del s
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2, 100, 101, 102]  # from the WAL, once
    assert all(p.hi <= again.committed for p in partitions.parts(tmp_path, "steps"))


def test_a_record_cut_short_by_a_crash_is_dropped_and_the_log_goes_on(tmp_path):
    s = store(tmp_path)
    s.ingest(*batch(0))
    s.ingest(*batch(1))
    segment = next((tmp_path / "wal").glob("*.wal"))
    del s
    data = segment.read_bytes()
    segment.write_bytes(data[:-10])  # the second record was never fully written (so never acknowledged)
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2]
    again.ingest(*batch(1))  # the agent resends it
    del again
    assert steps(store(tmp_path)) == [0, 1, 2, 100, 101, 102]


def test_closed_hours_are_compacted_into_one_file(tmp_path):
    hour_ago = NOW - 3 * 3600
    s = store(tmp_path)
    for seq in range(3):
        s.ingest(*batch(seq, ts=hour_ago))
        s.checkpoint()
    folder = next((tmp_path / "kind=steps").glob("date=*/hour=*"))
    assert len(list(folder.glob("*.parquet"))) == 3
    reading = s.scan("steps", hour_ago - 60, NOW)  # a read that listed the files before the compaction
    s.maintain(now=NOW)
    # The merged files stay until the next pass: that read still collects, and a new one reads the merged file only.
    assert reading.collect().height == 9 and s.scan("steps", hour_ago - 60, NOW).collect().height == 9
    assert len(list(folder.glob("*.parquet"))) == 4
    s.maintain(now=NOW + 300)
    (only,) = folder.glob("*.parquet")
    assert pl.read_parquet(only).height == 9
    del s
    assert len(steps(store(tmp_path))) == 9


def test_an_interrupted_compaction_leaves_no_duplicate(tmp_path):
    s = store(tmp_path)
    for seq in range(2):
        s.ingest(*batch(seq, ts=NOW - 3 * 3600))
        s.checkpoint()
    folder = next((tmp_path / "kind=steps").glob("date=*/hour=*"))
    inputs = sorted(folder.glob("*.parquet"))
    # the merged file was written but the inputs not yet deleted
    merged = pl.concat([pl.read_parquet(p) for p in inputs])
    lo, hi = (partitions._PART.match(inputs[0].name).group(1), partitions._PART.match(inputs[-1].name).group(2))
    merged.write_parquet(folder / f"part-{lo}-{hi}.parquet")
    del s
    assert len(steps(store(tmp_path))) == 6


def test_retention_drops_old_hours_and_keeps_under_the_size_bound(tmp_path):
    s = store(tmp_path, retention_s=2 * 86400)
    s.ingest(*batch(0, ts=NOW - 5 * 86400))
    s.ingest(*batch(1, ts=NOW - 2 * 3600))
    s.ingest(*batch(2, ts=NOW - 3600))
    s.checkpoint()
    s.maintain(now=NOW)
    hours = sorted(p.parent.name for p in (tmp_path / "kind=steps").glob("date=*/hour=*/*.parquet"))
    assert len(hours) == 2  # the five-day-old hour is gone
    size = sum(p.stat().st_size for p in tmp_path.glob("kind=*/date=*/hour=*/*.parquet"))
    s.retention_bytes = size - 1  # one hour too many
    s.maintain(now=NOW)
    assert len(list((tmp_path / "kind=steps").glob("date=*/hour=*/*.parquet"))) == 1


def test_files_written_before_a_column_existed_still_load(tmp_path):
    s = store(tmp_path)
    s.ingest(*batch(0))
    s.checkpoint()
    del s
    part = next((tmp_path / "kind=steps").glob("date=*/hour=*/*.parquet"))
    pl.read_parquet(part).drop("stage").write_parquet(part)  # as an older collector wrote it
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2] and again.frame("steps")["stage"].null_count() == 3


# --- faults: a refused append, a failed sync, a checkpoint interrupted at each step -----------------
import errno  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402

from collector import faults, wal  # noqa: E402


def test_an_append_the_disk_refuses_half_way_is_rolled_back_and_later_batches_survive(tmp_path, monkeypatch):
    s = store(tmp_path)
    s.ingest(*batch(0))
    real_write = wal.os.write
    calls = {"n": 0}

    def half_then_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:  # half of batch 1's record reaches the file, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(wal.os, "write", half_then_full)
    with pytest.raises(OSError):
        s.ingest(*batch(1))
    s.ingest(*batch(2, agent="a2"))  # another agent's batch, acknowledged after the failure
    monkeypatch.setattr(wal.os, "write", real_write)
    del s
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2, 200, 201, 202]
    assert not again.ingest(*batch(1)).duplicate  # the refused batch was never applied: its resend is
    assert steps(again) == [0, 1, 2, 100, 101, 102, 200, 201, 202]


def test_a_failed_sync_fails_its_batch_and_the_log_goes_on_in_a_new_segment(tmp_path, monkeypatch):
    s = store(tmp_path)
    s.ingest(*batch(0))
    real_sync = wal.os.fdatasync
    calls = {"n": 0}

    def fail_once(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_sync(fd)

    monkeypatch.setattr(wal.os, "fdatasync", fail_once)
    segment = s.wal.segment
    with pytest.raises(OSError):
        s.ingest(*batch(1))
    assert s.wal.segment == segment + 1
    s.ingest(*batch(2, agent="a2"))
    del s
    again = store(tmp_path)
    # batch 1 may or may not have reached the disk; batch 2 must have, and nothing twice
    got = steps(again)
    assert {0, 1, 2, 200, 201, 202} <= set(got) and len(got) == len(set(got))
    again.ingest(*batch(1))  # the agent resends it: applied, or known already
    assert steps(again) == [0, 1, 2, 100, 101, 102, 200, 201, 202]


def test_concurrent_batches_share_fsyncs_and_each_is_durable_when_acknowledged(tmp_path, monkeypatch):
    s = store(tmp_path)
    real_sync = wal.os.fdatasync
    syncs = {"n": 0}

    def counted(fd):
        syncs["n"] += 1
        time.sleep(0.005)  # a disk that takes its time, so batches pile up behind a sync
        return real_sync(fd)

    def agent(a: int) -> None:
        for seq in range(20):
            s.ingest(*batch(seq, n=1, agent=f"a{a}"))

    monkeypatch.setattr(wal.os, "fdatasync", counted)
    threads = [threading.Thread(target=agent, args=(a,)) for a in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert syncs["n"] < 160  # fewer syncs than batches: group commit
    assert store(tmp_path).scan("steps").collect().height == 160


class Crash(BaseException):
    """Stands for SIGKILL: no except clause of the store catches it."""


CHECKPOINT_POINTS = ["checkpoint.rotated", "checkpoint.part_written", "checkpoint.extras_written",
                     "checkpoint.commit_file_written", "checkpoint.committed", "checkpoint.wal_dropped"]


def _at(name: str, exc: BaseException):
    def point(at):
        if at == name:
            raise exc
    return point


@pytest.mark.parametrize("where", CHECKPOINT_POINTS)
def test_a_crash_at_any_step_of_a_checkpoint_loses_and_duplicates_nothing(tmp_path, monkeypatch, where):
    s = store(tmp_path)
    s.ingest(*batch(0))
    s.checkpoint()
    s.ingest(*batch(1))
    s.ingest(*batch(2, ts=NOW - 7200))  # rows of another hour: two part files
    monkeypatch.setattr(faults, "point", _at(where, Crash()))
    with pytest.raises(Crash):
        s.checkpoint()
    monkeypatch.setattr(faults, "point", lambda at: None)
    del s
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    for seq in range(3):
        assert again.ingest(*batch(seq)).duplicate
    again.checkpoint()
    del again
    final = store(tmp_path)
    assert steps(final) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    on_disk = sorted(final.scan("steps").collect()["step"].to_list())
    assert on_disk == [0, 1, 2, 100, 101, 102, 200, 201, 202]


@pytest.mark.parametrize("where", ["checkpoint.rotated", "checkpoint.part_written", "checkpoint.extras_written",
                                   "checkpoint.commit_file_written"])
def test_a_checkpoint_that_fails_part_way_is_redone_whole_by_the_next(tmp_path, monkeypatch, where):
    s = store(tmp_path)
    s.ingest(*batch(0))
    s.ingest(*batch(1, ts=NOW - 7200))
    monkeypatch.setattr(faults, "point", _at(where, OSError("injected")))
    with pytest.raises(OSError):
        s.checkpoint()
    assert s.problem and "injected" in s.problem
    monkeypatch.setattr(faults, "point", lambda at: None)
    assert sorted(s.scan("steps").collect()["step"].to_list()) == [0, 1, 2, 100, 101, 102]  # reads meanwhile
    s.ingest(*batch(2))
    s.checkpoint()
    assert s.problem is None
    assert sorted(s.scan("steps").collect()["step"].to_list()) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    del s
    again = store(tmp_path)
    assert steps(again) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    assert sorted(again.scan("steps").collect()["step"].to_list()) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
