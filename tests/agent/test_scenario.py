"""Fault scenarios make the simulated GPUs fail the way NVML reports failures."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from agent.exporter import AgentCollector
from agent.gpu.scenario import load_scenario, parse_scenario
from agent.gpu.sim import SimulatedGpus
from agent.sampler import Sampler
from agent.sources.gpu import GpuSource

SCENARIO = """
[[fault]]
at_s = 20
gpu = 0
kind = "thermal"

[[fault]]
at_s = 30
gpu = 1
kind = "xid"
xid = 79

[[fault]]
at_s = 30
gpu = 2
kind = "xid"
xid = 48

[[fault]]
at_s = 30
gpu = 3
kind = "nvlink_crc_storm"
link = 4
errors_per_second = 100
duration_s = 10

[[fault]]
at_s = 30
gpu = 4
kind = "pcie_degraded"

[[fault]]
at_s = 30
gpu = 5
kind = "power_cap"
power_limit_watts = 300
"""


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def played(tmp_path):
    path = tmp_path / "faults.toml"
    path.write_text(SCENARIO)
    clock = Clock()
    sim = SimulatedGpus(8, seed=1, clock=clock, faults=load_scenario(path))
    sampler = Sampler([GpuSource(backend=sim, clock=clock)])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler))

    def at(t):
        while clock.t < t:
            clock.t += 1
            sampler.sample_once()
        return lambda name, gpu, **labels: reg.get_sample_value(name, {"gpu": str(gpu), "uuid": sim.gpus[gpu].uuid, **labels})

    return at


def test_nothing_is_wrong_before_the_faults(played):
    v = played(19)
    for gpu in range(8):
        assert v("fleetscope_gpu_up", gpu) == 1
        assert v("fleetscope_gpu_health", gpu, state="unhealthy") == 0


@pytest.mark.slow  # seconds of real time: in `make test`, out of the quick loop
def test_lost_cooling_heats_the_gpu_into_thermal_slowdown(played):
    v = played(300)
    assert v("fleetscope_gpu_temperature_celsius", 0) >= 85
    # the hardware slowdown holds it there: it never reaches its shutdown temperature
    assert v("fleetscope_gpu_temperature_celsius", 0) < v("fleetscope_gpu_temperature_shutdown_celsius", 0)
    assert v("fleetscope_gpu_clock_event_active", 0, reason="hw_thermal_slowdown") == 1 or \
        v("fleetscope_gpu_clock_event_active", 0, reason="sw_thermal_slowdown") == 1
    assert v("fleetscope_gpu_clock_event_seconds_total", 0, reason="sw_thermal_slowdown") > 0
    assert v("fleetscope_gpu_sm_clock_hertz", 0) < v("fleetscope_gpu_sm_clock_hertz", 6)
    assert v("fleetscope_gpu_health", 0, state="degraded") == 1


def test_xid_79_takes_the_gpu_off_the_bus(played):
    v = played(31)
    assert v("fleetscope_gpu_up", 1) == 0
    assert v("fleetscope_gpu_xid_errors_total", 1, xid="79") == 1
    assert v("fleetscope_gpu_temperature_celsius", 1) is None
    assert v("fleetscope_gpu_health_reason", 1, reason="gpu_lost") == 1


def test_xid_48_counts_an_uncorrectable_error_and_a_pending_remap(played):
    v = played(31)
    assert v("fleetscope_gpu_xid_errors_total", 2, xid="48") == 1
    assert v("fleetscope_gpu_ecc_errors_total", 2, type="uncorrected", counter="volatile") == 1
    assert v("fleetscope_gpu_row_remap_pending", 2) == 1
    assert v("fleetscope_gpu_health", 2, state="unhealthy") == 1
    v = played(40)
    assert v("fleetscope_gpu_xid_errors_total", 2, xid="48") == 1  # one event, counted once


def test_an_nvlink_crc_storm_raises_one_links_counter_for_its_duration(played):
    v = played(45)
    assert v("fleetscope_gpu_nvlink_errors_total", 3, link="4", type="crc_flit") == pytest.approx(1000, rel=0.15)
    assert v("fleetscope_gpu_nvlink_errors_total", 3, link="5", type="crc_flit") == 0


def test_a_pcie_link_dropping_to_x8_and_a_power_cap(played):
    v = played(60)
    assert v("fleetscope_gpu_pcie_link_width", 4) == 8 and v("fleetscope_gpu_pcie_link_width_max", 4) == 16
    assert v("fleetscope_gpu_health_reason", 4, reason="pcie_width_degraded") == 1
    assert v("fleetscope_gpu_power_limit_watts", 5) == 300 and v("fleetscope_gpu_power_watts", 5) <= 300
    assert v("fleetscope_gpu_clock_event_active", 5, reason="sw_power_cap") == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({"fault": [{"gpu": 0, "kind": "thermal"}]}, "missing 'at_s'"),
        ({"fault": [{"at_s": 1, "gpu": 0, "kind": "melt"}]}, "kind 'melt' is not one of"),
        ({"fault": [{"at_s": 1, "gpu": 0, "kind": "xid"}]}, "integer `xid`"),
        ({"faults": []}, "unknown table"),
    ],
)
def test_bad_scenarios_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        parse_scenario(data)


def test_a_fault_on_a_gpu_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="GPU 9"):
        SimulatedGpus(8, faults=parse_scenario({"fault": [{"at_s": 1, "gpu": 9, "kind": "thermal"}]}))
