"""The exporter serves the latest snapshot; a failing source is a metric, never a crash."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest

from agent.exporter import AgentCollector
from agent.gpu.sim import SimulatedGpus
from agent.sampler import Sampler
from agent.sources.base import Family, NoData, Source, reading
from agent.sources.cpu import CpuSource
from agent.sources.gpu import GpuSource
from agent.sources.memory import MemorySource
from agent.sources.network import NetworkSource
from agent.sources.storage import StorageSource
from tests.agent.test_dcgm import parse_exposition
from tests.conftest import require_binary


class Broken(Source):
    name = "broken"
    families = (Family("fleetscope_broken_things", "gauge", "Never seen."),)

    def __init__(self, exc: Exception, name: str = "broken") -> None:
        self.exc = exc
        self.name = name

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
    reg, sampler = make([Broken(RuntimeError("disk vanished")), Broken(NoData("no IB"), name="absent"), counting])
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "broken"}) == 0
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "counting"}) == 1
    assert reg.get_sample_value("fleetscope_counting_collections_total") == 1
    assert reg.get_sample_value("fleetscope_broken_things") is None
    assert reg.get_sample_value("fleetscope_agent_source_duration_seconds", {"source": "broken"}) >= 0
    # an error is an error; absent hardware is not
    assert reg.get_sample_value("fleetscope_agent_source_error", {"source": "broken"}) == 1
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "absent"}) == 0
    assert reg.get_sample_value("fleetscope_agent_source_error", {"source": "absent"}) == 0
    assert reg.get_sample_value("fleetscope_agent_source_error", {"source": "counting"}) == 0
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


def test_compat_dcgm_emits_dcgm_exporter_names_units_and_labels():
    sim = SimulatedGpus(2, seed=3)
    reg, sampler = make([GpuSource(backend=sim, compat_dcgm=True, hostname="gpu-012")])
    sampler.sample_once()
    g = sampler.latest.gpus[0]
    labels = {"gpu": "0", "UUID": g.uuid, "device": "nvidia0", "modelName": g.name, "Hostname": "gpu-012",
              "DCGM_FI_DRIVER_VERSION": sim.driver_version, "pci_bus_id": g.pci_bus_id,
              "GPU_I_PROFILE": "", "GPU_I_ID": ""}  # a MIG instance's series have them; a whole GPU's are empty
    assert reg.get_sample_value("DCGM_FI_DEV_FB_USED", labels) == g.memory_used_bytes // 2**20
    assert reg.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels) == round(g.utilization_ratio * 100)
    assert reg.get_sample_value("DCGM_FI_DEV_SM_CLOCK", labels) == round(g.sm_clock_hertz / 1e6)
    assert reg.get_sample_value("DCGM_FI_DEV_XID_ERRORS", labels | {"err_code": "0", "err_msg": "No Error"}) == 0
    assert reg.get_sample_value("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", labels) == round(g.energy_joules * 1000)
    # our own names are still there
    assert reg.get_sample_value("fleetscope_gpu_memory_used_bytes", {"gpu": "0", "uuid": g.uuid}) == g.memory_used_bytes
    # What scrapers get (the fast renderer) types dcgm-exporter's counters as it does; prometheus_client
    # would add `_total` to a counter's name, so its registry can only call them untyped.
    assert b"# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter" in AgentCollector(sampler).render()
    assert b"# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION untyped" in generate_latest(reg)
    # promtool's findings on dcgm-exporter's names: tests/agent/test_dcgm.py


def test_without_compat_there_are_no_dcgm_names():
    reg, sampler = make([GpuSource(backend=SimulatedGpus(1))])
    sampler.sample_once()
    assert b"DCGM_FI" not in generate_latest(reg)


def test_the_fast_renderer_writes_exactly_what_generate_latest_writes():
    from agent.exporter import AgentCollector as AC

    class Odd(Source):
        name = "odd"
        families = (Family("fleetscope_odd_things", "gauge", 'Help with a \\ and a\nnewline.', ("what",)),)

        def collect(self):
            yield reading("fleetscope_odd_things", 1e21, what='quote " backslash \\ newline \n')
            yield reading("fleetscope_odd_things", float("nan"), what="nan")
            yield reading("fleetscope_odd_things", float("-inf"), what="")

    sources = [CpuSource(), MemorySource(), StorageSource(), NetworkSource(), Odd(),
               GpuSource(backend=SimulatedGpus(4, seed=2), expected_gpus=4, compat_dcgm=True, hostname="h")]
    sampler = Sampler(sources)
    sampler.sample_once()
    collector = AC(sampler, version="t", labels={"cluster": "c"})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ours, theirs = collector.render().decode(), generate_latest(reg).decode()
    # prometheus_client cannot spell dcgm-exporter's metrics as it does (counters without `_total`, "%d" and
    # "%f" values), so under --compat dcgm those lines differ in exactly that; all others byte for byte.
    assert [line for line in ours.splitlines() if "DCGM_FI_" not in line] == \
           [line for line in theirs.splitlines() if "DCGM_FI_" not in line]
    our_types, our_help, our_samples = parse_exposition(ours)
    their_types, their_help, their_samples = parse_exposition(theirs)
    assert our_help == their_help
    assert {n: "untyped" if n.startswith("DCGM_FI_") and t == "counter" else t for n, t in our_types.items()} == their_types
    ours_dcgm = [(n, labels, float(v)) for n, labels, v in our_samples if n.startswith("DCGM_FI_")]
    assert ours_dcgm and ours_dcgm == [(n, labels, float(v)) for n, labels, v in their_samples if n.startswith("DCGM_FI_")]


def test_the_metrics_server_renders_once_per_snapshot_and_gzips():
    import gzip
    import urllib.request

    from agent.exposition import MetricsServer

    renders = []
    generation = [object()]

    def render():
        renders.append(1)
        return b"fleetscope_x 1.0\n"

    server = MetricsServer("127.0.0.1", 0, render, lambda: generation[0])
    server.start()
    try:
        url = f"http://127.0.0.1:{server.address[1]}/metrics"
        for _ in range(5):
            assert urllib.request.urlopen(url).read() == b"fleetscope_x 1.0\n"
        assert len(renders) == 1
        generation[0] = object()  # a new snapshot
        req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(resp.read()) == b"fleetscope_x 1.0\n"
        assert len(renders) == 2
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/nope")
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        server.stop()


def test_a_family_declared_again_with_other_label_names_is_rendered_with_those():
    from agent.exposition import render
    from agent.sources.base import Family, Reading

    reading = Reading("fleetscope_test_labels", 1.0, (("gpu", "0"),))
    plain = Family("fleetscope_test_labels", "gauge", "a test family", ("gpu",))
    podded = Family("fleetscope_test_labels", "gauge", "a test family", ("gpu", "pod"))
    assert b'fleetscope_test_labels{gpu="0"} 1.0' in render([plain], [reading])
    assert b'fleetscope_test_labels{gpu="0",pod=""} 1.0' in render([podded], [reading])
    assert b'fleetscope_test_labels{gpu="0"} 1.0' in render([plain], [reading])
