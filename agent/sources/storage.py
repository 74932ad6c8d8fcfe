"""Filesystems (size, free, available, inodes, read-only) and block-device I/O from /proc/diskstats.

Mounts come from <procfs>/1/mounts (the host's when procfs is the host's /proc) and statvfs runs
under <rootfs>, so a containerised agent reports the host's filesystems. A statvfs that hangs (a
dead NFS server) is given up after a second: that mount reports fleetscope_filesystem_device_error
1 and is skipped until the call returns, so one stuck mount never stalls the sampler.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError
from dataclasses import dataclass
from pathlib import Path

from agent.procfs import parse_diskstats, read_text
from agent.sources.base import Family, NoData, Source, feeding, reading, register

# Virtual devices whose I/O is counted again on the real device underneath.
_SKIP_DISKS = re.compile(r"^(loop|ram|zram|sr|fd)\d*$|^nvme\d+n\d+p\d+$|^[shv]d[a-z]+\d+$")
# node_exporter's defaults: pseudo filesystems, and mount points that are not the node's storage.
_SKIP_FSTYPES = re.compile(r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|"
                           r"mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$")
_SKIP_MOUNTS = re.compile(r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+|"
                          r"var/lib/kubelet/pods/.+|mnt/sandboxing/.+)($|/)")
_ALLOW_MOUNTS = re.compile(r"^/dev/shm$")  # NCCL and DataLoader workers live in /dev/shm: keep it
STATVFS_TIMEOUT_S = 1.0
FS = ("device", "mountpoint", "fstype")


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

    def _mounts(self) -> list[Mount]:
        text = read_text(self.procfs / "1" / "mounts") or read_text(self.procfs / "self" / "mounts")
        if text is None:
            raise NoData(f"no mount table under {self.procfs}")
        return parse_mounts(text)

    def _statvfs(self, mountpoint: str):
        """statvfs with a timeout; None when it failed or is still hanging."""
        pending = self._stuck.get(mountpoint)
        if pending is not None:
            if not pending.done():
                return None
            del self._stuck[mountpoint]
        path = os.path.join(self.rootfs, mountpoint.lstrip("/"))
        future = self._pool.submit(os.statvfs, path)
        try:
            return future.result(timeout=STATVFS_TIMEOUT_S)
        except TimeoutError:
            self._stuck[mountpoint] = future
            return None
        except OSError:
            return None

    def collect(self):
        for m in self._mounts():
            labels = {"device": m.device, "mountpoint": m.mountpoint, "fstype": m.fstype}
            st = self._statvfs(m.mountpoint)
            yield reading("fleetscope_filesystem_device_error", 1 if st is None else 0, **labels)
            if st is None:
                continue
            yield reading("fleetscope_filesystem_size_bytes", st.f_blocks * st.f_frsize, **labels)
            yield reading("fleetscope_filesystem_free_bytes", st.f_bfree * st.f_frsize, **labels)
            yield reading("fleetscope_filesystem_avail_bytes", st.f_bavail * st.f_frsize, **labels)
            yield reading("fleetscope_filesystem_files", st.f_files, **labels)
            yield reading("fleetscope_filesystem_files_free", st.f_ffree, **labels)
            readonly = st.f_flag & os.ST_RDONLY or "ro" in m.options.split(",")
            yield reading("fleetscope_filesystem_readonly", 1 if readonly else 0, **labels)
        text = read_text(self.procfs / "diskstats")
        for d in parse_diskstats(text or ""):
            if _SKIP_DISKS.match(d.device):
                continue
            yield reading("fleetscope_disk_read_bytes_total", d.read_bytes, device=d.device)
            yield reading("fleetscope_disk_written_bytes_total", d.written_bytes, device=d.device)
            yield reading("fleetscope_disk_reads_completed_total", d.reads, device=d.device)
            yield reading("fleetscope_disk_writes_completed_total", d.writes, device=d.device)
            yield reading("fleetscope_disk_read_time_seconds_total", d.read_seconds, device=d.device)
            yield reading("fleetscope_disk_write_time_seconds_total", d.write_seconds, device=d.device)
            yield reading("fleetscope_disk_io_time_seconds_total", d.io_seconds, device=d.device)
            yield reading("fleetscope_disk_io_time_weighted_seconds_total", d.weighted_io_seconds, device=d.device)
            yield reading("fleetscope_disk_io_now", d.in_progress, device=d.device)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
