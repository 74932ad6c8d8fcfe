"""The agent's disk spool: batches the collector has not acknowledged, oldest first, bounded in bytes.

One file per batch, named `<creation ns>-<events>-<frames>.batch` so the order and what a drop
loses are known without reading it; the body is the batch exactly as it is POSTed, boot epoch and
sequence number included, so a batch spooled before a restart is sent under the epoch it was numbered
in and the collector still knows it if it was applied before. A batch is
written to a temporary name, fsynced, renamed and the folder fsynced before it counts as spooled,
so a crash (or power loss) leaves either the whole batch or none of it. Past `max_bytes` the oldest
batches are deleted and their events counted as dropped.

Every disk error is raised as OSError to the caller (the shipper counts it and keeps the batch in
memory); a folder that cannot be opened now is opened again at the next write.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fleetscope.agent.spool")


@dataclass(frozen=True, eq=False)
class Spooled:
    path: Path
    events: int
    frames: int
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


def _parse(path: Path) -> Spooled | None:
    try:
        _, events, frames = path.stem.split("-")
        return Spooled(path, int(events), int(frames), path.stat().st_size)
    except (ValueError, FileNotFoundError):
        return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, folder: Path, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.items: list[Spooled] = []
        self.bytes = 0
        self.events = 0
        self.dropped_events = 0
        self.dropped_frames = 0
        self._last_ns = 0
        self._opened = False
        self.open_error: OSError | None = None
        try:
            self._open()
        except OSError as exc:
            self.open_error = exc
            log.error("cannot open the spool folder %s (%s); batches wait in memory until it can be opened", self.folder, exc)

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        items = [s for p in sorted(self.folder.glob("*.batch")) if (s := _parse(p)) is not None]
        self._opened, self.open_error = True, None
        self.items = items + self.items
        self.bytes = sum(s.size for s in self.items)
        self.events = sum(s.events for s in self.items)
        try:
            for tmp in self.folder.glob("*.tmp"):
                tmp.unlink()
        except OSError:
            pass  # a read-only folder still gives back what it holds
        if items:
            log.info("spool holds %d batches (%d events) from before this start; they go first",
                     len(items), sum(s.events for s in items))

    def __len__(self) -> int:
        return len(self.items)

    def write(self, body: bytes, events: int, frames: int) -> Spooled:
        """Put one batch on disk durably (file and folder fsynced); it joins the queue with `add`."""
        if not self._opened:
            self._open()
        ns = max(time.time_ns(), self._last_ns + 1)  # strictly increasing names keep the order
        self._last_ns = ns
        path = self.folder / f"{ns:020d}-{events}-{frames}.batch"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.folder)
        except OSError:
            try:
                tmp.unlink(missing_ok=True)  # no half batch left behind, and its space back
            except OSError:
                pass
            raise
        return Spooled(path, events, frames, len(body))

    def add(self, item: Spooled) -> None:
        """Queue a written batch last; past the bound the oldest batches are deleted and counted."""
        self.items.append(item)
        self.bytes += item.size
        self.events += item.events
        while self.bytes > self.max_bytes and len(self.items) > 1:
            oldest = self.items[0]
            log.warning("spool over %d bytes: dropping its oldest batch (%d events)", self.max_bytes, oldest.events)
            self.dropped_events += oldest.events
            self.dropped_frames += oldest.frames
            try:
                self.remove(oldest)
            except OSError:
                pass  # it is out of the queue; a file left behind is resent after a restart and deduplicated

    def append(self, body: bytes, events: int, frames: int) -> Spooled:
        item = self.write(body, events, frames)
        self.add(item)
        return item

    def head(self) -> Spooled | None:
        return self.items[0] if self.items else None

    def forget(self, item: Spooled) -> bool:
        """Take a batch out of the queue without touching its file (one that cannot be read, say)."""
        try:
            self.items.remove(item)
        except ValueError:
            return False
        self.bytes -= item.size
        self.events -= item.events
        return True

    def remove(self, item: Spooled) -> None:
        """Out of the queue, then off the disk; an unlink that fails still leaves it out of the queue and raises.

        No folder fsync here: a deleted batch that comes back after a crash is sent again, and the
        collector knows it by its number.
        """
        self.forget(item)
        item.path.unlink(missing_ok=True)

    def probe(self) -> None:
        """Raise OSError unless a small file can be written durably and deleted (after a fault, to know it is over)."""
        if not self._opened:
            self._open()
        tmp = self.folder / f"probe-{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
