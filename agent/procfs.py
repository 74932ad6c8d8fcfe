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


def read_head(path: Path | str, size: int = 4096) -> str | None:
    """The first `size` bytes of a file (at most), or None when it does not exist: for a file whose first line is
    all one wants (/proc/stat, whose interrupt line alone runs to tens of kilobytes on a large node)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return os.read(fd, size).decode(errors="replace")
    finally:
        os.close(fd)


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
