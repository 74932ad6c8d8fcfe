"""Which of the agent's memory goes onto huge pages (agent/hugepages.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import hugepages
from agent.hugepages import HUGE_PAGE, code_ranges, collapse_heap, dense_ranges, malloc_environment
from tests.conftest import free_port, http_get, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]

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


# A library loaded at a 2 MiB boundary, as ld.so maps it: headers, code, constants, relocated constants, data, bss.
LIBRARY = """\
7f6000000000-7f60000f5000 r--p 00000000 fe:00 26933                      /opt/py/lib/libpython3.11.so.1.0
7f60000f5000-7f6000331000 r-xp 000f5000 fe:00 26933                      /opt/py/lib/libpython3.11.so.1.0
7f6000331000-7f6000415000 r--p 00331000 fe:00 26933                      /opt/py/lib/libpython3.11.so.1.0
7f6000415000-7f6000444000 r--p 00414000 fe:00 26933                      /opt/py/lib/libpython3.11.so.1.0
7f6000444000-7f6000578000 rw-p 00443000 fe:00 26933                      /opt/py/lib/libpython3.11.so.1.0
7f6000578000-7f60007ba000 rw-p 00000000 00:00 0
7f6000800000-7f6000826000 r--p 00000000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f6000826000-7f6000c00000 r-xp 00026000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f6000c00000-7f6000e01000 r--p 003d0000 fe:00 339380                     /usr/lib/x86_64-linux-gnu/libc.so.6
"""


def test_the_code_moved_is_whole_aligned_2_mib_of_the_read_only_part_of_its_own_file():
    in_code = 0x7F6000100000
    # [0, 2 MiB) holds headers and code, [2 MiB, 4 MiB) code and constants; [4 MiB, 6 MiB) would reach into the data
    # (read-write): left.
    assert code_ranges(LIBRARY, in_code) == [(0x7F6000000000, 0x7F6000200000), (0x7F6000200000, 0x7F6000400000)]
    assert code_ranges(LIBRARY, 0x7F6000450000) == []  # an address in data, not code
    assert code_ranges(LIBRARY, 0x7F60007A0000) == []  # anonymous memory
    # The object whose code holds the address: libc's first 4 MiB hold code; its [4 MiB, 6 MiB) is read-only but holds
    # none (constants only): left.
    assert code_ranges(LIBRARY, 0x7F6000900000) == [(0x7F6000800000, 0x7F6000A00000), (0x7F6000A00000, 0x7F6000C00000)]
    # A gap between the code and what comes before it ends the part that may be moved there.
    assert code_ranges(LIBRARY.replace("7f60000f5000-7f6000331000 r-xp", "7f60000f6000-7f6000331000 r-xp"), in_code) == \
        [(0x7F6000200000, 0x7F6000400000)]
    # A gap between the code and what follows ends the part that may be moved.
    gapped = LIBRARY.replace("7f6000331000-7f6000415000 r--p", "7f6000332000-7f6000415000 r--p")
    assert code_ranges(gapped, in_code) == [(0x7F6000000000, 0x7F6000200000)]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_the_interpreter_runs_on_from_its_code_moved_onto_huge_pages_with_the_same_bytes_at_the_same_addresses():
    script = r"""
import ctypes, json, threading
from agent.hugepages import code_ranges, remap_code
address = ctypes.cast(ctypes.pythonapi.Py_IncRef, ctypes.c_void_p).value
maps = [line.split() for line in open("/proc/self/maps")]
row = next(r for r in maps if int(r[0].split("-")[0], 16) <= address < int(r[0].split("-")[1], 16))
path, base = row[5], int(row[0].split("-")[0], 16) - int(row[2], 16)  # the file, and where its offset 0 lies
ranges = code_ranges(open("/proc/self/maps").read(), address)
mib = remap_code()
same = []
with open(path, "rb") as fh:
    for start, end in ranges:
        fh.seek(start - base)
        same.append(ctypes.string_at(start, end - start) == fh.read(end - start))
huge, block = {}, None
for line in open("/proc/self/smaps"):
    if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
        block = line.split()
    elif line.startswith("AnonHugePages:") and block[1] == "r-xp" and len(block) == 5:
        huge[block[0]] = int(line.split()[1])
result = []
thread = threading.Thread(target=lambda: result.append(sum(json.loads(json.dumps(list(range(1000)))))))
thread.start()
thread.join()
print(json.dumps({"mib": mib, "ranges": len(ranges), "same": same, "huge": huge, "result": result}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["mib"] in (0, 2 * got["ranges"])  # all or, where no huge page is to be had, none
    if _kernel_can_collapse() and got["ranges"]:
        assert got["mib"] == 2 * got["ranges"]
    if got["mib"]:
        assert got["same"] and all(got["same"])  # the very bytes of the file, at the very addresses
        moved = [r for r, kib in got["huge"].items() if kib == HUGE_PAGE >> 10]
        assert len(moved) == got["ranges"]  # each on one huge page
    assert got["result"] == [499500]  # and the interpreter, its threads, json's C code run on


def test_the_interpreter_gets_glibc_malloc_on_huge_pages_once_keeping_other_tunables():
    env = malloc_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}, "glibc 2.36")
    assert env == {"PATH": "/bin", "PYTHONMALLOC": "malloc",
                   "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"}
    assert malloc_environment(env, "glibc 2.36") is None  # the started-again interpreter is not started a third time
    assert malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36")["GLIBC_TUNABLES"] == \
        "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=1"  # an operator's own choice of a tunable stands
    assert malloc_environment({"PYTHONMALLOC": "pymalloc"}, "glibc 2.36") is None  # whoever started it chose
    assert malloc_environment({}, "") is None  # not glibc (musl): GLIBC_TUNABLES would mean nothing


def _environ(pid: int) -> list[bytes]:
    # Not parsed into variables: glibc cuts GLIBC_TUNABLES at each ':' where the process keeps its environment.
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _anonymous_code(pid: int) -> list[str]:
    rows = [line.split() for line in Path(f"/proc/{pid}/maps").read_text().splitlines()]
    return [r[0] for r in rows if r[1] == "r-xp" and len(r) == 5
            and int(r[0].split("-")[1], 16) - int(r[0].split("-")[0], 16) == HUGE_PAGE]


@pytest.mark.skipif(not (os.confstr_names.get("CS_GNU_LIBC_VERSION") and os.path.exists("/proc/self/environ")),
                    reason="needs glibc and Linux's /proc")
def test_fleetscope_agent_runs_with_glibc_malloc_on_huge_pages_unless_huge_pages_is_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
    off = tmp_path / "agent.toml"
    off.write_text('[agent]\ncollector_url = ""\nhuge_pages = false\n')
    procs, ports = [], []
    try:
        for extra in ([], ["--config", str(off)]):
            port = free_port()
            argv = [sys.executable, "-m", "fleetscope", "agent", "--gpu-backend", "none", "--metrics-address",
                    f"127.0.0.1:{port}", "--events-address", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                    "--spool-dir", "", *extra]
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            ports.append(port)
        for proc, port in zip(procs, ports):  # the process that answers is the one started (exec keeps its pid)
            wait_until(lambda proc=proc, port=port: proc.poll() is not None
                       or http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200,
                       timeout=60, what="the agent to serve /metrics")
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
        on, off_env = _environ(procs[0].pid), _environ(procs[1].pid)
        assert b"PYTHONMALLOC=malloc" in on
        assert any(b"glibc.malloc.hugetlb=1" in item for item in on) and b"glibc.malloc.arena_max=1" in b":".join(on)
        assert Path(f"/proc/{procs[0].pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"fleetscope"]
        assert not any(item.startswith((b"PYTHONMALLOC=", b"GLIBC_TUNABLES=")) for item in off_env)
        if _kernel_can_collapse():  # its interpreter's code moved onto huge pages (anonymous r-xp, 2 MiB each)
            wait_until(lambda: _anonymous_code(procs[0].pid), timeout=30, what="the agent's code on huge pages")
        assert not _anonymous_code(procs[1].pid)
    finally:
        for proc in procs:
            stop_process(proc)


def test_only_the_agent_program_is_started_again_never_a_process_that_calls_the_cli_in_process(monkeypatch):
    import agent.main
    from fleetscope.cli import main as cli

    class Stub:  # the agent itself is not what this test is about
        def __init__(self, config) -> None:
            pass

        def run_forever(self) -> None:
            pass

    execs = []
    monkeypatch.setattr(agent.main, "Agent", Stub)
    monkeypatch.setattr(hugepages.os, "execve", lambda *args: execs.append(args))
    monkeypatch.setattr(hugepages.os, "confstr", lambda name: "glibc 2.36")
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    argv = ["agent", "--gpu-backend", "none", "--spool-dir", ""]
    assert cli(argv) == 0
    assert execs == []  # e.g. a test runner calling main(): starting it again would run the whole runner anew
    monkeypatch.setattr(sys, "argv", ["/opt/fleetscope/bin/fleetscope", *argv])
    assert cli(argv) == 0
    assert len(execs) == 1 and execs[0][:2] == (sys.executable, sys.orig_argv)
    assert execs[0][2]["PYTHONMALLOC"] == "malloc"
