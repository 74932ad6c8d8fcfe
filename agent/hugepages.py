"""Moves the agent's long-lived heap onto 2 MiB pages, so a sample after seconds of idleness touches fewer pages.

Why: a sample runs every 5 s and touches a thousand-odd 4 KiB pages spread over the interpreter's heap (objects,
code, dicts). On a virtual machine, the first touch of a page that has not been touched for a few seconds costs
tens of microseconds (about 45 us per 4 KiB page on the VM the bench ran on, against nanoseconds when warm), so
most of an idle agent's CPU went to those first touches rather than to its own work. The same objects on 2 MiB
pages need one translation per 2 MiB instead of one per 4 KiB.

How: MADV_COLLAPSE (Linux 6.1 and newer) on each 2 MiB-aligned range of private anonymous memory that is already
mostly resident (/proc/self/pagemap), whatever the system's transparent-huge-page mode short of "never". Sparse ranges
(thread stacks, fresh arenas) are left alone, so resident memory grows by at most what fills the gaps of dense
ranges. Where the kernel cannot (older kernels, THP disabled, not Linux) nothing changes and the agent says so
at debug level.

And for what the agent allocates later: `fleetscope agent` starts its interpreter again, once, with glibc's malloc
for every object (PYTHONMALLOC=malloc), glibc's heap on huge pages (glibc.malloc.hugetlb=1, glibc 2.35 and newer;
older ones ignore it) and one heap for all threads (glibc.malloc.arena_max=1), since all of it must be set before
an interpreter starts (reexec_for_malloc). pymalloc keeps its objects in 1 MiB arenas of small pages, mapped and
unmapped as a scrape's objects come and go, and glibc gives each thread that allocates an arena of its own: the
sampler's objects, the scrape's and the start-up's then lie apart, each scattered over small pages. With one heap,
advised onto 2 MiB pages, they lie together (the GIL lets one thread allocate at a time, so the shared heap's lock
is not contended). Side by side on the bench's VM (8 fake GPUs, CPU of each thread over 5 s windows), a sample took
35-56 ms this way against 70-90 ms with pymalloc and the collapse alone, and a scrape's handler 9-14 ms against
34-46. The agent's config setting `huge_pages = false`, or any PYTHONMALLOC already in the environment, leaves the
interpreter as it started.

The interpreter's own code (libpython's read-only part) is moved onto huge pages too, at the same addresses
(remap_code, below; config huge_page_code).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import sys
from collections.abc import Mapping

log = logging.getLogger("fleetscope.agent.hugepages")

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
MIN_RESIDENT = 0.75  # share of a 2 MiB range's small pages already in memory before it is collapsed
# What the agent's interpreter runs with (reexec_for_malloc); tunables the environment already sets are kept.
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1")


def malloc_environment(environ: Mapping[str, str], libc: str) -> dict[str, str] | None:
    """The environment for an interpreter with glibc's malloc on huge pages, or None when this one must stay: not
    glibc, or PYTHONMALLOC already chosen (by a previous start, or by whoever started the agent)."""
    if "PYTHONMALLOC" in environ or not libc.startswith("glibc"):
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    have = {t.partition("=")[0] for t in tunables}
    tunables += [t for t in MALLOC_TUNABLES if t.partition("=")[0] not in have]
    return {**environ, "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": ":".join(tunables)}


def reexec_for_malloc() -> None:
    """Starts this program again, in this process, with malloc_environment(); returns only where it need not (or
    cannot: then it says why and the agent runs on as it is)."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
        libc = ""
    env = malloc_environment(os.environ, libc)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as exc:
        log.warning("huge pages: could not start the agent again with glibc's malloc (%s); it runs with pymalloc", exc)


def dense_ranges(maps_text: str, resident_share) -> list[tuple[int, int]]:
    """2 MiB-aligned (start, end) ranges inside private anonymous read-write mappings (the heap and anonymous
    mmaps, not the stack nor files) whose `resident_share(start)` is at least MIN_RESIDENT."""
    out = []
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[1] != "rw-p":
            continue
        path = parts[5] if len(parts) > 5 else ""
        if path not in ("", "[heap]"):
            continue
        start, _, end = parts[0].partition("-")
        lo = -(-int(start, 16) // HUGE_PAGE) * HUGE_PAGE
        hi = int(end, 16) // HUGE_PAGE * HUGE_PAGE
        out += [(at, at + HUGE_PAGE) for at in range(lo, hi, HUGE_PAGE) if resident_share(at) >= MIN_RESIDENT]
    return out


def collapse_heap(maps_path: str = "/proc/self/maps", pagemap_path: str = "/proc/self/pagemap") -> int:
    """Collapses the dense ranges of this process's heap into huge pages; the MiB collapsed (0 where it cannot)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        with open(maps_path) as fh:
            maps_text = fh.read()
        # Residency from /proc/self/pagemap (bit 63 of each page's entry), not mincore(2): the systemd unit's
        # SystemCallFilter=@system-service allows reading files and madvise, and would kill the agent on mincore.
        pagemap = os.open(pagemap_path, os.O_RDONLY)
    except (OSError, AttributeError) as exc:
        log.debug("huge pages: %s", exc)
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    pages = HUGE_PAGE // mmap.PAGESIZE
    entries = struct.Struct(f"={pages}Q")

    def resident_share(at: int) -> float:
        try:
            raw = os.pread(pagemap, entries.size, at // mmap.PAGESIZE * 8)
        except OSError:
            return 0.0
        if len(raw) != entries.size:
            return 0.0
        return sum(e >> 63 for e in entries.unpack(raw)) / pages

    try:
        ranges = dense_ranges(maps_text, resident_share)
    finally:
        os.close(pagemap)
    collapsed, refused = 0, 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += 1
        else:
            refused += 1
    if refused:
        log.debug("huge pages: the kernel refused %d of %d ranges (errno %d)", refused, refused + collapsed, ctypes.get_errno())
    return collapsed * HUGE_PAGE >> 20


# The interpreter's own code. A sample runs some 250 distinct 4 KiB pages of libpython's machine code and reads some
# 40 of its constants: file-backed pages, which stay small pages where the kernel lacks CONFIG_READ_ONLY_THP_FOR_FS.
# Each 2 MiB-aligned range of the library's read-only part (its headers, code and constants, which lie together in
# front of its data) is copied onto an anonymous huge page, made read+execute, and moved over the original with
# mremap: the same bytes at the same addresses, so nothing that points into the code notices, and a thread that
# runs there meanwhile waits for the mapping's lock and carries on. The library's data (written at run time) stays
# where it is. On the bench's VM (8 fake GPUs, 15 s scrapes, three agents side by side) the agent's CPU went from
# 574-652 ms/min to 209-437. The cost: 4 MiB of memory of its own rather than the page cache's shared pages, and
# profilers that find the interpreter by its file's code mapping in /proc/<pid>/maps (py-spy, perf) cannot read it
# (config huge_page_code = false keeps the code on the file's pages); and the library's headers and constants that
# share those 2 MiB with code become executable. Moving only the ranges past the library's first code page (which
# profilers need) gave less, and less steadily (269-631 ms/min): most of what a sample runs lies in the first 2 MiB.
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MADV_HUGEPAGE = 14
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
_READ_ONLY = ("r--p", "r-xp")


def code_ranges(maps_text: str, address: int) -> list[tuple[int, int]]:
    """The 2 MiB-aligned (start, end) ranges that lie wholly inside the read-only, file-backed part of the object
    whose code holds `address` (the contiguous mappings of that file that are read-only or read+execute) and hold
    some of its code; [] when `address` is in no read+execute mapping of a file."""
    rows = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        start, _, end = parts[0].partition("-")
        rows.append((int(start, 16), int(end, 16), parts[1], parts[5].strip()))
    at = next((i for i, (lo, hi, _, _) in enumerate(rows) if lo <= address < hi), None)
    if at is None or rows[at][2] != "r-xp" or not rows[at][3].startswith("/"):
        return []
    path = rows[at][3]
    first = last = at
    while first > 0 and rows[first - 1][3] == path and rows[first - 1][2] in _READ_ONLY and rows[first - 1][1] == rows[first][0]:
        first -= 1
    while last + 1 < len(rows) and rows[last + 1][3] == path and rows[last + 1][2] in _READ_ONLY and rows[last + 1][0] == rows[last][1]:
        last += 1
    lo = -(-rows[first][0] // HUGE_PAGE) * HUGE_PAGE
    hi = rows[last][1] // HUGE_PAGE * HUGE_PAGE
    code = [(a, b) for a, b, perms, _ in rows[first:last + 1] if perms == "r-xp"]
    return [(s, s + HUGE_PAGE) for s in range(lo, hi, HUGE_PAGE) if any(a < s + HUGE_PAGE and s < b for a, b in code)]


def remap_code(maps_path: str = "/proc/self/maps") -> int:
    """Moves the interpreter's code onto huge pages (see above); the MiB moved (0 where it cannot: not Linux, no
    huge page to be had, a policy that forbids making memory executable)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(maps_path) as fh:
            maps_text = fh.read()
        address = ctypes.cast(ctypes.pythonapi.Py_IncRef, ctypes.c_void_p).value  # in libpython, or the executable
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("huge pages for code: %s", exc)
        return 0
    ranges = code_ranges(maps_text, address or 0)
    if not ranges:
        return 0
    void, size = ctypes.c_void_p, ctypes.c_size_t
    mmap_, mremap, mprotect, munmap, madvise = libc.mmap, libc.mremap, libc.mprotect, libc.munmap, libc.madvise
    mmap_.restype, mmap_.argtypes = void, [void, size, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    mremap.restype, mremap.argtypes = void, [void, size, size, ctypes.c_int, void]
    for function in (mprotect, madvise):
        function.argtypes = [void, size, ctypes.c_int]
    munmap.argtypes = [void, size]
    failed = void(-1).value
    moved = 0
    for start, _ in ranges:
        raw = mmap_(None, 2 * HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if raw in (None, failed):
            break
        copy = -(-raw // HUGE_PAGE) * HUGE_PAGE  # an aligned 2 MiB inside the 4 MiB mapped; the rest unmapped
        if copy > raw:
            munmap(raw, copy - raw)
        if raw + 2 * HUGE_PAGE > copy + HUGE_PAGE:
            munmap(copy + HUGE_PAGE, raw + 2 * HUGE_PAGE - copy - HUGE_PAGE)
        madvise(copy, HUGE_PAGE, MADV_HUGEPAGE)
        ctypes.memmove(copy, start, HUGE_PAGE)
        if (madvise(copy, HUGE_PAGE, MADV_COLLAPSE) != 0  # not on one huge page: moving it would only cost memory
                or mprotect(copy, HUGE_PAGE, PROT_READ | PROT_EXEC) != 0
                or mremap(copy, HUGE_PAGE, HUGE_PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, start) in (None, failed)):
            log.debug("huge pages for code: %#x left as it is (errno %d)", start, ctypes.get_errno())
            munmap(copy, HUGE_PAGE)
            continue
        moved += 1
    return moved * HUGE_PAGE >> 20
