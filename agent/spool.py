"""The agent's disk spool: batches the collector has not acknowledged, oldest first, bounded in bytes.

One file per batch, named `<creation ns>-<events>-<frames>.batch` so the order and what a drop
loses are known without reading it; the body is the batch exactly as it is POSTed. Files are
written to a temporary name and renamed, so a crash leaves no half batch. Past `max_bytes` the
oldest batches are deleted and their events counted as dropped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fleetscope.agent.spool")


@dataclass(frozen=True)
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


class Spool:
    def __init__(self, folder: Path, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink()
        self.items: list[Spooled] = [s for p in sorted(self.folder.glob("*.batch")) if (s := _parse(p)) is not None]
        self.bytes = sum(s.size for s in self.items)
        self.dropped_events = 0
        self.dropped_frames = 0
        self._last_ns = 0
        if self.items:
            log.info("spool holds %d batches (%d events) from before this start; they go first",
                     len(self.items), sum(s.events for s in self.items))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def events(self) -> int:
        return sum(s.events for s in self.items)

    def append(self, body: bytes, events: int, frames: int) -> None:
        ns = max(time.time_ns(), self._last_ns + 1)  # strictly increasing names keep the order
        self._last_ns = ns
        path = self.folder / f"{ns:020d}-{events}-{frames}.batch"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)
        self.items.append(Spooled(path, events, frames, len(body)))
        self.bytes += len(body)
        while self.bytes > self.max_bytes and len(self.items) > 1:
            oldest = self.items[0]
            log.warning("spool over %d bytes: dropping its oldest batch (%d events)", self.max_bytes, oldest.events)
            self.remove(oldest)
            self.dropped_events += oldest.events
            self.dropped_frames += oldest.frames

    def head(self) -> Spooled | None:
        return self.items[0] if self.items else None

    def remove(self, item: Spooled) -> None:
        item.path.unlink(missing_ok=True)
        self.items.remove(item)
        self.bytes -= item.size
