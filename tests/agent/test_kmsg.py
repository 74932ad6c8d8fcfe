"""XIDs read from the kernel log: the record parser on real-format lines, the reader on fixture files
and, where this machine allows, on the real /dev/kmsg."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from agent.gpu import kmsg
from agent.gpu.kmsg import KernelXid, KernelXids, normalize_bus_id, parse_record

FIXTURES = Path(__file__).parent / "fixtures" / "kmsg"


@pytest.mark.parametrize(("message", "bus_id", "code", "pid", "process", "text"), [
    ("NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.",
     "0000:3b:00", 79, 0, None, "GPU has fallen off the bus."),
    ("NVRM: Xid (PCI:0000:18:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on (GPC 0, TPC 0, SM 0): Out Of Range Address",
     "0000:18:00", 13, None, None, "Graphics SM Warp Exception on (GPC 0, TPC 0, SM 0): Out Of Range Address"),
    ("NVRM: Xid (PCI:0000:b7:00): 94, pid=2557, name=python3, Ch 00000008, errorString CTX SWITCH TIMEOUT, Info 0x4c01d",
     "0000:b7:00", 94, 2557, "python3", "Ch 00000008, errorString CTX SWITCH TIMEOUT, Info 0x4c01d"),
    ("NVRM: Xid (PCI:0000:c1:00): 48, pid=1234, name=pt_main_thread, DBE (double bit error) ECC error",
     "0000:c1:00", 48, 1234, "pt_main_thread", "DBE (double bit error) ECC error"),
    ("NVRM: Xid (0000:03:00): 43, Ch 00000010",  # drivers before the "PCI:" prefix
     "0000:03:00", 43, None, None, "Ch 00000010"),
    ("NVRM: Xid (PCI:0001:00:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
     "0001:00:00", 154, None, None, "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)"),
    (("NVRM: Xid (PCI:0000:5d:00): 119, pid=2281, name=nvidia-smi, Timeout after 6s of waiting for RPC response from GPU0 GSP! "
      "Expected function 76 (GSP_RM_CONTROL) (0x20801702 0x4)."),
     "0000:5d:00", 119, 2281, "nvidia-smi",
     "Timeout after 6s of waiting for RPC response from GPU0 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20801702 0x4)."),
    ("<3>[ 3600.123456] NVRM: Xid (PCI:0000:CB:00): 31, pid=77, name=train, MMU Fault",  # priority and timestamp first
     "0000:cb:00", 31, 77, "train", "MMU Fault"),
    ("NVRM: Xid (PCI:0000:3b:00): 79",  # nothing after the code
     "0000:3b:00", 79, None, None, ""),
    (r"NVRM: Xid (PCI:0000:3b:00): 13, pid=9, name=tr\xc3\xa4in, C:\x5cjobs",  # kmsg escapes bytes as \xNN
     "0000:3b:00", 13, 9, "tr\u00e4in", "C:\\jobs"),
])
def test_each_xid_line_format_parses(message, bus_id, code, pid, process, text):
    xid = parse_record(f"4,2231,90210555300,-;{message}\n SUBSYSTEM=pci\n DEVICE=+pci:{bus_id}.0\n")
    assert xid == KernelXid(seq=2231, boot_us=90210555300, bus_id=bus_id, code=code, pid=pid, process=process, message=text)


@pytest.mark.parametrize("record", [
    "3,2300,123456789012,-;NVRM: GPU at PCI:0000:3b:00: GPU-5a3f0c1e-9b7d-4e2a-8c61-0f1d2e3b4a59",
    "3,2301,123456789020,-;NVRM: GPU Board Serial Number: 1652123001234",
    "3,2303,123456789040,-;NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",
    "6,1530,14901127,-;nvidia 0000:3b:00.0: enabling device (0000 -> 0002)\n SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0",
    "6,1,0,-;Command line: BOOT_IMAGE=/boot/vmlinuz-5.15.0-105-generic ro",
    " SUBSYSTEM=pci",
    "NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.",  # a message without its kmsg header
    "4,abc,12,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=0, x",
    "4,3002,500000,-;NVRM: Xid (PCI:0000:3b:0",
    "4,3003,500001,-;NVRM: Xid (PCI:0000:3b:00): ",
    "4,3004,500002,-;NVRM: Xid (PCI:0000:3b:00): seventy-nine, pid=0",
    "\ufffd\x00 garbage",
    "",
])
def test_noise_and_broken_records_are_not_xids(record):
    assert parse_record(record) is None


@pytest.mark.parametrize(("bus_id", "normal"), [
    ("00000000:3B:00.0", "0000:3b:00"),  # NVML
    ("00000001:C1:00.0", "0001:c1:00"),
    ("PCI:0000:3b:00", "0000:3b:00"),  # kmsg
    ("0000:3b:00", "0000:3b:00"),
    ("0000:3b:00.0", "0000:3b:00"),  # sysfs
    ("00010000:01:00.0", "10000:01:00"),  # a VMD domain above 0xffff: the driver prints it in full too
])
def test_normalize_bus_id(bus_id, normal):
    assert normalize_bus_id(bus_id) == normal


def test_normalize_bus_id_rejects_what_is_not_a_bus_id():
    with pytest.raises(ValueError, match="not a PCI bus id"):
        normalize_bus_id("GPU-5a3f0c1e")


def test_a_kernel_log_file_gives_every_xid_once():
    reader = KernelXids(path=str(FIXTURES / "boot.kmsg"))
    xids = reader.poll()
    assert [(x.seq, x.bus_id, x.code) for x in xids] == [
        (2210, "0000:18:00", 13), (2211, "0000:18:00", 13), (2230, "0000:b7:00", 109), (2231, "0000:c1:00", 48),
        (2232, "0000:c1:00", 63), (2302, "0000:3b:00", 79), (2352, "0000:9b:00", 79), (2400, "0000:03:00", 43),
        (2410, "0000:5d:00", 119), (2420, "0001:00:00", 154), (2430, "0000:cb:00", 31)]
    assert xids[2].boot_us == 90210555012 and (xids[2].pid, xids[2].process) == (2557, "python3")
    assert reader.problem is None
    assert reader.poll() == []
    reader.close()


def test_garbage_truncated_and_non_utf8_records_are_skipped():
    reader = KernelXids(path=str(FIXTURES / "garbage.kmsg"))
    assert [(x.seq, x.code, x.pid, x.process) for x in reader.poll()] == [(3006, 31, 42, "train")]
    assert reader.problem is None


def test_records_appended_later_are_the_only_ones_the_next_poll_returns(tmp_path):
    log = tmp_path / "kmsg"
    shutil.copy(FIXTURES / "boot.kmsg", log)
    reader = KernelXids(path=str(log))
    assert len(reader.poll()) == 11
    with log.open("a") as f:
        f.write("6,2500,140000000000,-;nvidia 0000:3b:00.0: enabling device (0000 -> 0002)\n SUBSYSTEM=pci\n")
        f.write("4,2501,140000000100,-;NVRM: Xid (PCI:0000:3b:00): 48, pid=31, name=python3, DBE (double bit error) ECC")
    # the last line has no newline yet: the driver is still writing it
    assert reader.poll() == []
    with log.open("a") as f:
        f.write(" error\n")
    (xid,) = reader.poll()
    assert (xid.seq, xid.code, xid.message) == (2501, 48, "DBE (double bit error) ECC error")
    assert reader.poll() == []


def test_a_poll_reads_a_bounded_number_of_records_and_the_rest_on_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(kmsg, "MAX_RECORDS_PER_POLL", 7)
    log = tmp_path / "kmsg"
    with log.open("w") as f:
        for seq in range(30):
            if seq % 2:
                f.write(f"4,{seq},{seq * 1000},-;NVRM: Xid (PCI:0000:3b:00): 13, pid={seq}, name=flood, Graphics Exception\n")
            else:
                f.write(f"6,{seq},{seq * 1000},-;eth0: link up\n SUBSYSTEM=net\n")
    reader = KernelXids(path=str(log))
    polls = [reader.poll() for _ in range(6)]
    assert [len(p) for p in polls] == [3, 4, 3, 4, 1, 0]  # 7 records each: noise and XIDs alike count
    assert [x.seq for p in polls for x in p] == list(range(1, 30, 2))


def test_a_missing_log_is_reported_and_polled_again_after_a_while(tmp_path, monkeypatch):
    log = tmp_path / "kmsg"
    reader = KernelXids(path=str(log))
    assert reader.poll() == [] and reader.problem == "kmsg:absent"
    shutil.copy(FIXTURES / "boot.kmsg", log)
    assert reader.poll() == [] and reader.problem == "kmsg:absent"  # not reopened at every poll
    monkeypatch.setattr(kmsg, "RETRY_SECONDS", 0.0)
    reader._retry_at = 0.0  # the wait is over
    assert len(reader.poll()) == 11 and reader.problem is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_log_is_reported_as_no_permission(tmp_path):
    log = tmp_path / "kmsg"
    shutil.copy(FIXTURES / "boot.kmsg", log)
    log.chmod(0)
    reader = KernelXids(path=str(log))
    assert reader.poll() == [] and reader.problem == "kmsg:no_permission"


def test_a_read_error_is_reported_and_does_not_raise(tmp_path):
    reader = KernelXids(path=str(tmp_path))  # a directory opens, then every read fails with EISDIR
    assert reader.poll() == [] and reader.problem == "kmsg:error"


def open_real_kmsg() -> KernelXids:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        pytest.skip(f"/dev/kmsg cannot be read here: {e}")
    return KernelXids()


def test_the_real_kernel_log_is_read_without_blocking():
    reader = open_real_kmsg()
    assert isinstance(reader.poll(), list)
    assert reader.problem is None
    started = time.monotonic()
    reader.poll()
    assert time.monotonic() - started < 1.0
    reader.close()


def test_an_xid_written_to_the_real_kernel_log_is_read_back():
    reader = open_real_kmsg()
    reader.poll()  # whatever the ring holds already
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY)
    except OSError as e:
        pytest.skip(f"/dev/kmsg cannot be written here: {e}")
    try:
        # bus ffff:ff:ff cannot be a real GPU, so nothing downstream mistakes this record for one
        os.write(fd, b"NVRM: Xid (PCI:ffff:ff:ff): 31, pid=1, name=fleetscope-test, test record\n")
    except OSError as e:
        pytest.skip(f"the kernel refused a record written to /dev/kmsg (printk.devkmsg=off?): {e}")
    finally:
        os.close(fd)
    xids = reader.poll()
    mine = [x for x in xids if x.bus_id == "ffff:ff:ff"]
    assert [(x.code, x.pid, x.process, x.message) for x in mine] == [(31, 1, "fleetscope-test", "test record")]
    assert mine[0].seq > 0 and mine[0].boot_us > 0
    reader.close()
