"""Host sources read /proc and /sys through configurable roots; tested on fixture trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.procfs import parse_diskstats, parse_keyed, parse_pressure
from agent.sources.base import NoData
from agent.sources.hwmon import HwmonSource
from agent.sources.infiniband import InfinibandSource, parse_rate, parse_state
from agent.sources.memory import MemorySource
from agent.sources.network import NetworkSource
from agent.sources.pressure import PressureSource
from agent.sources.storage import StorageSource

FIXTURES = Path(__file__).parent / "fixtures"
PROC, SYS = str(FIXTURES / "proc"), str(FIXTURES / "sys")


def values(source) -> dict:
    return {(r.name, r.labels): r.value for r in source.collect()}


def test_parse_pressure():
    assert parse_pressure("some avg10=0.00 avg60=0.10 avg300=1.21 total=23944997\nfull avg10=0 avg60=0 avg300=0 total=5\n") == {
        "some": 23.944997, "full": 5e-6}


def test_parse_keyed_turns_kb_into_bytes():
    assert parse_keyed("MemTotal:  16 kB\nHugePages_Total:  4\nbroken line\noom_kill 2\n") == {
        "MemTotal": 16384, "HugePages_Total": 4, "oom_kill": 2}


def test_parse_diskstats_sectors_and_milliseconds():
    (d,) = parse_diskstats(" 259 0 nvme0n1 1000 5 204800 1500 2000 10 409600 3000 2 4000 4500 0 0 0 0 100 50\n")
    assert (d.reads, d.read_bytes, d.read_seconds, d.writes, d.written_bytes) == (1000, 204800 * 512, 1.5, 2000, 409600 * 512)
    assert (d.in_progress, d.io_seconds, d.weighted_io_seconds, d.flushes) == (2, 4.0, 4.5, 100)
    (old,) = parse_diskstats(" 8 0 sda 1 0 8 1 1 0 8 1 0 1 2\n")  # kernels before 4.18: 14 fields
    assert old.discards is None and old.flushes is None


def test_pressure_source():
    v = values(PressureSource(procfs=PROC))
    assert v[("fleetscope_pressure_memory_stalled_seconds_total", ())] == 1.25
    assert v[("fleetscope_pressure_io_waiting_seconds_total", ())] == 7.0
    assert ("fleetscope_pressure_cpu_stalled_seconds_total", ()) not in v  # cpu "full" is meaningless


def test_pressure_source_without_psi_has_no_data(tmp_path):
    with pytest.raises(NoData):
        list(PressureSource(procfs=str(tmp_path)).collect())


def test_memory_source_huge_pages_and_oom_kills():
    v = values(MemorySource(procfs=PROC))
    assert v[("fleetscope_memory_total_bytes", ())] == 2113631232 * 1024
    assert v[("fleetscope_memory_used_bytes", ())] == (2113631232 - 1900000000) * 1024
    assert v[("fleetscope_memory_hugepages", ())] == 1024 and v[("fleetscope_memory_hugepages_free", ())] == 512
    assert v[("fleetscope_memory_hugepage_size_bytes", ())] == 2 * 1024 * 1024
    assert v[("fleetscope_memory_oom_kills_total", ())] == 3


def test_storage_source_reads_diskstats_from_its_root():
    v = values(StorageSource(procfs=PROC))
    dev = (("device", "nvme0n1"),)
    assert v[("fleetscope_disk_io_time_weighted_seconds_total", dev)] == 4.5
    assert v[("fleetscope_disk_io_now", dev)] == 2
    assert not any(labels == (("device", "loop0"),) for _, labels in v)  # loop devices are skipped


def test_infiniband_ports():
    assert parse_state("4: ACTIVE\n") == (4, "ACTIVE")
    assert parse_rate("400 Gb/sec (4X NDR)") == 50e9 and parse_rate("garbage") is None
    v = values(InfinibandSource(sysfs=SYS))
    up, down = (("device", "mlx5_0"), ("port", "1")), (("device", "mlx5_1"), ("port", "1"))
    assert v[("fleetscope_infiniband_port_up", up)] == 1 and v[("fleetscope_infiniband_port_up", down)] == 0
    assert v[("fleetscope_infiniband_port_state", down)] == 1
    assert v[("fleetscope_infiniband_rate_bytes", up)] == 50e9
    assert v[("fleetscope_infiniband_receive_bytes_total", up)] == 4_000_000  # 4-byte words
    assert v[("fleetscope_infiniband_link_downed_total", up)] == 2
    assert v[("fleetscope_infiniband_symbol_errors_total", up)] == 11
    assert ("fleetscope_infiniband_receive_errors_total", down) not in v  # the driver has no such file there


def test_no_infiniband_is_no_data_not_an_error(tmp_path):
    with pytest.raises(NoData):
        InfinibandSource(sysfs=str(tmp_path)).collect()


def test_hwmon_temperatures_tell_two_sockets_apart():
    v = values(HwmonSource(sysfs=SYS))
    assert v[("fleetscope_hwmon_temperature_celsius", (("chip", "coretemp/hwmon0"), ("sensor", "Package id 0")))] == 45.0
    assert v[("fleetscope_hwmon_temperature_celsius", (("chip", "coretemp/hwmon1"), ("sensor", "Package id 1")))] == 47.0
    assert v[("fleetscope_hwmon_temperature_critical_celsius", (("chip", "coretemp/hwmon0"), ("sensor", "Package id 0")))] == 105.0
    assert v[("fleetscope_hwmon_temperature_celsius", (("chip", "nvme/hwmon2"), ("sensor", "temp1")))] == 38.85


def test_network_carrier_changes_come_from_sysfs(tmp_path):
    import psutil

    net = tmp_path / "class" / "net"
    name = next(iter(psutil.net_io_counters(pernic=True)))
    (net / name).mkdir(parents=True)
    (net / name / "carrier_changes").write_text("7\n")
    v = values(NetworkSource(exclude_interfaces="", sysfs=str(tmp_path)))
    assert v[("fleetscope_network_carrier_changes_total", (("device", name),))] == 7


def test_parse_mounts_keeps_the_nodes_storage():
    from agent.sources.storage import parse_mounts

    mounts = parse_mounts((FIXTURES / "proc" / "1" / "mounts").read_text())
    assert [(m.mountpoint, m.fstype) for m in mounts] == [
        ("/", "ext4"), ("/dev/shm", "tmpfs"), ("/data", "xfs"), ("/mnt/home dir", "nfs4")]


def test_a_hanging_statvfs_is_given_up_and_reported(monkeypatch, tmp_path):
    import threading

    from agent.sources import storage

    release = threading.Event()
    real_statvfs = storage.os.statvfs

    def statvfs(path):
        if path.endswith("stuck"):
            release.wait(10)  # a dead NFS server
        return real_statvfs("/")

    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "mounts").write_text("/dev/a / ext4 rw 0 0\nsrv:/x /stuck nfs4 rw 0 0\n")
    (proc / "diskstats").write_text("")
    monkeypatch.setattr(storage, "STATVFS_TIMEOUT_S", 0.2)
    monkeypatch.setattr(storage.os, "statvfs", statvfs)
    source = storage.StorageSource(procfs=str(proc))
    try:
        for _ in range(2):  # the second sample does not wait again on the stuck mount
            v = values(source)
            stuck = (("device", "srv:/x"), ("mountpoint", "/stuck"), ("fstype", "nfs4"))
            root = (("device", "/dev/a"), ("mountpoint", "/"), ("fstype", "ext4"))
            assert v[("fleetscope_filesystem_device_error", stuck)] == 1
            assert ("fleetscope_filesystem_size_bytes", stuck) not in v
            assert v[("fleetscope_filesystem_device_error", root)] == 0 and v[("fleetscope_filesystem_size_bytes", root)] > 0
        release.set()
    finally:
        release.set()
        source.close()


_MOUNT_CHANGE = """
import os, subprocess, sys
from pathlib import Path
from agent.sources.storage import MountTable

root = Path(sys.argv[1])
(root / "proc").mkdir()
os.symlink("/proc/self", root / "proc" / "1")  # this process's mount table, in its own mount namespace
(root / "mnt").mkdir()
table = MountTable(root / "proc")
first = table.get()
assert table.get() is first, "read again though nothing changed"
subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "mnt")], check=True)
mounted = table.get()
assert str(root / "mnt") in [m.mountpoint for m in mounted], "a new mount not seen"
assert table.get() is mounted
subprocess.run(["umount", str(root / "mnt")], check=True)
assert str(root / "mnt") not in [m.mountpoint for m in table.get()], "an unmount not seen"
table.close()
"""


def test_the_mount_table_is_read_again_only_when_the_kernel_says_it_changed(tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private mount namespace")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not allowed here: {probe.stderr.decode(errors='replace').strip()}")
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", _MOUNT_CHANGE, str(tmp_path)],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
