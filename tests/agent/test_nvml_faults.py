"""NVML failing the way real drivers fail: every error class, on one call or one GPU, and recovery.

Driven through the strict fake at the pynvml function boundary (tests/agent/fake_pynvml.py): real
pynvml error classes, raised where the real library raises them.
"""

from __future__ import annotations

import logging
import time

import pynvml
import pytest
from prometheus_client import CollectorRegistry

from agent.exporter import AgentCollector
from agent.gpu.kmsg import KernelXids
from agent.gpu.nvml import Nvml, reason_of
from agent.sampler import Sampler
from agent.sources.gpu import GpuSource
from tests.agent.fake_pynvml import FakeNvml, NotSupported, device

# Errors a single call can raise that leave the GPU readable: the field goes, the rest stays.
FIELD_ERRORS = [pynvml.NVMLError_Unknown, pynvml.NVMLError_NotReady, pynvml.NVMLError_Timeout, pynvml.NVMLError_IrqIssue,
                pynvml.NVMLError_CorruptedInforom, pynvml.NVMLError_OperatingSystem, pynvml.NVMLError_Memory,
                pynvml.NVMLError_InsufficientPower, pynvml.NVMLError_InUse, pynvml.NVMLError_NoData,
                pynvml.NVMLError_NotFound, pynvml.NVMLError_InvalidArgument, pynvml.NVMLError_NoPermission,
                pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_LibRmVersionMismatch, pynvml.NVMLError_ArgumentVersionMismatch,
                pynvml.NVMLError_InvalidState, pynvml.NVMLError_InsufficientResources, pynvml.NVMLError_Deprecated]
# Errors that make a whole GPU unreadable, with the reason its verdict carries.
GPU_ERRORS = [(pynvml.NVMLError_GpuIsLost, "gpu_lost"), (pynvml.NVMLError_ResetRequired, "reset_required"),
              (pynvml.NVMLError_GpuNotFound, "gpu_not_found"), (pynvml.NVMLError_NotReady, "not_ready"),
              (pynvml.NVMLError_Unknown, "unknown_error"), (pynvml.NVMLError_Timeout, "timeout")]


class Node:
    """Eight fake H100s behind the real gateway, source, sampler and exporter."""

    def __init__(self, n: int = 8, kernel_log=None, **device_overrides) -> None:
        self.fake = FakeNvml([device(i, **device_overrides) for i in range(n)])
        self.t = [1000.0]
        self.nvml = Nvml(self.fake, kernel_log=kernel_log, clock=lambda: self.t[0])
        self.sampler = Sampler([GpuSource(backend=self.nvml, expected_gpus=n)])
        self.reg = CollectorRegistry(auto_describe=False)
        self.collector = AgentCollector(self.sampler)
        self.reg.register(self.collector)

    def sample(self):
        return self.sampler.sample_once()

    def v(self, name: str, gpu: int | None = None, **labels):
        if gpu is not None:
            labels = {"gpu": str(gpu), "uuid": f"GPU-fake-{gpu}", **labels}
        return self.reg.get_sample_value(name, labels)

    def series_of(self, gpu: int) -> set[str]:
        uuid = f"GPU-fake-{gpu}"
        return {r.name for r in self.sample_readings() if ("uuid", uuid) in r.labels}

    def sample_readings(self):
        return self.sampler.latest.readings

    def close(self):
        self.sampler.stop()


@pytest.fixture
def node():
    n = Node()
    yield n
    n.close()


@pytest.mark.parametrize("error", FIELD_ERRORS, ids=lambda e: e.__name__)
def test_an_error_in_one_call_costs_only_that_field_of_that_gpu(node, error):
    node.sample()
    node.sample()  # GPM activity needs two
    healthy = node.series_of(0)
    node.fake.fail("nvmlDeviceGetPowerUsage", error, gpu=3)
    node.sample()
    assert node.v("fleetscope_agent_source_up", source="gpu") == 1
    assert node.v("fleetscope_gpu_power_watts", 3) is None
    assert node.v("fleetscope_gpu_power_watts", 2) == 652.5
    assert node.v("fleetscope_gpu_up", 3) == 1
    assert node.v("fleetscope_gpu_temperature_celsius", 3) == 71
    assert node.v("fleetscope_gpus_present") == 8
    for gpu in range(8):
        if gpu != 3:
            assert node.series_of(gpu) == healthy, gpu
    assert node.collector.render()  # /metrics still renders


@pytest.mark.parametrize(("error", "reason"), GPU_ERRORS, ids=lambda e: getattr(e, "__name__", e))
def test_a_gpu_that_cannot_be_read_is_down_with_its_reason_and_the_others_carry_on(node, error, reason):
    node.sample()
    node.fake.fail("*", error, gpu=5)
    node.sample()
    assert node.v("fleetscope_gpu_up", 5) == 0
    assert node.v("fleetscope_gpu_health", 5, state="unhealthy") == 1
    assert node.v("fleetscope_gpu_health_reason", 5, reason=reason) == 1
    assert node.v("fleetscope_gpus_present") == 7
    assert node.v("fleetscope_agent_source_up", source="gpu") == 1
    for gpu in (0, 4, 6, 7):
        assert node.v("fleetscope_gpu_up", gpu) == 1
        assert node.v("fleetscope_gpu_power_watts", gpu) == 652.5
    frame_gpu = next(g for g in node.sampler.latest.gpus if g.index == 5)
    assert not frame_gpu.up and frame_gpu.uuid == "GPU-fake-5" and frame_gpu.error == reason


def test_a_gpu_whose_handle_cannot_be_had_is_down_from_the_first_sample(node):
    node.fake.fail("nvmlDeviceGetHandleByIndex", pynvml.NVMLError_ResetRequired, gpu=2)
    node.sample()
    assert node.reg.get_sample_value("fleetscope_gpu_health_reason", {"gpu": "2", "uuid": "index-2", "reason": "reset_required"}) == 1
    assert node.v("fleetscope_gpus_present") == 7


def test_a_reset_gpu_comes_back_with_a_new_handle_and_its_xids_watched_again(node):
    node.sample()
    node.fake.fail("*", pynvml.NVMLError_ResetRequired, gpu=1)
    node.sample()
    assert node.v("fleetscope_gpu_up", 1) == 0
    registered = node.fake.counts["nvmlDeviceRegisterEvents"]
    node.fake.heal()  # the operator reset the GPU
    node.sample()
    assert node.v("fleetscope_gpu_up", 1) == 1
    assert node.v("fleetscope_gpu_health", 1, state="healthy") == 1
    assert node.fake.counts["nvmlDeviceRegisterEvents"] == registered + 1  # a new event set for the new handle
    node.fake.xid(1, 31)
    node.sample()
    assert node.v("fleetscope_gpu_xid_errors_total", 1, xid="31") == 1
    assert len(node.fake.gpm_live) == 16  # the reset GPU's old GPM buffers were freed, its new ones allocated


def test_a_lost_gpu_does_not_answer_events_and_is_down(node):
    node.sample()
    node.fake.devices[6]["lost"] = True
    node.fake.xid(6, 79)
    node.sample()
    assert node.v("fleetscope_gpu_up", 6) == 0
    assert node.v("fleetscope_gpu_health_reason", 6, reason="gpu_lost") == 1
    assert node.v("fleetscope_gpu_up", 7) == 1


@pytest.mark.parametrize(("error", "problem"), [
    (pynvml.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match"), "library_mismatch"),
    (pynvml.NVMLError_FunctionNotFound, "function_not_found"),
    (pynvml.NVMLError_LibRmVersionMismatch, "library_mismatch"),
], ids=["NVMLLibraryMismatchError", "FunctionNotFound", "LibRmVersionMismatch"])
def test_a_driver_library_mismatch_is_a_source_error_logged_once_not_unsupported(node, caplog, error, problem):
    node.fake.fail("nvmlDeviceGetEnforcedPowerLimit", error)
    with caplog.at_level(logging.ERROR, logger="fleetscope.agent.nvml"):
        for _ in range(3):
            node.sample()
    assert node.v("fleetscope_gpu_power_limit_watts", 0) is None
    assert node.v("fleetscope_gpu_power_watts", 0) == 652.5
    assert node.v("fleetscope_agent_source_error", source="gpu") == 1
    assert node.v("fleetscope_agent_source_problem", source="gpu", problem=problem) == 1
    assert len([r for r in caplog.records if "mismatch" in r.getMessage()]) == 1


def test_errors_that_are_not_unsupported_are_counted_per_call(node):
    node.fake.fail("nvmlDeviceGetClockInfo", pynvml.NVMLError_Unknown, gpu=0)
    node.sample()
    node.sample()
    assert node.v("fleetscope_gpu_nvml_errors_total", 0, call="nvmlDeviceGetClockInfo", reason="unknown_error") == 6
    assert node.v("fleetscope_gpu_sm_clock_hertz", 0) is None


def test_processes_hidden_by_permissions_are_exported_and_logged_once(node, caplog):
    node.fake.fail("nvmlDeviceGetComputeRunningProcesses", pynvml.NVMLError_NoPermission)
    with caplog.at_level(logging.WARNING, logger="fleetscope.agent.nvml"):
        node.sample()
        node.sample()
    assert node.v("fleetscope_gpu_data_hidden", 0, data="processes", reason="no_permission") == 1
    assert node.v("fleetscope_gpu_process_memory_used_bytes", 0, pid="4242", container="", pod_uid="", slurm_job="",
                  training_job="", rank="") is None
    assert len([r for r in caplog.records if "GPU 0" in r.getMessage() and "NoPermission" in r.getMessage()]) == 1


def test_nvml_that_goes_away_is_initialised_again_with_backoff(node):
    node.sample()
    node.fake.initialized = False  # the driver was unloaded and reloaded: every call says Uninitialized
    node.sample()
    assert node.v("fleetscope_agent_source_up", source="gpu") == 0
    assert node.v("fleetscope_agent_source_error", source="gpu") == 1
    inits = node.fake.counts["nvmlInit"]
    node.sample()  # within the backoff: no new init
    assert node.fake.counts["nvmlInit"] == inits
    node.t[0] += 2
    node.sample()
    assert node.v("fleetscope_agent_source_up", source="gpu") == 1
    assert node.v("fleetscope_gpus_present") == 8
    assert len(node.fake.gpm_live) == 16  # the old handles' buffers were given back


def test_failing_gpm_samples_leak_nothing(node):
    node.fake.fail("nvmlGpmSampleGet", pynvml.NVMLError_Unknown)
    for _ in range(5):
        node.sample()
    assert node.fake.counts["nvmlGpmSampleAlloc"] == 16 and len(node.fake.gpm_live) == 16
    node.fake.heal()
    node.sample()
    node.sample()
    assert node.v("fleetscope_gpu_sm_activity_ratio", 0) == 0.81
    node.close()
    assert not node.fake.gpm_live


def test_a_sample_costs_at_most_40_nvml_calls_per_gpu_and_static_values_are_read_once(node):
    node.sample()
    node.sample()
    before = node.fake.counts.copy()
    samples = 5
    for _ in range(samples):
        node.sample()
    calls = node.fake.counts - before
    per_gpu = sum(calls.values()) / samples / 8
    assert per_gpu <= 40, (per_gpu, calls)
    for static in ("nvmlDeviceGetName", "nvmlDeviceGetSerial", "nvmlDeviceGetVbiosVersion", "nvmlDeviceGetPciInfo",
                   "nvmlDeviceGetTemperatureThreshold", "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetNvLinkState",
                   "nvmlDeviceGetFanSpeed", "nvmlDeviceGetPcieThroughput", "nvmlDeviceGetHandleByIndex"):
        assert calls[static] == 0, static
    assert node.v("fleetscope_gpu_nvlink_up", 0, link="17") == 1


def test_pcie_throughput_of_gpus_without_gpm_comes_from_a_thread_not_the_sample():
    n = Node(2, gpm=NotSupported)
    n.nvml._pcie_interval_s = 0.05
    try:
        n.sample()
        assert n.fake.counts["nvmlDeviceGetPcieThroughput"] == 0  # never on the sampler's path
        deadline = time.monotonic() + 5
        while n.fake.counts["nvmlDeviceGetPcieThroughput"] < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        n.sample()
        assert n.v("fleetscope_gpu_pcie_transmit_bytes_per_second", 1) == 1_000_000 * 1024
    finally:
        n.close()


def test_all_nvlinks_down_or_a_fabric_not_ready_is_unhealthy():
    n = Node(3)
    try:
        n.fake.devices[0]["nvlinks"] = [False] * 18  # the fabric manager stopped
        n.fake.devices[1]["fabric"] = (pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS, 0, 0, 0, 0)
        n.fake.devices[2]["nvlink_ecc_total"] = 12
        n.sample()
        assert n.v("fleetscope_gpu_health_reason", 0, reason="nvlink_all_down") == 1
        assert n.v("fleetscope_gpu_health", 0, state="unhealthy") == 1
        assert n.v("fleetscope_gpu_health_reason", 1, reason="fabric_not_ready") == 1
        assert n.v("fleetscope_gpu_fabric_info", 1, state="in_progress", status="", clique_id="0", health="") == 1
        assert n.v("fleetscope_gpu_fabric_info", 2, state="completed", status="success", clique_id="7", health="healthy") == 1
        assert n.v("fleetscope_gpu_health", 2, state="healthy") == 1
        assert n.v("fleetscope_gpu_nvlink_ecc_errors_total", 2) == 12
    finally:
        n.close()


def test_pcie_only_gpus_have_no_links_and_no_fabric():
    n = Node(1, nvlinks=NotSupported, fabric=NotSupported)
    try:
        n.sample()
        n.sample()
        assert n.v("fleetscope_gpu_nvlink_up", 0, link="0") is None
        assert n.v("fleetscope_gpu_health", 0, state="healthy") == 1
        assert n.fake.counts["nvmlDeviceGetGpuFabricInfoV"] == 1  # not asked again
    finally:
        n.close()


def kmsg_line(seq: int, boot_us: int, bus: str, code: int) -> str:
    return f"3,{seq},{boot_us},-;NVRM: Xid (PCI:{bus}): {code}, pid=1, name=python, test\n"


def test_kernel_log_xids_count_from_before_the_agent_and_are_not_counted_twice(tmp_path):
    log_file = tmp_path / "kmsg"
    # Two XIDs of GPU 0 (bus 00000000:18:00.0) from a second after boot, long before the agent started.
    log_file.write_text(kmsg_line(1, 1_000_000, "0000:18:00", 48) + kmsg_line(2, 1_000_005, "0000:18:00", 48))
    n = Node(2, kernel_log=KernelXids(str(log_file)))
    try:
        n.sample()
        assert n.v("fleetscope_gpu_xid_errors_total", 0, xid="48") == 2
        if time.monotonic() > 2 * 3600:  # the machine has been up long enough for a boot-time XID to be old
            assert n.v("fleetscope_gpu_health", 0, state="healthy") == 1
        # A new XID arrives by both paths: NVML's event and the kernel's line. It counts once.
        n.fake.xid(1, 94)
        with log_file.open("a") as f:
            f.write(kmsg_line(3, int(time.monotonic() * 1e6), "0000:19:00", 94))
        n.sample()
        assert n.v("fleetscope_gpu_xid_errors_total", 1, xid="94") == 1
        assert n.v("fleetscope_gpu_health_reason", 1, reason="xid_94") == 1
        # A code only the kernel log has (NVML delivered no event) is counted too.
        with log_file.open("a") as f:
            f.write(kmsg_line(4, int(time.monotonic() * 1e6), "0000:19:00", 119))
        n.sample()
        assert n.v("fleetscope_gpu_xid_errors_total", 1, xid="119") == 1
        assert n.v("fleetscope_gpu_xid_errors_total", 1, xid="94") == 1
    finally:
        n.close()


def test_a_kernel_log_the_agent_may_not_read_is_reported(tmp_path):
    n = Node(1, kernel_log=KernelXids(str(tmp_path / "absent")))
    try:
        n.sample()
        assert n.v("fleetscope_agent_source_problem", source="gpu", problem="kmsg:absent") == 1
        assert n.v("fleetscope_gpu_xid_errors_total", 0, xid="48") == 0  # NVML events still count
    finally:
        n.close()


def test_reasons_are_stable_snake_case():
    assert reason_of(pynvml.NVMLError_ResetRequired()) == "reset_required"
    assert reason_of(pynvml.NVMLError_GpuIsLost()) == "gpu_lost"
    assert reason_of(pynvml.NVMLError_Unknown()) == "unknown_error"
    assert reason_of(pynvml.NVMLLibraryMismatchError("x")) == "library_mismatch"


def test_mig_instances_have_their_own_activity_and_hidden_instances_are_reported():
    from types import SimpleNamespace

    def mig(n, gi):
        return {"uuid": f"MIG-{n}", "gi": gi, "ci": 0, "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                "mem": SimpleNamespace(used=n * 2**30, free=(40 - n) * 2**30, total=40 * 2**30),
                "gpm": {pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: 10.0 * n, pynvml.NVML_GPM_METRIC_SM_UTIL: 5.0 * n}}

    n = Node(2, mig_mode=(1, 1))
    n.fake.devices[0]["mig"] = [mig(1, 1), mig(2, 2)]
    try:
        n.sample()
        n.sample()
        assert n.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-2") == 0.2
        assert n.v("fleetscope_gpu_mig_sm_activity_ratio", 0, mig_uuid="MIG-1") == 0.05
        live = len(n.fake.gpm_live)
        for _ in range(3):
            n.sample()
        assert len(n.fake.gpm_live) == live  # per-instance buffers are reused, not allocated per sample
        # Under the unit's DynamicUser the driver may refuse the instances: said, not silently empty.
        n.fake.fail("nvmlDeviceGetMigDeviceHandleByIndex", pynvml.NVMLError_NoPermission, gpu=1)
        n.fake.devices[1]["mig"] = [mig(3, 1)]
        n.sample()
        assert n.v("fleetscope_gpu_data_hidden", 1, data="mig_instances", reason="no_permission") == 1
    finally:
        n.close()


@pytest.mark.parametrize("function", ["nvmlDeviceGetCount", "nvmlEventSetWait_v2", "nvmlDeviceGetHandleByIndex",
                                      "nvmlDeviceGetUUID", "nvmlDeviceGetFieldValues", "nvmlGpmMetricsGet"])
def test_the_library_mismatch_error_escapes_no_handler(node, function):
    """NVMLLibraryMismatchError is not an NVMLError: wherever it is raised, the agent carries on."""
    node.fake.fail(function, pynvml.NVMLLibraryMismatchError("Unversioned function called"), gpu=None if function == "nvmlDeviceGetCount" else 2)
    node.sample()
    node.sample()
    assert node.collector.render()
    if function == "nvmlDeviceGetCount":
        assert node.v("fleetscope_agent_source_error", source="gpu") == 1
    else:
        assert node.v("fleetscope_gpu_up", 3) == 1
        assert node.v("fleetscope_gpus_present") >= 7
