"""Host sources read this machine through psutil; readings match their declared families."""

from __future__ import annotations

import psutil
import pytest

from agent.sources.base import REGISTRY
from agent.sources.cpu import CpuSource
from agent.sources.memory import MemorySource
from agent.sources.network import NetworkSource
from agent.sources.pressure import PressureSource
from agent.sources.storage import StorageSource

HOST_SOURCES = [CpuSource, MemorySource, StorageSource, NetworkSource, PressureSource]


def test_every_subsystem_registers_itself_by_name():
    assert {"cpu", "memory", "storage", "network", "gpu", "pressure", "infiniband", "hwmon"} <= set(REGISTRY)


@pytest.mark.parametrize("cls", HOST_SOURCES, ids=lambda c: c.name)
def test_readings_belong_to_declared_families_with_declared_labels(cls):
    source = cls()
    families = {f.name: f for f in source.families}
    readings = list(source.collect())
    assert readings, f"{cls.name} produced nothing on a Linux machine"
    for r in readings:
        assert r.name in families, f"{r.name} is not declared by {cls.name}"
        assert {k for k, _ in r.labels} == set(families[r.name].labels), r
        assert r.value == r.value, f"{r.name} is NaN"  # missing values are omitted, never NaN


def by_name(readings):
    out = {}
    for r in readings:
        out.setdefault(r.name, []).append(r)
    return out


def test_memory_matches_psutil():
    got = by_name(MemorySource().collect())
    assert got["fleetscope_memory_total_bytes"][0].value == psutil.virtual_memory().total
    assert 0 < got["fleetscope_memory_available_bytes"][0].value <= psutil.virtual_memory().total


def test_cpu_seconds_by_mode_and_a_ratio_between_0_and_1():
    got = by_name(CpuSource().collect())
    modes = {dict(r.labels)["mode"] for r in got["fleetscope_cpu_seconds_total"]}
    assert {"user", "system", "idle"} <= modes
    assert "guest" not in modes  # already inside user time
    assert 0.0 <= got["fleetscope_cpu_utilization_ratio"][0].value <= 1.0


def test_root_filesystem_is_reported_with_its_size():
    got = by_name(StorageSource().collect())
    sizes = {dict(r.labels)["mountpoint"]: r.value for r in got["fleetscope_filesystem_size_bytes"]}
    assert "/" in sizes and sizes["/"] == pytest.approx(psutil.disk_usage("/").total, rel=0.01)


def test_loopback_is_excluded_by_default_and_can_be_included():
    devices = {dict(r.labels)["device"] for r in NetworkSource().collect()}
    assert "lo" not in devices
    devices = {dict(r.labels)["device"] for r in NetworkSource(exclude_interfaces="").collect()}
    assert "lo" in devices
