"""The agent's threads, named in the kernel too.

Python names its threads for itself only: in /proc/<pid>/task/<tid>/comm, `top -H` and `ps -L` every thread of
the agent is "python". A `Thread` from here also gives the kernel its name (prctl PR_SET_NAME, at most 15 bytes)
when it starts, so an operator sees which of the sampler's lanes, the /metrics handlers or the shipper is using
the CPU, and bench/agent_overhead.py splits the agent's CPU by thread. Where the kernel cannot be told (not
Linux), the thread runs unnamed there, as before.
"""

from __future__ import annotations

import ctypes
import sys
import threading

PR_SET_NAME = 15
_prctl = None


def set_os_name(name: str) -> bool:
    """Name the calling thread in the kernel (the first 15 bytes of `name`); False where that is not possible."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _prctl is None:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        return _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode("utf-8", "replace")[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Thread(threading.Thread):
    """threading.Thread whose name the kernel knows too (see the module docstring)."""

    def run(self) -> None:
        set_os_name(self.name)
        super().run()
