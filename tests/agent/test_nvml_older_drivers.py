"""Drivers older than the binding: what such a driver lacks is "this driver does not have it", never a false
verdict or a standing source error; and an acquisition that fails half-way gives back what it took.

Through the strict fake (tests/agent/fake_pynvml.py): `lacks` makes a function raise NVMLError_FunctionNotFound on a
GPU as pynvml does when the driver has no such symbol, `fields_unsupported` leaves field ids out of the field-value
batch, `fabric_versions` are the struct versions nvmlDeviceGetGpuFabricInfoV takes.
"""

from __future__ import annotations

import logging

import pynvml
import pytest

from agent.gpu.nvml import COUNTERS_REFRESH_S
from tests.agent.fake_pynvml import NotSupported
from tests.agent.test_nvml_faults import Node

STATE_FIELD = pynvml.NVML_FI_DEV_NVLINK_GET_STATE  # 165: not in the field-value batch of older drivers
FABRIC_V, FABRIC_OLD = "nvmlDeviceGetGpuFabricInfoV", "nvmlDeviceGetGpuFabricInfo"
EVENTS, THROTTLE = "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"


def health(n: Node, gpu: int) -> str:
    return next(s for s in ("healthy", "degraded", "unhealthy") if n.v("fleetscope_gpu_health", gpu, state=s) == 1)


def fabric(n: Node, gpu: int, health: str = "") -> float | None:
    return n.v("fleetscope_gpu_fabric_info", gpu, state="completed", status="success", clique_id="7", health=health)


def counters_read(n: Node) -> None:
    """A sample after the health counters (and the fabric state, read with them) are due again."""
    n.t[0] += COUNTERS_REFRESH_S
    n.sample()


@pytest.fixture
def nodes():
    made = []

    def make(*args, **kwargs) -> Node:
        made.append(Node(*args, **kwargs))
        return made[-1]

    yield make
    for n in made:
        n.close()


# -- 1. NVLink state field missing --------------------------------------------------------------------
def test_a_driver_without_the_nvlink_state_field_reads_the_state_per_link_and_does_not_call_links_down(nodes):
    n = nodes(3)
    n.fake.devices[1]["fields_unsupported"] = frozenset({STATE_FIELD})
    n.fake.devices[2]["fields_unsupported"] = frozenset({STATE_FIELD})
    n.fake.devices[2]["nvlinks"] = [False] * 18  # a real outage on such a driver is still seen
    n.sample()
    n.sample()
    before = n.fake.counts["nvmlDeviceGetNvLinkState"]
    n.sample()
    assert health(n, 1) == "healthy"
    assert n.v("fleetscope_gpu_health_reason", 1, reason="nvlink_all_down") is None
    assert n.v("fleetscope_gpu_nvlink_up", 1, link="0") == 1
    assert n.v("fleetscope_gpu_nvlink_up", 1, link="17") == 1
    assert n.v("fleetscope_gpu_nvlink_transmit_bytes_total", 1, link="17") == 18000 * 1024
    assert n.v("fleetscope_gpu_health_reason", 2, reason="nvlink_all_down") == 1
    assert n.v("fleetscope_gpu_nvlink_up", 2, link="3") == 0
    assert health(n, 0) == "healthy"
    # half the links of each of the two GPUs without the field at every sample; none for the GPU that has it
    assert n.fake.counts["nvmlDeviceGetNvLinkState"] - before == 2 * 9


def test_on_such_a_driver_links_that_go_down_are_seen_within_two_samples(nodes):
    n = nodes(1, fields_unsupported=frozenset({STATE_FIELD}))
    n.sample()
    n.sample()
    assert health(n, 0) == "healthy"
    n.fake.devices[0]["nvlinks"] = [False] * 18  # the fabric manager stopped
    n.sample()
    n.sample()
    assert n.v("fleetscope_gpu_health_reason", 0, reason="nvlink_all_down") == 1
    assert n.v("fleetscope_gpu_nvlink_up", 0, link="0") == 0 and n.v("fleetscope_gpu_nvlink_up", 0, link="17") == 0
    n.fake.devices[0]["nvlinks"] = [True] * 18
    n.sample()
    n.sample()
    assert health(n, 0) == "healthy"


def test_a_link_whose_state_neither_the_field_nor_the_call_gives_is_left_out_not_down(nodes):
    n = nodes(1, fields_unsupported=frozenset({STATE_FIELD}))
    n.fake.fail("nvmlDeviceGetNvLinkState", pynvml.NVMLError_NotSupported)
    n.sample()
    n.sample()
    assert health(n, 0) == "healthy"
    assert n.v("fleetscope_gpu_health_reason", 0, reason="nvlink_all_down") is None
    assert n.v("fleetscope_gpu_nvlink_up", 0, link="0") is None
    assert n.fake.counts["nvmlDeviceGetNvLinkState"] == 18  # NotSupported per link: asked once per handle


def test_an_18_link_gpu_on_such_a_driver_stays_within_the_call_budget(nodes):
    n = nodes(8, fields_unsupported=frozenset({STATE_FIELD}))
    n.sample()
    n.sample()
    before = n.fake.counts.copy()
    for _ in range(5):
        n.sample()
    calls = n.fake.counts - before
    assert sum(calls.values()) / 5 / 8 <= 40, calls


# -- 2. fabric info and clock events on older drivers -------------------------------------------------
def test_fabric_info_on_driver_535_comes_from_the_older_call_without_a_source_error(nodes, caplog):
    n = nodes(2, lacks=frozenset({FABRIC_V}))  # R535: FabricInfoV arrived with 550
    with caplog.at_level(logging.INFO, logger="fleetscope.agent.nvml"):
        for _ in range(3):
            counters_read(n)
    assert n.v("fleetscope_agent_source_error", source="gpu") == 0
    assert n.v("fleetscope_agent_source_problem", source="gpu", problem="function_not_found") is None
    assert n.sampler.latest.status["gpu"].problems == ()
    assert fabric(n, 0) == 1 and fabric(n, 1) == 1  # the older struct has no health summary
    assert health(n, 0) == "healthy"
    assert n.fake.counts[FABRIC_V] == 2  # once per handle
    assert n.fake.counts[FABRIC_OLD] == 6  # once per GPU at each of the three reads
    said = [r for r in caplog.records if FABRIC_V in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_a_fabric_not_ready_is_still_seen_through_the_older_call(nodes):
    n = nodes(1, lacks=frozenset({FABRIC_V}), fabric=(pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS, 0, 0, 0, 0))
    n.sample()
    assert n.v("fleetscope_gpu_health_reason", 0, reason="fabric_not_ready") == 1


def test_a_fabric_struct_the_driver_refuses_steps_down_once_per_handle(nodes):
    n = nodes(2, fabric_versions=(pynvml.nvmlGpuFabricInfo_v2,))  # R550: no v3 struct (health summary) yet
    for _ in range(3):
        counters_read(n)
    assert fabric(n, 0) == 1  # v2 has the health mask, not the summary
    assert n.v("fleetscope_agent_source_error", source="gpu") == 0
    assert n.fake.counts[FABRIC_V] == 2 * (2 + 1 + 1)  # v3 refused once, then v2 at every read
    assert n.fake.counts[FABRIC_OLD] == 0


def test_a_driver_that_refuses_every_fabric_struct_falls_back_to_the_older_call(nodes):
    n = nodes(1, fabric_versions=())
    for _ in range(3):
        counters_read(n)
    assert fabric(n, 0) == 1
    assert n.fake.counts[FABRIC_V] == 2 and n.fake.counts[FABRIC_OLD] == 3


def test_a_driver_with_no_way_to_read_the_fabric_stops_asking_and_is_no_source_error(nodes):
    n = nodes(1, lacks=frozenset({FABRIC_V, FABRIC_OLD}))
    for _ in range(3):
        n.sample()
    assert n.v("fleetscope_agent_source_error", source="gpu") == 0
    assert n.fake.counts[FABRIC_V] == 1 and n.fake.counts[FABRIC_OLD] == 1
    assert health(n, 0) == "healthy"


def test_pcie_only_gpus_on_driver_535_ask_for_the_fabric_once(nodes):
    n = nodes(1, lacks=frozenset({FABRIC_V}), nvlinks=NotSupported, fabric=NotSupported)
    for _ in range(3):
        n.sample()
    assert n.fake.counts[FABRIC_V] == 1 and n.fake.counts[FABRIC_OLD] == 1


def test_clock_events_before_driver_535_come_from_the_throttle_reasons_call(nodes, caplog):
    n = nodes(2, lacks=frozenset({EVENTS}))
    n.fake.devices[1]["clock_events"] = pynvml.nvmlClocksEventReasonHwThermalSlowdown
    with caplog.at_level(logging.INFO, logger="fleetscope.agent.nvml"):
        for _ in range(3):
            n.sample()
    assert n.v("fleetscope_agent_source_error", source="gpu") == 0
    assert n.v("fleetscope_gpu_clock_event_active", 1, reason="hw_thermal_slowdown") == 1
    assert n.v("fleetscope_gpu_clock_event_active", 0, reason="hw_thermal_slowdown") == 0
    assert n.fake.counts[EVENTS] == 2 and n.fake.counts[THROTTLE] == 6
    said = [r for r in caplog.records if EVENTS in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


@pytest.mark.parametrize("lacks", [frozenset({EVENTS, THROTTLE}), frozenset({"nvmlDeviceGetEnforcedPowerLimit"}),
                                   frozenset({"nvmlDeviceGetFieldValues"})],
                         ids=["both_clock_calls", "power_limit", "field_values"])
def test_a_function_every_supported_driver_has_is_still_a_source_error_when_missing(nodes, lacks):
    n = nodes(2, lacks=lacks)
    n.sample()
    n.sample()
    assert n.v("fleetscope_agent_source_error", source="gpu") == 1
    assert n.v("fleetscope_agent_source_problem", source="gpu", problem="function_not_found") == 1
    assert n.v("fleetscope_gpu_up", 1) == 1


def test_a_current_driver_pays_nothing_for_the_fallbacks(nodes):
    n = nodes(8)
    n.sample()
    before = n.fake.counts.copy()
    for _ in range(3):
        counters_read(n)
    calls = n.fake.counts - before
    assert calls[FABRIC_V] == 24 and calls[EVENTS] == 24
    assert calls[FABRIC_OLD] == calls[THROTTLE] == calls["nvmlDeviceGetNvLinkState"] == 0
    assert fabric(n, 0, health="healthy") == 1


# -- 3. a failed acquisition gives back its GPM buffers -------------------------------------------------
@pytest.mark.parametrize("error", [pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired])
def test_an_acquisition_that_fails_after_the_gpm_buffers_frees_them(nodes, error):
    n = nodes(2)
    n.fake.fail("nvmlDeviceGetFieldValues", error, gpu=1)  # a static read after the GPM allocation
    for _ in range(5):
        n.sample()
    assert n.v("fleetscope_gpu_up", 1) == 0
    assert n.fake.gpm_allocs == 2 + 5 * 2
    assert len(n.fake.gpm_live) == 2  # GPU 0's two, held while its handle lives
    n.fake.heal()
    n.sample()
    assert n.v("fleetscope_gpu_up", 1) == 1 and len(n.fake.gpm_live) == 4
    n.close()
    assert not n.fake.gpm_live and n.fake.gpm_frees == n.fake.gpm_allocs


def test_nvml_going_away_during_an_acquisition_leaks_no_buffer(nodes):
    n = nodes(2)
    n.fake.fail("nvmlDeviceGetFieldValues", pynvml.NVMLError_Uninitialized, gpu=1, times=1)
    n.sample()
    assert n.v("fleetscope_agent_source_up", source="gpu") == 0
    n.t[0] += 5
    n.sample()
    assert n.v("fleetscope_gpu_up", 1) == 1 and len(n.fake.gpm_live) == 4
    n.close()
    assert not n.fake.gpm_live and n.fake.gpm_frees == n.fake.gpm_allocs


def test_a_gpm_allocation_that_fails_half_way_frees_the_first_buffer(nodes):
    n = nodes(1)
    alloc = n.fake.nvmlGpmSampleAlloc
    calls = [0]

    def second_fails():
        calls[0] += 1
        if calls[0] == 2:
            raise pynvml.NVMLError_Uninitialized()  # the driver went away between the two
        return alloc()

    n.fake.nvmlGpmSampleAlloc = second_fails
    n.sample()
    assert n.v("fleetscope_agent_source_up", source="gpu") == 0
    n.t[0] += 5
    n.sample()
    assert n.v("fleetscope_gpu_up", 0) == 1 and len(n.fake.gpm_live) == 2
    n.close()
    assert not n.fake.gpm_live and n.fake.gpm_frees == n.fake.gpm_allocs
