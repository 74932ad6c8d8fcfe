"""Pure parsers for /proc files psutil does not cover (or covers without a root path); tested on strings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def read_text(path: Path | str) -> str | None:
    """A file's text, or None when it does not exist on this kernel.

    Three system calls (open, read until the end, close), not the seven of `Path.read_text`: the agent reads
    a few dozen of these small /proc and /sys files every sample."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)).decode(errors="replace")


def start_ticks(procfs: str, pid: int) -> str | None:
    """A process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat), or None when it is gone:
    with the pid, what names one process across pid reuse (the agent's per-process caches key on both)."""
    try:
        fd = os.open(f"{procfs}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:  # os.read, not open(): no io objects built for one read (the GPU source asks at each sample)
        return os.read(fd, 4096).rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None
    finally:
        os.close(fd)


class KeptFile:
    """A /proc or /sys file read at every sample: opened once, then read with one pread from offset 0, for which
    the kernel writes the text afresh (no open, close or path walk each time). A file with blocks on a disk (a
    test's fixture, which may be replaced) is opened anew at each read."""

    __slots__ = ("path", "_fd")

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._fd: int | None = None

    def read(self, head: int | None = None) -> str | None:
        """The file's text (only its first `head` bytes, if given), or None when it does not exist (any more)."""
        fd = self._fd
        if fd is not None:
            try:
                return _pread_all(fd, head).decode(errors="replace")
            except OSError:  # the device went (ENODEV), or the file was replaced: open it again below
                self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            data = _pread_all(fd, head)
            keep = os.fstat(fd).st_blocks == 0  # procfs and sysfs files occupy no blocks
        except BaseException:
            os.close(fd)
            raise
        if keep:
            self._fd = fd
        else:
            os.close(fd)
        return data.decode(errors="replace")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pread_all(fd: int, head: int | None) -> bytes:
    if head is not None:
        return os.pread(fd, head, 0)
    data = os.pread(fd, 65536, 0)
    if len(data) < 65536:  # a short read is the end of a /proc or /sys file (and of a plain one)
        return data
    chunks = [data]
    while chunk := os.pread(fd, 65536, sum(map(len, chunks))):
        chunks.append(chunk)
    return b"".join(chunks)


class KeptFiles:
    """KeptFile by path, for files whose set changes (a network interface's, a sensor's): read(path)."""

    def __init__(self) -> None:
        self._files: dict[str, KeptFile] = {}

    def read(self, path: str) -> str | None:
        kept = self._files.get(path)
        if kept is None:
            kept = self._files[path] = KeptFile(path)
        text = kept.read()
        if text is None:  # gone: forget it, so that a changing set of files does not grow the table
            kept.close()
            del self._files[path]
        return text

    def close(self) -> None:
        for kept in self._files.values():
            kept.close()
        self._files.clear()


def parse_pressure(text: str) -> dict[str, float]:
    """/proc/pressure/<resource>: {"some": seconds, "full": seconds} of cumulative stall time."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        values = dict(f.split("=", 1) for f in fields)
        if "total" in values:
            out[kind] = int(values["total"]) / 1e6  # microseconds
    return out


def parse_keyed(text: str) -> dict[str, int]:
    """/proc/meminfo and /proc/vmstat: "Key: value [kB]" lines; kB values are returned in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) < 2:
            continue
        try:
            value = int(parts[1])
        except ValueError:
            continue
        out[parts[0]] = value * 1024 if len(parts) > 2 and parts[2] == "kB" else value
    return out


def pick_keyed(text: str, keys: tuple[str, ...]) -> dict[str, int]:
    """`parse_keyed(text)` restricted to `keys`, without splitting the lines nobody asked for (/proc/vmstat has
    ~190 of them, and the memory source wants one)."""
    out: dict[str, int] = {}
    text = "\n" + text
    for key in keys:
        start = 0
        while True:
            at = text.find("\n" + key, start)
            if at < 0:
                break
            start = at + 1 + len(key)
            if text[start:start + 1] in (":", " ", "\t"):
                end = text.find("\n", start)
                parts = text[start:end if end >= 0 else len(text)].replace(":", " ").split()
                try:
                    value = int(parts[0]) if parts else None
                except ValueError:
                    value = None
                if value is not None:
                    out[key] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
                break
    return out


@dataclass(frozen=True)
class DiskStats:
    device: str
    reads: int
    read_bytes: int
    read_seconds: float
    writes: int
    written_bytes: int
    write_seconds: float
    in_progress: int
    io_seconds: float
    weighted_io_seconds: float
    discards: int | None = None
    flushes: int | None = None


SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's sector size


def parse_diskstats(text: str) -> list[DiskStats]:
    """/proc/diskstats (kernel Documentation/admin-guide/iostats.rst); 14, 18 or 20 fields."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 14:
            continue
        n = [int(x) for x in f[3:]]
        out.append(DiskStats(
            device=f[2], reads=n[0], read_bytes=n[2] * SECTOR, read_seconds=n[3] / 1000, writes=n[4],
            written_bytes=n[6] * SECTOR, write_seconds=n[7] / 1000, in_progress=n[8], io_seconds=n[9] / 1000,
            weighted_io_seconds=n[10] / 1000,
            discards=n[11] if len(n) >= 15 else None,
            flushes=n[15] if len(n) >= 17 else None,
        ))
    return out
