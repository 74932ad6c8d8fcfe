"""The hot tier's share of the memory budget, steered by the process's measured resident memory.

The hot tier's tables are the only memory the collector can give back on demand; everything else the process
holds is the interpreter and its libraries, the rows awaiting a checkpoint (bounded on their own), and what the
upkeep passes, the analysis, compactions and reads allocate for a moment. That last part is large (at 4,096
nodes and a 16,384-rank job it was 0.8-1.1 GiB over ~1.3 GiB at rest in the fleet bench) and depends on the
fleet's shape, the allocator and how the passes happen to overlap, so no fixed share of the budget fits every
fleet: a third left the bench's peak 5-13% over its 2 GiB budget.

So before each upkeep pass the governor reads the highest resident memory since the last pass (the kernel's
VmHWM, reset after each read through /proc/self/clear_refs, plus the child processes' current RSS: the ingest
workers) and sets the hot tier's budget from it:
- above HIGH of the budget, the hot tier's budget drops by the overshoot, counted from what the tier holds
  (shrinking a budget the tier does not fill would free nothing), never below FLOOR of the budget;
- below LOW of the budget, it grows back by GROWTH of the budget a minute, up to its nominal share (a third): slowly,
  as the pressure comes back while the fleet keeps sending. Growing back a 32nd or a 64th of the budget a pass
  (every 10-15 s there) had the hot tier at its full share within two minutes of a cut, and the process past the
  budget soon after (x0.99 and x1.01 in two fleet-bench runs, the second 317 MiB above the pass before).
The next pass trims to the new budget (collector.hot: the oldest rows of the largest tables first, each rank's raw
steps down to MIN_STEPS); the rows dropped are on disk already, so reads of those times go to the warm tier.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("fleetscope.collector")

HIGH = 0.80  # of the budget: past this, the hot tier gives back the overshoot (a pass's working copies went 0.3
#              GiB past the high of the pass before in the fleet bench: the rest of the budget is their margin)
LOW = 0.70  # of the budget: under this, the hot tier's budget grows back
GROWTH = 1 / 64  # of the budget a minute under LOW (at 2 GiB, 32 MiB: 13 minutes from the floor to the full share)
FLOOR = 1 / 8  # of the budget, the least the hot tier gets (each rank's MIN_STEPS steps and the latest frames fit)
NOMINAL = 1 / 3  # of the budget, the hot tier's share when the process has room
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int | str = "self", proc: Path = Path("/proc")) -> int:
    """A process's resident memory in bytes (0 if it is gone)."""
    try:
        return int((proc / str(pid) / "statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _kib(text: str, field: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return None


class ProcessMemory:
    """The highest resident memory of this process and its children since the last call of `high()`."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.resets = True  # whether VmHWM can be reset here (not in every sandbox): else the current RSS is read

    def high(self) -> int:
        own = self.proc / "self"
        try:
            status = (own / "status").read_text()
        except OSError:
            return 0
        hwm, now = _kib(status, "VmHWM:"), _kib(status, "VmRSS:") or 0
        value = now
        if self.resets and hwm is not None:
            try:
                (own / "clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0 on)
                value = max(hwm, now)
            except OSError as exc:
                self.resets = False
                log.debug("cannot reset the peak resident memory (%s); reading the current one each pass", exc)
        return value + sum(rss(pid, self.proc) for pid in self.children())

    def children(self) -> list[int]:
        pids: list[int] = []
        try:
            for task in (self.proc / "self" / "task").iterdir():
                try:
                    pids += [int(p) for p in (task / "children").read_text().split()]
                except (OSError, ValueError):
                    continue
        except OSError:
            pass
        return pids


class Governor:
    """Sets `tier.budget_bytes` from the process's measured high (see the module's docstring)."""

    def __init__(self, budget: int, tier, high: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.tier = tier  # collector.hot.HotTier: its budget_bytes and held()
        self.nominal = int(budget * NOMINAL)
        self.floor = int(budget * FLOOR)
        self.high = high if high is not None else ProcessMemory().high
        self.last_high = 0  # bytes: the highest resident memory over the last pass
        self.peak = 0  # and over every pass so far
        self.clock = clock
        self._observed = clock()
        tier.budget_bytes = self.nominal

    def observe(self) -> int:
        """Read the high since the last call and set the hot tier's budget; returns the new budget."""
        high = self.last_high = self.high()
        self.peak = max(self.peak, high)
        now = self.clock()
        elapsed, self._observed = min(max(now - self._observed, 0.0), 60.0), now
        current = self.tier.budget_bytes
        if high > HIGH * self.budget:
            held = min(current, self.tier.held())
            new = max(self.floor, held - (high - int(HIGH * self.budget)))
            if new < current:
                log.info("resident memory reached %.0f MiB of a %.0f MiB budget: the hot tier's budget goes from "
                         "%.0f to %.0f MiB", high / 2**20, self.budget / 2**20, current / 2**20, new / 2**20)
        elif high < LOW * self.budget:
            new = min(self.nominal, current + int(GROWTH * self.budget * elapsed / 60))
        else:
            new = current
        self.tier.budget_bytes = new
        return new
