"""Filesystems (size, free, available, inodes, read-only) and block-device I/O from /proc/diskstats.

Mounts come from <procfs>/1/mounts (the host's when procfs is the host's /proc) and statvfs runs
under <rootfs>, so a containerised agent reports the host's filesystems. The mount table is read again
only when the kernel says it changed (a /proc mounts file polls POLLPRI after a mount or unmount), and
at least every SLOW_REFRESH_S. A statvfs that may hang (a dead NFS server: any filesystem not in
LOCAL_FSTYPES, or one mounted under such a filesystem) runs on a helper thread and is given up after a
second: that mount reports fleetscope_filesystem_device_error 1 and is skipped until the call returns,
so one stuck mount never stalls the sampler. A local filesystem answers statvfs from memory, so its
call is made in place (no thread hand-off); the sampler's deadline still covers it.
"""

from __future__ import annotations

import os
import re
import select
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError
from dataclasses import dataclass
from pathlib import Path

from agent.procfs import KeptFile, parse_diskstats
from agent.sources.base import SLOW_REFRESH_S, Family, NoData, Reading, Source, feeding, register

# Virtual devices whose I/O is counted again on the real device underneath.
_SKIP_DISKS = re.compile(r"^(loop|ram|zram|sr|fd)\d*$|^nvme\d+n\d+p\d+$|^[shv]d[a-z]+\d+$")
# node_exporter's defaults: pseudo filesystems, and mount points that are not the node's storage.
_SKIP_FSTYPES = re.compile(r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|"
                           r"mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$")
_SKIP_MOUNTS = re.compile(r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+|"
                          r"var/lib/kubelet/pods/.+|mnt/sandboxing/.+)($|/)")
_ALLOW_MOUNTS = re.compile(r"^/dev/shm$")  # NCCL and DataLoader workers live in /dev/shm: keep it
STATVFS_TIMEOUT_S = 1.0
# Filesystems whose statfs is answered from the kernel's memory, never from a server or a user-space daemon.
LOCAL_FSTYPES = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "vfat", "exfat", "tmpfs", "ramfs", "zfs"))
FS = ("device", "mountpoint", "fstype")
_DISK = ("fleetscope_disk_read_bytes_total", "fleetscope_disk_written_bytes_total", "fleetscope_disk_reads_completed_total",
         "fleetscope_disk_writes_completed_total", "fleetscope_disk_read_time_seconds_total",
         "fleetscope_disk_write_time_seconds_total", "fleetscope_disk_io_time_seconds_total",
         "fleetscope_disk_io_time_weighted_seconds_total", "fleetscope_disk_io_now")


@dataclass(frozen=True)
class Mount:
    device: str
    mountpoint: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """The mounts worth reporting, first mount of each mount point."""
    out, seen = [], set()
    for line in text.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        m = Mount(_unescape(f[0]), _unescape(f[1]), f[2], f[3])
        if m.mountpoint in seen or _SKIP_FSTYPES.match(m.fstype):
            continue
        if _SKIP_MOUNTS.match(m.mountpoint) and not _ALLOW_MOUNTS.match(m.mountpoint):
            continue
        seen.add(m.mountpoint)
        out.append(m)
    return out


def in_place(mounts: list[Mount]) -> set[str]:
    """The mount points whose statvfs cannot hang: a local filesystem not mounted under one that can."""
    remote = [m.mountpoint.rstrip("/") + "/" for m in mounts if m.fstype not in LOCAL_FSTYPES]
    return {m.mountpoint for m in mounts
            if m.fstype in LOCAL_FSTYPES and not any(m.mountpoint.startswith(r) for r in remote)}


class MountTable:
    """The mounts worth reporting, read again only after the kernel signals a change (or SLOW_REFRESH_S)."""

    def __init__(self, procfs: Path) -> None:
        self.paths = (procfs / "1" / "mounts", procfs / "self" / "mounts")
        self._fd: int | None = None
        self._poll: select.poll | None = None  # None: a plain file (a test's), read every time
        self._mounts: list[Mount] | None = None
        self._at = float("-inf")

    def _open(self) -> None:
        for path in self.paths:
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break
            except (FileNotFoundError, NotADirectoryError):
                continue
        else:
            raise NoData(f"no mount table under {self.paths[0].parent.parent}")
        st = os.fstat(self._fd)
        self._poll = None
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # a /proc file, which signals changes
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLPRI | select.POLLERR)

    def get(self) -> list[Mount]:
        if self._fd is None:
            self._open()
        now = time.monotonic()
        if (self._mounts is not None and self._poll is not None and now - self._at < SLOW_REFRESH_S
                and not self._poll.poll(0)):
            return self._mounts
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
        except OSError:
            self.close()  # opened again at the next sample
            raise
        self._mounts, self._at = parse_mounts(b"".join(chunks).decode(errors="replace")), now
        return self._mounts

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._poll = None, None


@register("storage")
class StorageSource(Source):
    name = "storage"
    families = (
        Family("fleetscope_filesystem_size_bytes", "gauge", "Filesystem size.", FS),
        Family("fleetscope_filesystem_free_bytes", "gauge", "Free space, including what only root may use.", FS),
        Family("fleetscope_filesystem_avail_bytes", "gauge", "Space available to unprivileged users.", FS),
        Family("fleetscope_filesystem_files", "gauge", "Inodes in the filesystem.", FS),
        Family("fleetscope_filesystem_files_free", "gauge", "Free inodes.", FS),
        Family("fleetscope_filesystem_readonly", "gauge", "1 when the filesystem is mounted read-only.", FS),
        Family("fleetscope_filesystem_device_error", "gauge", "1 when statvfs on the mount failed or hung.", FS),
        Family("fleetscope_disk_read_bytes_total", "counter", "Bytes read from the device.", ("device",)),
        Family("fleetscope_disk_written_bytes_total", "counter", "Bytes written to the device.", ("device",)),
        Family("fleetscope_disk_reads_completed_total", "counter", "Read operations completed.", ("device",)),
        Family("fleetscope_disk_writes_completed_total", "counter", "Write operations completed.", ("device",)),
        Family("fleetscope_disk_read_time_seconds_total", "counter", "Time spent reading.", ("device",)),
        Family("fleetscope_disk_write_time_seconds_total", "counter", "Time spent writing.", ("device",)),
        Family("fleetscope_disk_io_time_seconds_total", "counter", "Time the device had I/O in flight.", ("device",)),
        Family("fleetscope_disk_io_time_weighted_seconds_total", "counter",
               "I/O time weighted by the requests in flight (its rate is the average queue length).", ("device",)),
        Family("fleetscope_disk_io_now", "gauge", "I/O requests in flight.", ("device",)),
    )
    families = feeding(families, {"fleetscope_disk_read_bytes_total": "disk_read_bytes_total",
                                  "fleetscope_disk_written_bytes_total": "disk_written_bytes_total"})

    def __init__(self, *, procfs: str = "/proc", rootfs: str = "/", **_: object) -> None:
        self.procfs = Path(procfs)
        self.rootfs = rootfs
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="statvfs")
        self._stuck: dict[str, Future] = {}
        self._table = MountTable(self.procfs)
        self._diskstats = KeptFile(self.procfs / "diskstats")
        self._seen: list[Mount] | None = None
        self._in_place: set[str] = set()
        self._labels: dict[str, tuple] = {}  # label tuples by mount point, and by "\0" + disk
        self._paths: dict[str, str] = {}  # where statvfs looks, by mount point

    def _statvfs(self, mountpoint: str):
        """statvfs, with a timeout where it may hang; None when it failed or is still hanging."""
        path = self._paths.get(mountpoint)
        if path is None:
            path = self._paths[mountpoint] = os.path.join(self.rootfs, mountpoint.lstrip("/"))
        if mountpoint in self._in_place:
            try:
                return os.statvfs(path)
            except OSError:
                return None
        pending = self._stuck.get(mountpoint)
        if pending is not None:
            if not pending.done():
                return None
            del self._stuck[mountpoint]
        future = self._pool.submit(os.statvfs, path)
        try:
            return future.result(timeout=STATVFS_TIMEOUT_S)
        except TimeoutError:
            self._stuck[mountpoint] = future
            return None
        except OSError:
            return None

    def collect(self):
        mounts = self._table.get()
        if mounts is not self._seen:
            self._seen, self._in_place = mounts, in_place(mounts)
            self._labels, self._paths = {}, {}
        out = []
        for m in mounts:
            labels = self._labels.get(m.mountpoint)
            if labels is None:
                labels = self._labels[m.mountpoint] = (("device", m.device), ("mountpoint", m.mountpoint),
                                                       ("fstype", m.fstype))
            st = self._statvfs(m.mountpoint)
            out.append(Reading("fleetscope_filesystem_device_error", 1.0 if st is None else 0.0, labels))
            if st is None:
                continue
            readonly = st.f_flag & os.ST_RDONLY or "ro" in m.options.split(",")
            out += [Reading("fleetscope_filesystem_size_bytes", float(st.f_blocks * st.f_frsize), labels),
                    Reading("fleetscope_filesystem_free_bytes", float(st.f_bfree * st.f_frsize), labels),
                    Reading("fleetscope_filesystem_avail_bytes", float(st.f_bavail * st.f_frsize), labels),
                    Reading("fleetscope_filesystem_files", float(st.f_files), labels),
                    Reading("fleetscope_filesystem_files_free", float(st.f_ffree), labels),
                    Reading("fleetscope_filesystem_readonly", 1.0 if readonly else 0.0, labels)]
        text = self._diskstats.read()
        for d in parse_diskstats(text or ""):
            if _SKIP_DISKS.match(d.device):
                continue
            key = "\0" + d.device  # never a mount point
            labels = self._labels.get(key)
            if labels is None:
                labels = self._labels[key] = (("device", d.device),)
            values = (d.read_bytes, d.written_bytes, d.reads, d.writes, d.read_seconds, d.write_seconds, d.io_seconds,
                      d.weighted_io_seconds, d.in_progress)
            out += [Reading(metric, float(value), labels) for metric, value in zip(_DISK, values)]
        return out

    def close(self) -> None:
        self._table.close()
        self._diskstats.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
