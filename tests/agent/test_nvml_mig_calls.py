"""MIG instances cost few NVML calls: what cannot change while an instance lives (its handle, UUID, GPU and compute
instance ids, profile) is listed once and kept, and only memory and GPM activity are read at every sample. The list
is made again once every MIG_RELIST_S, at once when a call on an instance's handle fails, when the GPU's MIG mode
changes and when the GPU's handle is acquired again; whatever is held for an instance that went is given back.

Driven through the strict fake (tests/agent/fake_pynvml.py), whose MIG handles raise NotFound once their instance
is destroyed, with GPUs in MIG mode answering what real ones answer (MIG_MODE_UNSUPPORTED).
"""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from agent.gpu.nvml import MIG_RELIST_S
from tests.agent.fake_pynvml import MIG_MODE_UNSUPPORTED, NotSupported, device
from tests.agent.test_nvml_faults import Node

GR, SM = pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, pynvml.NVML_GPM_METRIC_SM_UTIL
# What does not change while an instance lives: not asked in a sample that does not list the instances.
STATIC = ("nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetName",
          "nvmlDeviceGetUUID", "nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId")


def mig(n: int, gi: int, ci: int = 0, profile: str = "1g.10gb") -> dict:
    return {"uuid": f"MIG-{n}", "gi": gi, "ci": ci, "name": f"NVIDIA H100 80GB HBM3 MIG {profile}",
            "mem": SimpleNamespace(used=n * 2**30, free=(10 - n) * 2**30, total=10 * 2**30),
            "gpm": {GR: 10.0 * n, SM: 5.0 * n}}


def mig_node(gpus: int = 2, instances: int = 7) -> Node:
    node = Node(gpus, mig_mode=(1, 1), **MIG_MODE_UNSUPPORTED)
    for d in node.fake.devices:
        d["mig"] = [mig(i + 1, i + 1) for i in range(instances)]
    return node


@pytest.fixture
def node():
    n = mig_node()
    yield n
    n.close()
    assert not n.fake.gpm_live and n.fake.gpm_allocs == n.fake.gpm_frees  # every GPM sample given back


def used(node: Node, gpu: int, mig_uuid: str) -> float | None:
    return node.v("fleetscope_gpu_mig_memory_used_bytes", gpu, mig_uuid=mig_uuid)


def listed(node: Node, gpu: int) -> set[str]:
    state = next(s for s in node.nvml.read() if s.index == gpu)
    return {m.uuid for m in state.mig_instances}


def steady_calls(node: Node, samples: int = 5):
    before = node.fake.counts.copy()
    for _ in range(samples):
        node.sample()
    return node.fake.counts - before


def test_seven_mig_instances_cost_at_most_40_nvml_calls_per_gpu_per_sample(node):
    node.sample()
    node.sample()
    calls = steady_calls(node)
    per_gpu = sum(calls.values()) / 5 / 2
    assert per_gpu <= 40, (per_gpu, calls)  # 79.5 when every instance was listed again at every sample
    for name in STATIC:
        assert calls[name] == 0, name
    # What changes is still read at every sample, per instance: memory and GPM activity.
    assert calls["nvmlDeviceGetMemoryInfo"] == 5 * 2 * (1 + 7)
    assert calls["nvmlGpmMigSampleGet"] == 5 * 2 * 7
    node.fake.devices[0]["mig"][2]["mem"] = SimpleNamespace(used=7 * 2**30, free=3 * 2**30, total=10 * 2**30)
    node.fake.devices[0]["mig"][2]["gpm"] = {GR: 77.0, SM: 66.0}
    node.sample()
    assert used(node, 0, "MIG-3") == 7 * 2**30
    assert node.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-3") == 0.77
    assert node.v("fleetscope_gpu_mig_info", 0, mig_uuid="MIG-3", gpu_instance="3", compute_instance="0",
                  profile="1g.10gb") == 1
    # Once a minute the instances are listed again: a handle and a UUID per instance in that sample (the rest is
    # known by the UUID), none in the next.
    node.t[0] += MIG_RELIST_S
    calls = steady_calls(node, 1)
    assert calls["nvmlDeviceGetMigDeviceHandleByIndex"] == calls["nvmlDeviceGetUUID"] == 2 * 7
    for name in ("nvmlDeviceGetName", "nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId",
                 "nvmlDeviceGetMaxMigDeviceCount"):
        assert calls[name] == 0, name
    assert steady_calls(node, 1)["nvmlDeviceGetMigDeviceHandleByIndex"] == 0


def test_a_destroyed_instance_is_dropped_in_the_next_sample_and_its_gpm_samples_given_back(node):
    node.sample()
    node.sample()
    live, frees = len(node.fake.gpm_live), node.fake.gpm_frees
    node.fake.devices[0]["mig"][2] = None  # MIG-3 (GPU instance 3) destroyed: its handle now answers NotFound
    calls = steady_calls(node, 1)
    assert used(node, 0, "MIG-3") is None
    assert node.v("fleetscope_gpu_mig_info", 0, mig_uuid="MIG-3", gpu_instance="3", compute_instance="0",
                  profile="1g.10gb") is None
    assert {f"MIG-{n}" for n in (1, 2, 4, 5, 6, 7)} == {m for m in listed(node, 0)}
    assert used(node, 0, "MIG-4") == 4 * 2**30
    assert node.v("fleetscope_gpu_up", 0) == 1
    assert calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 7  # GPU 0 listed again, GPU 1 not
    assert node.fake.gpm_frees - frees == 2 and len(node.fake.gpm_live) == live - 2  # GPU instance 3's two samples
    assert steady_calls(node, 1)["nvmlDeviceGetMigDeviceHandleByIndex"] == 0  # listed once, not at every sample


def test_a_new_instance_is_seen_within_the_relisting_period():
    assert MIG_RELIST_S <= 60
    n = mig_node(instances=6)
    try:
        n.sample()
        n.sample()
        n.fake.devices[1]["mig"].append(mig(17, 7, profile="2g.20gb"))
        n.t[0] += MIG_RELIST_S
        n.sample()
        assert used(n, 1, "MIG-17") == 17 * 2**30
        assert n.v("fleetscope_gpu_mig_info", 1, mig_uuid="MIG-17", gpu_instance="7", compute_instance="0",
                   profile="2g.20gb") == 1
        n.sample()
        assert n.v("fleetscope_gpu_mig_sm_activity_ratio", 1, mig_uuid="MIG-17") == 0.85
    finally:
        n.close()
    assert not n.fake.gpm_live


def test_a_mig_gpu_without_instances_is_listed_at_every_sample():
    """Nothing listed (no instance yet, or all hidden): asked again at the next sample, as before the list was kept."""
    n = mig_node(instances=0)
    try:
        n.sample()
        n.fake.devices[0]["mig"] = [mig(1, 1)]
        n.sample()
        assert used(n, 0, "MIG-1") == 2**30
    finally:
        n.close()


def test_a_mig_mode_change_lists_again_frees_the_instances_and_asks_again_what_the_other_mode_refused(node):
    node.sample()
    node.sample()
    assert node.v("fleetscope_gpu_utilization_ratio", 0) is None  # refused in MIG mode, not asked again
    d = node.fake.devices[0]
    d.update(mig_mode=(0, 0), mig=[], **{k: device(0)[k] for k in MIG_MODE_UNSUPPORTED})
    node.sample()
    assert node.v("fleetscope_gpu_mig_enabled", 0) == 0
    assert used(node, 0, "MIG-1") is None
    assert len(node.fake.gpm_live) == 2 + 2 + 2 * 7  # GPU 0: its own two samples; GPU 1: its own and 7 instances'
    node.sample()
    assert node.v("fleetscope_gpu_utilization_ratio", 0) == 0.87  # what MIG mode refused is asked again
    assert node.v("fleetscope_gpu_encoder_utilization_ratio", 0) == 0.0
    d.update(mig_mode=(1, 1), mig=[mig(21, 1, profile="3g.40gb"), mig(22, 2, profile="3g.40gb")])
    node.sample()  # no minute has passed: the mode change alone lists the instances
    assert node.v("fleetscope_gpu_mig_enabled", 0) == 1
    assert used(node, 0, "MIG-22") == 22 * 2**30


def test_a_gpu_acquired_again_lists_its_instances_again(node):
    node.sample()
    node.sample()
    d = node.fake.devices[0]
    d["lost"] = True
    node.sample()
    assert node.v("fleetscope_gpu_up", 0) == 0
    d["lost"], d["mig"] = False, [mig(31, 1), mig(32, 2)]  # reset, and partitioned anew
    node.sample()
    assert node.v("fleetscope_gpu_up", 0) == 1
    assert listed(node, 0) == {"MIG-31", "MIG-32"}
    assert used(node, 0, "MIG-1") is None


def test_an_instance_value_that_failed_when_listed_is_listed_again_at_the_next_sample(node):
    node.sample()
    node.t[0] += MIG_RELIST_S
    node.fake.fail("nvmlDeviceGetUUID", pynvml.NVMLError_Unknown, gpu=0, times=1)
    node.sample()
    assert used(node, 0, "mig-0") == 2**30  # this sample's stand-in name
    node.sample()
    assert used(node, 0, "MIG-1") == 2**30 and used(node, 0, "mig-0") is None


def test_compute_instances_of_one_gpu_instance_share_one_gpm_read_per_sample():
    """GPM activity is per GPU instance: read once per sample for it, not once per compute instance."""
    n = Node(1, mig_mode=(1, 1), **MIG_MODE_UNSUPPORTED)
    n.fake.devices[0]["mig"] = [mig(1, 1, ci=0, profile="1c.7g.80gb"), mig(2, 1, ci=1, profile="1c.7g.80gb")]
    try:
        n.sample()
        calls = steady_calls(n, 3)
        assert calls["nvmlGpmMigSampleGet"] == 3
        assert n.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-1") == 0.1
        assert n.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-2") == 0.1
    finally:
        n.close()
    assert not n.fake.gpm_live


def test_instances_coming_and_going_leak_no_gpm_samples(node):
    node.sample()
    for round_ in range(5):
        d = node.fake.devices[round_ % 2]
        d["mig"] = [mig(100 + round_ * 10 + i, (round_ + i) % 7 + 1) for i in range(3)]
        node.t[0] += MIG_RELIST_S
        node.sample()
        node.sample()
        held = sum(len(g.mig_gpm) for g in node.nvml._gpus.values())
        assert held == sum(len({m["gi"] for m in d["mig"] if m}) for d in node.fake.devices)
        assert len(node.fake.gpm_live) == 2 * (2 + held)  # each GPU's own two, and two per GPU instance


def test_a_gpu_instance_made_anew_under_the_same_id_starts_its_activity_over(node):
    node.sample()
    node.sample()
    assert node.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-3") == 0.3
    node.fake.devices[0]["mig"][2] = mig(9, 3)  # GPU instance 3 destroyed and made again, in the same slot
    node.t[0] += MIG_RELIST_S
    node.sample()
    assert used(node, 0, "MIG-9") == 9 * 2**30
    # its previous GPM sample was of the instance that went: no activity until two of the new one are taken
    assert node.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-9") is None
    node.sample()
    assert node.v("fleetscope_gpu_mig_graphics_engine_activity_ratio", 0, mig_uuid="MIG-9") == 0.9


def test_a_value_an_instance_refuses_does_not_make_it_listed_at_every_sample():
    n = mig_node(gpus=1, instances=2)
    for m in n.fake.devices[0]["mig"]:
        m["ci"] = NotSupported
    try:
        n.sample()
        assert steady_calls(n, 3)["nvmlDeviceGetMigDeviceHandleByIndex"] == 0
        assert n.v("fleetscope_gpu_mig_info", 0, mig_uuid="MIG-2", gpu_instance="2", compute_instance="",
                   profile="1g.10gb") == 1
    finally:
        n.close()
