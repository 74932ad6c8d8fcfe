"""The fast renderer (agent/exposition.py) writes what prometheus_client's generate_latest writes, byte for byte:
whole scrapes of an 8-GPU node on the fake NVML, rendered again and again (its caches warm), and values chosen to
catch a cached spelling that is not floatToGoString's (-0.0 against 0.0, ints against floats, NaN, infinities,
Go's exponents, a cache that fills up)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent import exposition
from agent.exporter import AgentCollector
from agent.exposition import render
from agent.gpu.nvml import Nvml
from agent.sampler import Sampler
from agent.sources.base import Family, Reading, Source, reading
from agent.sources.gpu import GpuSource
from tests.agent.fake_pynvml import FakeNvml, device


class Values(Source):
    """One family of the given values, one series each, and a family without labels."""

    name = "values"
    families = (Family("fleetscope_test_values", "gauge", "Values.", ("i",)),
                Family("fleetscope_test_plain_total", "counter", "No labels."))

    def __init__(self, values) -> None:
        self.values = list(values)

    def collect(self):
        for i, v in enumerate(self.values):
            yield Reading("fleetscope_test_values", v, (("i", str(i)),))
        if self.values:
            yield Reading("fleetscope_test_plain_total", self.values[-1])


def both(sources) -> tuple[bytes, bytes]:
    sampler = Sampler(sources)
    sampler.sample_once()
    collector = AgentCollector(sampler, version="t", labels={"cluster": "c"})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return collector.render(), generate_latest(reg)


def test_an_8_gpu_node_on_the_fake_nvml_byte_for_byte_scrape_after_scrape():
    fake = FakeNvml([device(i) for i in range(8)])
    source = GpuSource(backend=Nvml(fake), expected_gpus=8)
    sampler = Sampler([source])
    collector = AgentCollector(sampler, version="t")
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    for n in range(4):  # the first render fills the caches, the later ones read them
        fake.devices[n]["energy_mj"] += 1234 * n  # some values change between samples, as counters do
        fake.devices[n]["temp"] = -3 if n == 2 else 70 + n  # a negative value in one sample's family
        sampler.sample_once()
        ours, theirs = collector.render(), generate_latest(reg)
        assert ours == theirs
        assert ours.count(b"\n") > 1_500


@pytest.mark.parametrize("values", [
    [0.0, -0.0, 0.0, 1.0, -0.0],  # -0.0 equals 0.0 as a dict key: must not take 0.0's text, nor give it its own
    [-0.0],
    [0, 1, True, False, 2**53, 2**53 + 1, 10**20],  # ints hash as the floats they equal
    [1.0, 1, 1.5, 0.1, 1e6, 1234567.0, 1e21, 6.4e10, 123456789012.0, 5e-324, 1.7976931348623157e308],  # Go's exponents
    [math.nan, -math.nan, math.inf, -math.inf, 0.0, math.nan],
    [-1.0, 0.0, 2.0, -0.0, -1e21],
    [],
])
def test_values_are_spelled_as_generate_latest_spells_them_render_after_render(values):
    for _ in range(3):  # cold, then from the cache
        ours, theirs = both([Values(values)])
        assert ours == theirs


def test_minus_zero_after_zero_was_cached_and_zero_after_minus_zero():
    first, _ = both([Values([0.0, 7.5])])
    ours, theirs = both([Values([-0.0, 7.5])])
    assert ours == theirs and b'i="0"} -0.0\n' in ours
    ours, theirs = both([Values([0.0, -0.0])])
    assert ours == theirs


def test_a_full_value_cache_is_cleared_and_the_text_stays_right(monkeypatch):
    monkeypatch.setattr(exposition, "_VALUES_MAX", 10)
    monkeypatch.setattr(exposition, "_VALUES", {})
    for start in range(0, 60, 7):
        ours, theirs = both([Values([float(x) + 0.25 for x in range(start, start + 25)])])
        assert ours == theirs
        assert len(exposition._VALUES) <= 10


def test_value_formats_nothing_and_label_less_families():
    fam = Family("X", "gauge", "h", ("gpu",), value_format="%d")
    assert render([fam], [reading("X", 3.0, gpu=0), reading("X", math.nan, gpu=1)]) == \
        b'# HELP X h\n# TYPE X gauge\nX{gpu="0"} 3\nX{gpu="1"} NaN\n'
    assert render([fam], []) == b""
    plain = Family("Y", "counter", "h")
    assert render([plain, fam], [Reading("Y", 2.0), reading("X", -0.0, gpu=0)]) == \
        b'# HELP Y h\n# TYPE Y counter\nY 2.0\n# HELP X h\n# TYPE X gauge\nX{gpu="0"} 0\n'
