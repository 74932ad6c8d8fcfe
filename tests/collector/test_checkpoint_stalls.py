"""What a checkpoint does that made acknowledgements wait, at every checkpoint (#10).

A checkpointed WAL segment is deleted a piece at a time, each cut made durable before the next
(collector.wal.Wal._delete): its blocks are freed over several journal commits, not in one that every
append syncing at that moment waits for. And the rows a checkpoint takes do not leave another one due.
"""

from __future__ import annotations

from pathlib import Path

from collector import wal as wal_module
from collector.wal import Wal


def _filled(folder: Path, records: int, size: int) -> tuple[Wal, int, Path]:
    w = Wal(folder, fsync=True)
    w.open()
    for i in range(records):
        w.append(bytes([i % 256]) * size)
    closed = w.rotate()
    return w, closed, folder / f"{closed:020d}.wal"


def test_a_checkpointed_segment_is_cut_a_synced_piece_at_a_time_then_unlinked(tmp_path, monkeypatch):
    chunk = 4096
    monkeypatch.setattr(wal_module, "DELETE_CHUNK", chunk)
    w, closed, path = _filled(tmp_path, records=20, size=1500)  # ~30 KB: seven pieces
    size = path.stat().st_size
    assert size > 3 * chunk, "the segment is too small to be cut: the test proves nothing"
    w.append(b"after the rotation")  # the open segment, which must stay whole

    events: list[tuple[str, object]] = []
    real_ftruncate, real_fsync, real_unlink = wal_module.os.ftruncate, wal_module.os.fsync, Path.unlink

    def ftruncate(fd, length):
        events.append(("truncate", length))
        real_ftruncate(fd, length)

    def fsync(fd):
        events.append(("fsync", fd))
        real_fsync(fd)

    def unlink(self, missing_ok=False):
        events.append(("unlink", self.name))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(wal_module.os, "ftruncate", ftruncate)
    monkeypatch.setattr(wal_module.os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    w.drop_through(closed)

    assert not path.exists()
    cuts = [i for i, (kind, _) in enumerate(events) if kind == "truncate"]
    lengths = [events[i][1] for i in cuts]
    assert lengths, "the segment was unlinked whole, not cut"
    assert lengths == list(range(size - chunk, 0, -chunk)), lengths  # a piece at a time, down to the last one
    for i in cuts:  # each cut made durable before the next one
        assert events[i + 1][0] == "fsync", events
    assert events.index(("unlink", path.name)) > cuts[-1]
    w.close()
    # The open segment was not touched: replay gives its record, and only it.
    assert [payload for _, payload in Wal(tmp_path).replay(after=closed)] == [b"after the rotation"]


def test_a_segment_cut_short_by_a_crash_while_deleted_is_skipped_and_deleted_later(tmp_path):
    w, closed, path = _filled(tmp_path, records=20, size=1500)
    w.append(b"kept")
    w.close()
    with open(path, "r+b") as fh:  # a crash between two cuts: a shortened segment, mid-record
        fh.truncate(path.stat().st_size // 2 + 3)
    again = Wal(tmp_path)
    assert [payload for _, payload in again.replay(after=closed)] == [b"kept"]
    again.open()
    again.drop_through(closed)
    assert not path.exists()
    again.close()


def test_rows_a_checkpoint_takes_do_not_call_for_another_checkpoint(tmp_path, monkeypatch):
    """Past its memory limit every applied batch asks for a checkpoint (Store.checkpoint_due); one applied after a
    checkpoint began but before it took the rows asked for the rows that checkpoint writes, and must not leave a
    second one due (at 100,000 events/s a redundant checkpoint of a few MiB followed each one, #10)."""
    from collector.store import Store
    from tests.collector.test_store import batch, steps

    s = Store(tmp_path, window_s=10 * 86400)
    s.ingest(*batch(0))
    s.unwritten_limit = s.unwritten_bytes() // 2  # each batch goes over it (and two stay under the refusal at 4x)
    s.checkpoint_due.set()  # as batch 0 would have
    real_prepare = s.goodput.prepare

    def prepare_then_a_batch_arrives() -> None:
        real_prepare()
        s.ingest(*batch(1))  # between the checkpoint's start and its taking the rows
        assert s.checkpoint_due.is_set(), "the batch did not ask for a checkpoint: the test proves nothing"

    monkeypatch.setattr(s.goodput, "prepare", prepare_then_a_batch_arrives)
    assert s.checkpoint() == 6  # both batches' rows written by this one
    assert not s.checkpoint_due.is_set()
    s.ingest(*batch(2))  # a batch after it still asks for the next
    assert s.checkpoint_due.is_set()
    assert steps(s) == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    s.wal.close()
