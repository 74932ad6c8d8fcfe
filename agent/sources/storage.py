"""Filesystems (size, free, available, inodes, read-only) and block-device I/O from /proc/diskstats."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil

from agent.procfs import parse_diskstats, read_text
from agent.sources.base import Family, Source, reading, register

# Virtual devices whose I/O is counted again on the real device underneath.
_SKIP_DISKS = re.compile(r"^(loop|ram|zram|sr|fd)\d*")


@register("storage")
class StorageSource(Source):
    name = "storage"
    families = (
        Family("fleetscope_filesystem_size_bytes", "gauge", "Filesystem size.", ("device", "mountpoint", "fstype")),
        Family("fleetscope_filesystem_free_bytes", "gauge", "Free space, including what only root may use.", ("device", "mountpoint", "fstype")),
        Family("fleetscope_filesystem_avail_bytes", "gauge", "Space available to unprivileged users.", ("device", "mountpoint", "fstype")),
        Family("fleetscope_filesystem_files", "gauge", "Inodes in the filesystem.", ("device", "mountpoint", "fstype")),
        Family("fleetscope_filesystem_files_free", "gauge", "Free inodes.", ("device", "mountpoint", "fstype")),
        Family("fleetscope_filesystem_readonly", "gauge", "1 when the filesystem is mounted read-only.", ("device", "mountpoint", "fstype")),
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

    def __init__(self, *, procfs: str = "/proc", **_: object) -> None:
        self.procfs = Path(procfs)

    def collect(self):
        seen: set[str] = set()
        for part in psutil.disk_partitions(all=False):
            if part.mountpoint in seen:
                continue
            seen.add(part.mountpoint)
            try:
                st = os.statvfs(part.mountpoint)
            except OSError:
                continue  # a filesystem that vanished between listing and reading
            labels = {"device": part.device, "mountpoint": part.mountpoint, "fstype": part.fstype}
            yield reading("fleetscope_filesystem_size_bytes", st.f_blocks * st.f_frsize, **labels)
            yield reading("fleetscope_filesystem_free_bytes", st.f_bfree * st.f_frsize, **labels)
            yield reading("fleetscope_filesystem_avail_bytes", st.f_bavail * st.f_frsize, **labels)
            yield reading("fleetscope_filesystem_files", st.f_files, **labels)
            yield reading("fleetscope_filesystem_files_free", st.f_ffree, **labels)
            yield reading("fleetscope_filesystem_readonly", 1 if st.f_flag & os.ST_RDONLY else 0, **labels)
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
