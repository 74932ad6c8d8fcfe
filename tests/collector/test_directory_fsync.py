"""A checkpoint makes its new folders, its renamed files and its commit durable (each directory fsynced after the
entry appeared in it) before it deletes the WAL segments they replace: after a power cut the rows are in one place
or the other, never in neither."""

from __future__ import annotations

from pathlib import Path

from collector import partitions, store as store_module, wal as wal_module
from collector.store import Store
from tests.collector.test_store import batch


def test_new_folders_files_and_the_commit_are_fsynced_before_the_wal_segments_go(tmp_path, monkeypatch):
    events: list[tuple[str, Path]] = []
    real_fsync_dir, real_rename, real_unlink = wal_module.fsync_dir, Path.rename, Path.unlink

    def fsync_dir(path):
        events.append(("fsync", Path(path).resolve()))
        real_fsync_dir(path)

    def rename(self, target):
        result = real_rename(self, target)
        events.append(("rename", Path(target).resolve()))
        return result

    def unlink(self, missing_ok=False):
        events.append(("unlink", self.resolve()))
        return real_unlink(self, missing_ok=missing_ok)

    for module in (wal_module, partitions, store_module):
        monkeypatch.setattr(module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(Path, "unlink", unlink)

    s = Store(tmp_path, window_s=10 * 86400, fsync=True)
    for seq in range(3):
        s.ingest(*batch(seq))
    before = {p.resolve() for p in tmp_path.rglob("*")}
    events.clear()
    assert s.checkpoint() == 9
    wal = (tmp_path / "wal").resolve()
    gone = [i for i, (kind, path) in enumerate(events) if kind == "unlink" and path.parent == wal and path.suffix == ".wal"]
    assert gone, "the checkpoint deleted no WAL segment: the test proves nothing"
    first_gone = gone[0]
    new = {p.resolve() for p in tmp_path.rglob("*")} - before
    new_folders = sorted(p for p in new if p.is_dir())
    new_parts = sorted(p for p in new if p.suffix == ".parquet")
    assert new_folders and new_parts, "the checkpoint wrote no partition: the test proves nothing"

    def fsynced_after(folder: Path, since: int) -> bool:
        return any(kind == "fsync" and path == folder for kind, path in events[since:first_gone])

    for folder in new_folders:  # made durable in its parent
        assert fsynced_after(folder.parent, 0), f"{folder} was not made durable before the WAL segments went"
    for part in new_parts + [(tmp_path / "checkpoint.json").resolve()]:  # renamed into place, then its folder fsynced
        renamed = max(i for i, (kind, path) in enumerate(events) if kind == "rename" and path == part)
        assert renamed < first_gone and fsynced_after(part.parent, renamed + 1), \
            f"{part}'s rename was not made durable before the WAL segments went"
    s.wal.close()

