"""The NVML path, driven through a fake at the pynvml function boundary."""

from __future__ import annotations

import pynvml
import pytest
from prometheus_client import CollectorRegistry

from agent.exporter import AgentCollector
from agent.nvml import Nvml, NvmlUnavailable
from agent.sampler import Sampler
from agent.sources.gpu import GpuSource
from tests.agent.fake_pynvml import FakeNvml, NotSupported, device


def registry_for(backend, expected=None) -> tuple[CollectorRegistry, Sampler]:
    sampler = Sampler([GpuSource(backend=backend, expected_gpus=expected)])
    sampler.sample_once()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler))
    return reg, sampler


def test_units_are_converted_to_base_units():
    nvml = Nvml(FakeNvml([device(0)]))
    (gpu,) = nvml.read()
    assert gpu.uuid == "GPU-fake-0" and gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.utilization_ratio == 0.87 and gpu.memory_utilization_ratio == 0.41
    assert gpu.memory_total_bytes == 80 * 2**30
    assert gpu.power_watts == 652.5 and gpu.power_limit_watts == 700.0
    assert gpu.energy_joules == pytest.approx(123_456.789)
    assert gpu.sm_clock_hertz == 1.98e9 and gpu.memory_clock_hertz == 2.619e9
    assert gpu.temperature_celsius == 71.0 and gpu.pstate == 0
    assert gpu.pids == (4242,)
    assert nvml.driver_version == "570.124.06"


def test_unsupported_fields_are_omitted_never_zero():
    reg, _ = registry_for(Nvml(FakeNvml([device(0, fan=NotSupported, power_mw=NotSupported, temp=NotSupported)])))
    labels = {"gpu": "0", "uuid": "GPU-fake-0"}
    assert reg.get_sample_value("fleetscope_gpu_fan_speed_ratio", labels) is None
    assert reg.get_sample_value("fleetscope_gpu_power_watts", labels) is None
    assert reg.get_sample_value("fleetscope_gpu_temperature_celsius", labels) is None
    assert reg.get_sample_value("fleetscope_gpu_utilization_ratio", labels) == 0.87
    assert reg.get_sample_value("fleetscope_gpu_energy_joules_total", labels) == pytest.approx(123_456.789)


def test_a_gpu_that_falls_off_the_bus_is_down_and_keeps_its_identity():
    fake = FakeNvml([device(0), device(1)])
    nvml = Nvml(fake)
    nvml.read()
    fake.devices[1]["lost"] = True
    reg, _ = registry_for(nvml, expected=2)
    assert reg.get_sample_value("fleetscope_gpu_up", {"gpu": "1", "uuid": "GPU-fake-1"}) == 0
    assert reg.get_sample_value("fleetscope_gpu_up", {"gpu": "0", "uuid": "GPU-fake-0"}) == 1
    assert reg.get_sample_value("fleetscope_gpus_present") == 1
    assert reg.get_sample_value("fleetscope_gpus_expected") == 2
    assert reg.get_sample_value("fleetscope_gpu_temperature_celsius", {"gpu": "1", "uuid": "GPU-fake-1"}) is None
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 1


def test_nvml_that_does_not_initialise_is_unavailable():
    nvml = Nvml(FakeNvml([], init_error=pynvml.NVMLError_DriverNotLoaded()))
    with pytest.raises(NvmlUnavailable, match="did not initialise"):
        nvml.init()


def test_an_explicit_nvml_backend_that_fails_reports_the_source_down_and_retries():
    fake = FakeNvml([device(0)], init_error=pynvml.NVMLError_DriverNotLoaded())
    reg, sampler = registry_for(Nvml(fake))
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 0
    fake.init_error = None  # the driver came back
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 1
    assert fake.calls.count("init") == 2


def test_auto_backend_without_nvml_runs_without_gpus(caplog):
    # This machine has no NVIDIA driver: auto must fall back, say so, and the source has no data.
    from agent.sources.gpu import make_backend

    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has a working NVML")
    except pynvml.NVMLError:
        pass
    assert make_backend("auto") is None
    assert "no GPUs" in caplog.text
    reg, sampler = registry_for(None)
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 0
    assert sampler.latest.status["gpu"].error.startswith("no data")
