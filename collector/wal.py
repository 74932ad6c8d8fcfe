"""Write-ahead log: every ingest body is appended and fsynced before the collector acknowledges it.

The log is a folder of numbered segments (`00000000000000000001.wal`, ...). A record is a 4-byte
big-endian length, a 4-byte CRC-32 of the payload, and the payload (the batch body as received).
A record cut short by a crash was never acknowledged: replay stops there and truncates it. The
store rotates to a new segment at each checkpoint and deletes the segments the checkpoint covers.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

log = logging.getLogger("fleetscope.collector.wal")

HEADER = struct.Struct(">II")
MAX_RECORD = 256 * 1024 * 1024


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Wal:
    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        segments = self.segments()
        self.segment = segments[-1] if segments else 1
        self._fh = open(self._path(self.segment), "ab")
        if not segments:
            _fsync_dir(self.folder)

    def _path(self, segment: int) -> Path:
        return self.folder / f"{segment:020d}.wal"

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.wal") if p.stem.isdigit())

    def append(self, payload: bytes) -> None:
        """Append one record and make it durable; raises OSError if the disk refuses."""
        self._fh.write(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def rotate(self) -> int:
        """Start a new segment; returns the number of the one just closed."""
        closed = self.segment
        self._fh.close()
        self.segment += 1
        self._fh = open(self._path(self.segment), "ab")
        if self.fsync:
            _fsync_dir(self.folder)
        return closed

    def drop_through(self, segment: int) -> None:
        """Delete every segment up to and including `segment` (its rows are checkpointed)."""
        for n in self.segments():
            if n <= segment and n != self.segment:
                self._path(n).unlink(missing_ok=True)

    def replay(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """(segment, payload) of every intact record in segments numbered above `after`."""
        for n in self.segments():
            if n <= after:
                continue
            path = self._path(n)
            with open(path, "rb") as fh:
                data = fh.read()
            offset = 0
            while offset < len(data):
                if offset + HEADER.size > len(data):
                    break
                length, crc = HEADER.unpack_from(data, offset)
                end = offset + HEADER.size + length
                payload = data[offset + HEADER.size:end]
                if length > MAX_RECORD or end > len(data) or zlib.crc32(payload) != crc:
                    break
                yield n, payload
                offset = end
            if offset < len(data):
                log.warning("WAL segment %s: %d bytes after the last intact record (a write cut short by a crash, "
                            "never acknowledged); truncating", path.name, len(data) - offset)
                if n == self.segment:
                    self._fh.truncate(offset)
                else:
                    with open(path, "r+b") as fh:
                        fh.truncate(offset)

    def close(self) -> None:
        self._fh.close()
