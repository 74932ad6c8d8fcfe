"""The NVML path, driven through a fake at the pynvml function boundary."""

from __future__ import annotations

import pynvml
import pytest
from prometheus_client import CollectorRegistry

from agent.exporter import AgentCollector
from agent.gpu.nvml import Nvml, NvmlUnavailable
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


def test_a_driver_that_is_not_loaded_is_an_error_retried_with_backoff():
    fake = FakeNvml([device(0)], init_error=pynvml.NVMLError_DriverNotLoaded())
    t = [0.0]
    reg, sampler = registry_for(Nvml(fake, clock=lambda: t[0]))
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 0
    assert reg.get_sample_value("fleetscope_agent_source_error", {"source": "gpu"}) == 1  # an alert sees it
    assert "driver_not_loaded" in sampler.latest.status["gpu"].error
    for _ in range(3):  # within the backoff: not asked again
        sampler.sample_once()
    assert fake.counts["nvmlInit"] == 1
    fake.init_error = None  # the driver came back
    t[0] += 1.5
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 1
    assert reg.get_sample_value("fleetscope_gpu_up", {"gpu": "0", "uuid": "GPU-fake-0"}) == 1
    assert fake.counts["nvmlInit"] == 2


def test_auto_backend_without_nvml_runs_without_gpus(caplog):
    # This machine has no NVIDIA driver: auto must fall back, say so, and the source has no data.
    from agent.gpu.backend import make_backend

    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has a working NVML")
    except pynvml.NVMLError:
        pass
    caplog.set_level("INFO")
    backend = make_backend("auto")
    assert "no GPUs" in caplog.text
    # No NVIDIA library at all is not an error: the source has no data, and keeps looking with backoff.
    reg, sampler = registry_for(backend)
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 0
    assert reg.get_sample_value("fleetscope_agent_source_error", {"source": "gpu"}) == 0
    assert sampler.latest.status["gpu"].error.startswith("no data")
    backend.shutdown()


def sample(fake, expected=None, clock=None):
    source = GpuSource(backend=Nvml(fake), expected_gpus=expected, **({"clock": clock} if clock else {}))
    sampler = Sampler([source])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler))
    return reg, sampler


G0 = {"gpu": "0", "uuid": "GPU-fake-0"}


def test_identity_thresholds_clocks_and_memory_health():
    reg, sampler = sample(FakeNvml([device(0)]))
    sampler.sample_once()
    v = reg.get_sample_value
    assert v("fleetscope_gpu_info", {**G0, "name": "NVIDIA H100 80GB HBM3", "serial": "1650923001234",
                                     "pci_bus_id": "00000000:18:00.0", "vbios": "96.00.74.00.0D",
                                     "driver": "570.124.06", "cuda_driver": "12.8"}) == 1
    assert v("fleetscope_gpu_memory_reserved_bytes", G0) == 2**30
    assert v("fleetscope_gpu_memory_temperature_celsius", G0) == 78
    assert v("fleetscope_gpu_temperature_slowdown_celsius", G0) == 87
    assert v("fleetscope_gpu_temperature_shutdown_celsius", G0) == 92
    assert v("fleetscope_gpu_graphics_clock_hertz", G0) == 1.98e9
    assert v("fleetscope_gpu_memory_clock_max_hertz", G0) == 2.619e9
    assert v("fleetscope_gpu_ecc_errors_total", {**G0, "type": "corrected", "counter": "aggregate"}) == 10
    assert v("fleetscope_gpu_ecc_errors_total", {**G0, "type": "uncorrected", "counter": "aggregate"}) == 1
    assert v("fleetscope_gpu_remapped_rows_total", {**G0, "type": "correctable"}) == 2
    assert v("fleetscope_gpu_row_remap_pending", G0) == 0
    # Hopper does not retire pages: absent, not 0
    assert v("fleetscope_gpu_retired_pages_total", {**G0, "cause": "double_bit"}) is None
    assert v("fleetscope_gpu_retired_pages_pending", G0) is None
    assert v("fleetscope_gpu_pcie_transmit_bytes_per_second", G0) is None  # from GPM: needs two samples
    sampler.sample_once()
    assert v("fleetscope_gpu_pcie_transmit_bytes_per_second", G0) == 3000 * 2**20
    assert v("fleetscope_gpu_pcie_replays_total", G0) == 5
    assert v("fleetscope_gpu_pcie_link_width", G0) == 16
    assert v("fleetscope_gpu_nvlink_up", {**G0, "link": "17"}) == 1
    assert v("fleetscope_gpu_nvlink_up", {**G0, "link": "18"}) is None  # no such link
    assert v("fleetscope_gpu_health", {**G0, "state": "healthy"}) == 1


def test_clock_events_are_a_state_and_an_accumulated_time():
    fake = FakeNvml([device(0)])
    t = [100.0]
    reg, sampler = sample(fake, clock=lambda: t[0])
    sampler.sample_once()
    fake.devices[0]["clock_events"] = pynvml.nvmlClocksEventReasonHwThermalSlowdown | pynvml.nvmlClocksEventReasonSwThermalSlowdown
    for _ in range(3):
        t[0] += 5
        sampler.sample_once()
    hw = {**G0, "reason": "hw_thermal_slowdown"}
    assert reg.get_sample_value("fleetscope_gpu_clock_event_active", hw) == 1
    assert reg.get_sample_value("fleetscope_gpu_clock_event_active", {**G0, "reason": "sw_power_cap"}) == 0
    assert reg.get_sample_value("fleetscope_gpu_clock_event_seconds_total", hw) == 15
    assert reg.get_sample_value("fleetscope_gpu_health", {**G0, "state": "degraded"}) == 1
    assert reg.get_sample_value("fleetscope_gpu_health_reason", {**G0, "reason": "hw_thermal_slowdown"}) == 1


def test_xids_are_counted_per_code_and_a_repeat_is_visible():
    fake = FakeNvml([device(0), device(1)])
    reg, sampler = sample(fake)
    sampler.sample_once()
    xid = lambda gpu, code: reg.get_sample_value(  # noqa: E731
        "fleetscope_gpu_xid_errors_total", {"gpu": str(gpu), "uuid": f"GPU-fake-{gpu}", "xid": str(code)})
    assert xid(0, 48) == 0 and xid(1, 79) == 0  # catalogued codes start at 0
    fake.xid(1, 13)
    fake.xid(1, 13)
    fake.xid(1, 48)
    fake.xid(0, 999)  # not in the catalogue: still counted
    sampler.sample_once()
    assert xid(1, 13) == 2 and xid(1, 48) == 1 and xid(0, 999) == 1 and xid(0, 13) == 0
    g1 = {"gpu": "1", "uuid": "GPU-fake-1"}
    assert reg.get_sample_value("fleetscope_gpu_health", {**g1, "state": "unhealthy"}) == 1
    assert reg.get_sample_value("fleetscope_gpu_health_reason", {**g1, "reason": "xid_48"}) == 1
    assert reg.get_sample_value("fleetscope_gpu_xid_catalogue_info", {"xid": "79", "name": "GPU has fallen off the bus", "severity": "page"}) == 1


def test_a_gpu_whose_xids_cannot_be_watched_has_no_xid_counters():
    reg, sampler = sample(FakeNvml([device(0, events_supported=False)]))
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_gpu_xid_errors_total", {**G0, "xid": "48"}) is None
    assert reg.get_sample_value("fleetscope_gpu_up", G0) == 1


def test_old_bytes_and_missing_fields_do_not_break_a_sample():
    fake = FakeNvml([device(0, vbios=NotSupported, mem_temp=NotSupported, remapped_rows=NotSupported, nvlinks=[],
                            clock_events=NotSupported, pcie_tx_kb=NotSupported, pcie_rx_kb=NotSupported,
                            pcie_replay=NotSupported, pcie_gen=NotSupported, pcie_width=NotSupported)])
    reg, sampler = sample(fake)
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_agent_source_up", {"source": "gpu"}) == 1
    for metric in ("fleetscope_gpu_memory_temperature_celsius", "fleetscope_gpu_row_remap_pending", "fleetscope_gpu_pcie_link_width"):
        assert reg.get_sample_value(metric, G0) is None, metric
    assert reg.get_sample_value("fleetscope_gpu_clock_event_active", {**G0, "reason": "gpu_idle"}) is None


def test_gpu_processes_are_attributed_to_their_container_pod_slurm_job_and_training_job(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice/"
        "cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n")
    fake = FakeNvml([device(0)])
    source = GpuSource(backend=Nvml(fake), procfs=str(tmp_path), workload_lookup={4242: ("llama", "3")}.get)
    sampler = Sampler([source])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler))
    sampler.sample_once()
    labels = {**G0, "pid": "4242", "container": "0123456789ab", "pod_uid": "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d",
              "slurm_job": "", "training_job": "llama", "rank": "3"}
    assert reg.get_sample_value("fleetscope_gpu_process_memory_used_bytes", labels) == 2**30
    assert reg.get_sample_value("fleetscope_gpu_process_sm_utilization_ratio", labels) == 0.73
    sampler.sample_once()
    # the next read asks only for samples newer than the last one seen; none came, so no utilisation
    assert fake.utilization_since[-1] == 1_000_000
    assert reg.get_sample_value("fleetscope_gpu_process_sm_utilization_ratio", labels) is None
    assert reg.get_sample_value("fleetscope_gpu_process_memory_used_bytes", labels) == 2**30


def test_mig_instances_are_labelled_with_their_profile_and_memory():
    from types import SimpleNamespace

    mig = lambda n, gi, ci, prof: {"uuid": f"MIG-{n}", "gi": gi, "ci": ci, "name": f"NVIDIA H100 80GB HBM3 MIG {prof}",  # noqa: E731
                                   "mem": SimpleNamespace(used=n * 2**30, free=(10 - n) * 2**30, total=10 * 2**30)}
    fake = FakeNvml([device(0, mig_mode=(1, 1), mig=[mig(1, 7, 0, "1g.10gb"), None, mig(2, 8, 0, "1g.10gb")]), device(1)])
    reg, sampler = sample(fake)
    sampler.sample_once()
    v = reg.get_sample_value
    assert v("fleetscope_gpu_mig_enabled", G0) == 1
    assert v("fleetscope_gpu_mig_enabled", {"gpu": "1", "uuid": "GPU-fake-1"}) == 0
    assert v("fleetscope_gpu_mig_info", {**G0, "mig_uuid": "MIG-2", "gpu_instance": "8", "compute_instance": "0",
                                         "profile": "1g.10gb"}) == 1
    assert v("fleetscope_gpu_mig_memory_used_bytes", {**G0, "mig_uuid": "MIG-1"}) == 2**30
    assert v("fleetscope_gpu_mig_memory_total_bytes", {**G0, "mig_uuid": "MIG-2"}) == 10 * 2**30


def test_gpm_activity_needs_two_samples_and_reuses_two_buffers():
    fake = FakeNvml([device(0)])
    reg, sampler = sample(fake)
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_gpu_tensor_activity_ratio", G0) is None  # one sample: no interval yet
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_gpu_sm_activity_ratio", G0) == 0.81
    assert reg.get_sample_value("fleetscope_gpu_tensor_activity_ratio", G0) == 0.555
    assert reg.get_sample_value("fleetscope_gpu_fp64_activity_ratio", G0) is None  # not reported: absent
    for _ in range(5):
        sampler.sample_once()
    assert fake.counts["nvmlGpmSampleAlloc"] == 2 and len(fake.gpm_live) == 2  # two buffers, taken in turn
    sampler.stop()
    assert not fake.gpm_live  # freed at shutdown


def test_gpus_before_hopper_have_no_gpm_activity():
    fake = FakeNvml([device(0, gpm=NotSupported)])
    reg, sampler = sample(fake)
    sampler.sample_once()
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_gpu_sm_activity_ratio", G0) is None
    assert fake.counts["nvmlGpmSampleAlloc"] == 0


def test_nvlink_throughput_counters_per_link():
    reg, sampler = sample(FakeNvml([device(0)]))
    sampler.sample_once()
    assert reg.get_sample_value("fleetscope_gpu_nvlink_transmit_bytes_total", {**G0, "link": "2"}) == 3000 * 1024
    assert reg.get_sample_value("fleetscope_gpu_nvlink_receive_bytes_total", {**G0, "link": "0"}) == 2000 * 1024
