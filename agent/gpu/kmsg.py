"""Reads NVIDIA XID errors from the kernel log, /dev/kmsg, as NVIDIA's gpud does.

NVML delivers only some XIDs as events, and none from while the agent was down; the driver writes
every one to the kernel log, e.g. `NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.`

Record format (Linux Documentation/ABI/testing/dev-kmsg): each read() of /dev/kmsg returns one
record, "<prio>,<seq>,<timestamp_us>,<flags>[,...];<message>\\n", then optional continuation lines
that start with a space (" SUBSYSTEM=pci"). The message escapes bytes outside printable ASCII as
\\xNN. read() fails with EAGAIN when nothing is new (O_NONBLOCK) and with EPIPE when records were
overwritten before we read them. A regular file of such records, one a line, reads the same way,
which is how tests and fixtures drive this module.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from dataclasses import dataclass

log = logging.getLogger("fleetscope.agent.gpu.kmsg")

MAX_RECORDS_PER_POLL = 10_000  # a flooded log must not stall the sampler; the rest waits for the next poll
RETRY_SECONDS = 60.0  # after an error, how long before opening the log again
READ_SIZE = 16_384  # more than a kmsg record can hold (a smaller buffer makes read() fail with EINVAL)

_HEADER = re.compile(r"(\d+),(\d+),(\d+),[^;]*;", re.ASCII)
_XID = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<bus>[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2})(?:\.[0-7])?\):"
    r" *(?P<code>\d+)(?:,\s*(?P<rest>.*)|\s*)$", re.DOTALL | re.ASCII)
_FIELD = re.compile(r"(pid|name)=([^,]*)(?:,\s*|$)")  # "pid=2557, " "name=python3, " at the rest's start
_BUS_ID = re.compile(
    r"(?:PCI:)?(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<device>[0-9a-fA-F]{1,2})(?:\.[0-7])?")
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
_UNKNOWN = ("", "<unknown>", "'<unknown>'")


@dataclass(frozen=True, slots=True)
class KernelXid:
    seq: int  # the kmsg record's sequence number (unique per boot)
    boot_us: int  # the record's timestamp, microseconds since boot (CLOCK_MONOTONIC as kmsg gives it)
    bus_id: str  # normalised PCI address "0000:3b:00"
    code: int  # the XID code
    pid: int | None  # when the line has pid=<n>
    process: str | None  # when the line has name=<...> (not "<unknown>")
    message: str  # the rest of the line after the code, pid= and name=, trimmed


def normalize_bus_id(bus_id: str) -> str:
    """NVML's "00000000:3B:00.0", kmsg's "PCI:0000:3b:00" or "0000:3b:00" -> "0000:3b:00".

    The domain keeps at least 4 hex digits, as the driver prints it ("%04x"), so a domain above
    0xffff (VMD) reads the same from NVML and from the kernel log. Raises ValueError on anything else.
    """
    m = _BUS_ID.fullmatch(bus_id.strip())
    if m is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r} (expected e.g. 00000000:3B:00.0 or 0000:3b:00)")
    return f"{int(m['domain'] or '0', 16):04x}:{int(m['bus'], 16):02x}:{int(m['device'], 16):02x}"


def _header(line: str) -> tuple[int, int, str] | None:
    """A record's first line -> (seq, boot_us, message), or None when it is not a kmsg record."""
    m = _HEADER.match(line)
    return None if m is None else (int(m[2]), int(m[3]), line[m.end():])


def _xid(seq: int, boot_us: int, message: str) -> KernelXid | None:
    if "\\x" in message:  # kmsg writes each byte outside printable ASCII as \xNN
        message = _ESCAPE.sub(lambda e: bytes([int(e[1], 16)]), message.encode()).decode(errors="replace")
    # search, not match: a "<3>" priority or a "[ 12.345678]" timestamp may come before NVRM
    m = _XID.search(message.rstrip())
    if m is None:
        return None
    pid = process = None
    rest = m["rest"] or ""
    while field := _FIELD.match(rest):
        value = field[2].strip()
        if field[1] == "pid":
            pid = int(value) if value.isascii() and value.isdigit() else None  # pid='<unknown>' on newer drivers
        else:
            process = None if value in _UNKNOWN else value
        rest = rest[field.end():]
    return KernelXid(seq, boot_us, normalize_bus_id(m["bus"]), int(m["code"]), pid, process, rest.strip())


def parse_record(record: str) -> KernelXid | None:
    """One /dev/kmsg record ("<prio>,<seq>,<ts_us>,<flags>;<message>" plus optional continuation
    lines that start with a space) -> a KernelXid, or None when it is not an NVRM Xid line."""
    header = _header(record.split("\n", 1)[0])  # continuation lines carry no XID
    return None if header is None else _xid(*header)


class KernelXids:
    """Every XID the kernel log holds, read without blocking; one instance per agent."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self._fd: int | None = None
        self._is_file = False
        self._offset = 0  # in a regular file: where the next unread line starts
        self._last_seq: int | None = None
        self._resume_after: int | None = None  # after a reopen, the ring is read again from its start
        self._overrun = False
        self._problem: str | None = None
        self._retry_at = 0.0  # opened at the first poll: a reader that is never polled never opens the log

    @property
    def problem(self) -> str | None:
        """None while the log is readable; otherwise "kmsg:no_permission", "kmsg:absent" or "kmsg:error"."""
        return self._problem

    def poll(self) -> list[KernelXid]:
        """Every new XID record since the last poll, never blocking. The first poll reads the whole
        ring buffer, so XIDs from before the agent started are counted."""
        if self._fd is None and not self._open():
            return []
        xids: list[KernelXid] = []
        try:
            for line in self._file_lines() if self._is_file else self._device_records():
                if (xid := self._record(line)) is not None:
                    xids.append(xid)
        except OSError as e:
            self._fail(e)
        return xids

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self._is_file = stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError as e:
            self._fail(e)
            return False
        if self._problem is not None:
            log.info("kernel log %s is readable again", self.path)
            self._problem = None
        self._offset, self._resume_after = 0, self._last_seq
        return True

    def _fail(self, error: OSError) -> None:
        problem = ("kmsg:no_permission" if isinstance(error, PermissionError)
                   else "kmsg:absent" if isinstance(error, FileNotFoundError) else "kmsg:error")
        if problem != self._problem:
            hint = " (with kernel.dmesg_restrict=1 it needs CAP_SYSLOG)" if problem == "kmsg:no_permission" else ""
            log.warning("cannot read XIDs from the kernel log %s: %s%s; trying again in %.0fs",
                        self.path, error, hint, RETRY_SECONDS)
        self._problem = problem
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self.close()

    def _device_records(self):
        assert self._fd is not None
        for _ in range(MAX_RECORDS_PER_POLL):
            try:
                record = os.read(self._fd, READ_SIZE)
            except BlockingIOError:  # EAGAIN: nothing new
                return
            except BrokenPipeError:  # EPIPE: the ring overwrote records we had not read yet
                self._overrun = True
                continue
            if not record:  # not /dev/kmsg after all: end of file
                return
            yield record.decode(errors="replace").split("\n", 1)[0]

    def _file_lines(self):
        assert self._fd is not None
        budget = MAX_RECORDS_PER_POLL
        while budget > 0 and (chunk := os.pread(self._fd, READ_SIZE, self._offset)):
            lines = chunk.split(b"\n")
            if len(lines) == 1:  # no newline yet: a line still being written, read once complete...
                if len(chunk) == READ_SIZE:  # ...unless it is garbage longer than any record
                    self._offset += len(chunk)
                return
            for line in lines[:-1]:
                self._offset += len(line) + 1
                if line.startswith(b" "):  # a continuation line: belongs to the record before it
                    continue
                yield line.decode(errors="replace")
                budget -= 1
                if budget == 0:
                    return

    def _record(self, line: str) -> KernelXid | None:
        header = _header(line)
        if header is None:
            return None
        seq = header[0]
        if self._resume_after is not None and seq <= self._resume_after:
            return None  # read before the log was reopened
        if self._overrun and self._last_seq is not None:
            log.info("kernel log %s: %d records were overwritten before they could be read",
                     self.path, max(seq - self._last_seq - 1, 0))
        self._overrun, self._last_seq = False, seq
        return _xid(*header)
