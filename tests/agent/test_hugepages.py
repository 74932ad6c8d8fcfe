"""Which of the agent's memory goes onto huge pages (agent/hugepages.py)."""

from __future__ import annotations

import os

import pytest

from agent import hugepages
from agent.hugepages import HUGE_PAGE, collapse_heap, dense_ranges

MAPS = """\
55d0c0000000-55d0c0a00000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000401000 ---p 00000000 00:00 0
7f0000401000-7f0000c01000 rw-p 00000000 00:00 0
7f1000000000-7f1000400000 r-xp 00000000 08:01 1234                       /usr/lib/libpython3.11.so.1.0
7f1000400000-7f1000600000 rw-p 00400000 08:01 1234                       /usr/lib/libpython3.11.so.1.0
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0                          [stack]
7f2000100000-7f2000300000 rw-p 00000000 00:00 0
"""


def test_only_dense_aligned_ranges_of_private_anonymous_memory_are_chosen():
    sparse = {0x7F0000401000 // HUGE_PAGE * HUGE_PAGE + HUGE_PAGE * 2}  # a thread stack's mostly empty range
    ranges = dense_ranges(MAPS, lambda at: 0.1 if at in sparse else 0.9)
    starts = [start for start, _ in ranges]
    assert all(end - start == HUGE_PAGE and start % HUGE_PAGE == 0 for start, end in ranges)
    assert starts[:5] == [0x55D0C0000000 + i * HUGE_PAGE for i in range(5)]  # the heap, all of it
    assert 0x7F0000000000 in starts and 0x7F0000200000 in starts  # an anonymous mapping
    assert not sparse & set(starts)
    assert 0x7F0000400000 not in starts  # the guard page's range: not inside one read-write mapping
    assert not any(0x7F1000000000 <= s < 0x7F1000600000 for s in starts)  # files: code and data of libraries
    assert not any(0x7FFC00000000 <= s < 0x7FFC00400000 for s in starts)  # the main stack
    assert not any(0x7F2000000000 <= s < 0x7F2000400000 for s in starts)  # no whole aligned 2 MiB inside


def test_a_range_below_the_residency_threshold_is_left_alone():
    assert dense_ranges(MAPS, lambda at: hugepages.MIN_RESIDENT - 0.01) == []


def _kernel_can_collapse() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            never = "[never]" in fh.read()
    except OSError:
        return False
    return (major, minor) >= (6, 1) and not never


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc")
def test_what_it_reports_collapsed_is_on_huge_pages():
    def anon_huge_kib() -> int:
        with open("/proc/self/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("AnonHugePages:"))

    block = bytearray(8 * HUGE_PAGE)  # dense: every page written
    for i in range(0, len(block), 4096):
        block[i] = 1
    before = anon_huge_kib()
    mib = collapse_heap()
    assert anon_huge_kib() - before >= mib * 1024
    if _kernel_can_collapse():  # else (before Linux 6.1, or THP "never") it collapses nothing and says 0
        assert mib >= (7 * HUGE_PAGE) >> 20  # at least the 7 whole aligned ranges inside the 16 MiB block
    assert collapse_heap("/nonexistent/maps") == 0
    assert collapse_heap(pagemap_path="/nonexistent/pagemap") == 0  # residency unknown: nothing collapsed
    del block
