"""Pure parsers for /proc files psutil does not cover (or covers without a root path); tested on strings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def read_text(path: Path) -> str | None:
    """A file's text, or None when it does not exist on this kernel."""
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


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
