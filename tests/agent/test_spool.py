"""The spool keeps whole batches durably, in order, bounded; a disk that fails raises and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent import spool as spool_module
from agent.spool import Spool


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    """Mount a small tmpfs at `path` (root only); False when this machine will not."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False).returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem holding `folder`; returns the file to delete to free it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@contextmanager
def full_filesystem(tmp_path: Path, monkeypatch):
    """A spool folder on a full filesystem: a real 256 KiB tmpfs as root, else Spool.write failing with ENOSPC.

    Yields (folder, free) where free() gives the space back."""
    mount = tmp_path / "small"
    if mount_tmpfs(mount, "256k"):
        folder = mount / "spool"
        folder.mkdir()
        filler = fill(mount)
        try:
            yield folder, lambda: filler.unlink()
        finally:
            unmount(mount)
        return
    real_write = Spool.write
    state = {"full": True}

    def write(self, body, events, frames):
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, body, events, frames)

    monkeypatch.setattr(Spool, "write", write)
    yield tmp_path / "spool", lambda: state.update(full=False)


@contextmanager
def read_only_folder(tmp_path: Path):
    """A spool folder that exists but cannot be written: a read-only tmpfs as root, else mode 0555."""
    mount = tmp_path / "ro"
    if mount_tmpfs(mount, "64k", read_only=True):
        try:
            yield mount
        finally:
            unmount(mount)
        return
    mount.mkdir()
    mount.chmod(0o555)
    try:
        yield mount
    finally:
        mount.chmod(0o755)


def test_batches_come_back_in_order_after_a_restart(tmp_path):
    first = Spool(tmp_path)
    for n in range(3):
        first.append(f'{{"n":{n}}}'.encode(), events=n + 1, frames=0)
    second = Spool(tmp_path)
    assert [s.read() for s in second.items] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert second.events == 6 and second.bytes == sum(len(s.read()) for s in second.items)


def test_a_batch_is_fsynced_file_and_folder_before_it_counts(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    spool = Spool(tmp_path)
    item = spool.append(b"{}", 1, 0)
    assert [Path(p).name for p in synced] == [item.path.with_suffix(".tmp").name, tmp_path.name]


@pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs needs root; the RLIMIT_FSIZE case covers others")
def test_a_full_filesystem_raises_enospc_and_leaves_no_half_batch(tmp_path):
    mount = tmp_path / "small"
    if not mount_tmpfs(mount, "256k"):
        pytest.skip("this machine does not mount a tmpfs")
    try:
        spool = Spool(mount / "spool")
        spool.append(b"x" * 1000, 1, 0)
        filler = fill(mount)
        with pytest.raises(OSError) as exc:
            spool.append(b"y" * 20_000, 2, 0)
        assert exc.value.errno == errno.ENOSPC
        assert len(spool) == 1 and spool.events == 1
        assert sorted(p.name for p in (mount / "spool").iterdir()) == [spool.items[0].path.name]  # no .tmp left
        filler.unlink()
        spool.append(b"y" * 20_000, 2, 0)
        assert [s.events for s in Spool(mount / "spool").items] == [1, 2]
    finally:
        unmount(mount)


def test_a_file_size_limit_raises_and_leaves_no_half_batch(tmp_path):
    """RLIMIT_FSIZE in a child process: what a full disk looks like to an unprivileged agent (EFBIG)."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from agent.spool import Spool
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        spool = Spool({str(tmp_path / "spool")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        spool.append(b"x" * 1000, 1, 0)
        try:
            spool.append(b"y" * 20_000, 2, 0)
            errno = None
        except OSError as exc:
            errno = exc.errno
        print(json.dumps({{"errno": errno, "batches": len(spool)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"errno": errno.EFBIG, "batches": 1}
    assert sorted(p.suffix for p in (tmp_path / "spool").iterdir()) == [".batch"]


def test_a_read_only_folder_raises_on_write_but_gives_back_what_it_holds(tmp_path):
    with read_only_folder(tmp_path) as folder:
        spool = Spool(folder)
        assert spool.open_error is None
        if os.access(folder, os.W_OK) and os.geteuid() != 0:
            pytest.skip("this folder is writable after all")
        with pytest.raises(OSError) as exc:
            spool.append(b"{}", 1, 0)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        assert len(spool) == 0


def test_a_folder_that_cannot_be_created_is_tried_again_at_the_next_write(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder's parent should be")
    spool = Spool(blocker / "spool")
    assert spool.open_error is not None and len(spool) == 0
    with pytest.raises(OSError):
        spool.append(b"{}", 1, 0)
    blocker.unlink()
    spool.append(b"{}", 1, 0)
    assert len(spool) == 1 and spool.open_error is None
