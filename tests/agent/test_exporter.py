"""The exporter serves the latest snapshot; a failing source is a metric, never a crash."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest

from agent.exporter import AgentCollector
from agent.gpusim import SimulatedGpus
from agent.sampler import Sampler
from agent.sources.base import Family, NoData, Source, reading
from agent.sources.cpu import CpuSource
from agent.sources.gpu import GpuSource
from agent.sources.memory import MemorySource
from agent.sources.network import NetworkSource
from agent.sources.storage import StorageSource
from tests.conftest import require_binary


class Broken(Source):
    name = "broken"
    families = (Family("fleetscope_broken_things", "gauge", "Never seen."),)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def collect(self):
        raise self.exc


class Counting(Source):
    name = "counting"
    families = (Family("fleetscope_counting_collections_total", "counter", "How often collect ran."),)

    def __init__(self) -> None:
        self.n = 0

    def collect(self):
        self.n += 1
        yield reading("fleetscope_counting_collections_total", self.n)


def make(sources) -> tuple[CollectorRegistry, Sampler]:
    sampler = Sampler(sources)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler, version="test"))
    return reg, sampler


def test_a_failing_source_reports_down_and_the_others_carry_on(caplog):
    counting = Counting()
    reg, sampler = make([Broken(RuntimeError("disk vanished")), Broken(NoData("no IB")), counting])
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "broken"}) == 0
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "counting"}) == 1
    assert reg.get_sample_value("fleetscope_counting_collections_total") == 1
    assert reg.get_sample_value("fleetscope_broken_things") is None
    assert reg.get_sample_value("fleetscope_agent_source_duration_seconds", {"source": "broken"}) >= 0
    # An error is logged with its traceback once; absent data is not an error.
    assert "disk vanished" in caplog.text and "Traceback" in caplog.text
    assert "no IB" not in caplog.text


def test_a_scrape_never_touches_the_sources():
    counting = Counting()
    reg, sampler = make([counting])
    sampler.sample_once()
    for _ in range(10):
        generate_latest(reg)
    assert counting.n == 1
    assert reg.get_sample_value("fleetscope_counting_collections_total") == 1


def test_before_the_first_sample_only_build_info_is_served():
    reg, _ = make([Counting()])
    assert reg.get_sample_value("fleetscope_agent_build_info", {"version": "test"}) == 1
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "counting"}) is None


def test_full_exposition_passes_promtool_check_metrics():
    promtool = require_binary("promtool")
    sources = [CpuSource(), MemorySource(), StorageSource(), NetworkSource(),
               GpuSource(backend=SimulatedGpus(8, seed=1), expected_gpus=8)]
    reg, sampler = make(sources)
    sampler.sample_once()
    text = generate_latest(reg)
    assert b"fleetscope_gpu_utilization_ratio{" in text and b"fleetscope_cpu_seconds_total{" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr
