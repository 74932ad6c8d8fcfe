"""Fault points for the durability tests: FLEETSCOPE_FAULT="<point>=<action>[@<n>]" makes a real
collector process fail at a named step (raise an OSError, be killed with SIGKILL, or sleep N seconds)
the n-th time it passes there. Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("FLEETSCOPE_FAULT", "")
_FAULTS: dict[str, tuple[str, int]] = {}
for item in filter(None, (part.strip() for part in _SPEC.split(","))):
    point, _, action = item.partition("=")
    action, _, nth = action.partition("@")
    _FAULTS[point] = (action, int(nth or 1))
_seen: dict[str, int] = {}


def point(name: str) -> None:
    if not _FAULTS or name not in _FAULTS:
        return
    action, nth = _FAULTS[name]
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise OSError(f"fault injected at {name}")
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
