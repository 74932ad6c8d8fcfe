"""The GPU source's readings are built when a snapshot is first read (a scrape), not at every sample: a snapshot
read late must still hold its own sample's values, and a sample nobody reads builds none."""

from __future__ import annotations

import pynvml

from agent.exporter import AgentCollector
from agent.frames import host_frame
from agent.gpu.nvml import Nvml
from agent.sampler import Sampler
from agent.sources.gpu import GpuSource
from tests.agent.fake_pynvml import FakeNvml, device


class Node:
    """Two fake GPUs, one thermally throttled, running a process, on a clock the test moves."""

    def __init__(self) -> None:
        self.t = [1000.0]
        self.workload = {4242: ("", "")}
        self.fake = FakeNvml([device(i, clock_events=0x40) for i in range(2)])
        source = GpuSource(backend=Nvml(self.fake, clock=lambda: self.t[0]), expected_gpus=2, clock=lambda: self.t[0],
                           workload_lookup=self.workload.get)
        self.sampler = Sampler([source])
        self.collector = AgentCollector(self.sampler)

    def sample(self, *, fail_temperature: bool = False, job: tuple[str, str] = ("", "")):
        self.t[0] += 5.0
        self.workload[4242] = job
        if fail_temperature:
            self.fake.fail("nvmlDeviceGetTemperature", pynvml.NVMLError_Unknown, gpu=0, times=1)
        return self.sampler.sample_once()


def values(snapshot) -> dict:
    return {(r.name, r.labels): r.value for r in snapshot.readings}


def test_a_snapshot_read_after_later_samples_holds_its_own_sample_values():
    eager, late = Node(), Node()
    plan = [{}, {"fail_temperature": True, "job": ("llm", "3")}, {"job": ("other", "0")}]
    eager_snapshots, late_snapshots = [], []
    for step in plan:
        snap = eager.sample(**step)
        values(snap)  # built at once, at its sample
        eager_snapshots.append(snap)
        late_snapshots.append(late.sample(**step))  # not read until every sample has run
    for eager_snap, late_snap in zip(eager_snapshots, late_snapshots):
        assert values(late_snap) == values(eager_snap)

    # ...and what they hold did change from sample to sample, so a late build reading live state would differ.
    first, last = values(eager_snapshots[0]), values(eager_snapshots[-1])
    key = ("fleetscope_gpu_clock_event_seconds_total", (("gpu", "0"), ("uuid", "GPU-fake-0"), ("reason", "hw_thermal_slowdown")))
    assert (first[key], last[key]) == (0.0, 10.0)  # the first sample has no interval before it
    errors = ("fleetscope_gpu_nvml_errors_total",
              (("gpu", "0"), ("uuid", "GPU-fake-0"), ("call", "nvmlDeviceGetTemperature"), ("reason", "unknown_error")))
    assert errors not in first and last[errors] == 1.0
    jobs = {dict(labels)["training_job"] for (name, labels) in last if name == "fleetscope_gpu_process_memory_used_bytes"}
    assert jobs == {"other"}
    assert {dict(labels)["training_job"] for (name, labels) in values(late_snapshots[1])
            if name == "fleetscope_gpu_process_memory_used_bytes"} == {"llm"}


def test_a_sample_nobody_scrapes_builds_no_gpu_readings_and_a_scrape_builds_them_once():
    node = Node()
    frames = []
    node.sampler.subscribe(lambda snap: frames.append(host_frame(snap, "n1")))  # what the shipper does at each sample
    snap = node.sample()
    assert len(frames[0].gpus) == 2 and frames[0].gpus[0].temperature_celsius == 71.0
    assert not snap._readings.built  # the frame needs the GPU states, not the series

    text = node.collector.render()
    assert snap._readings.built
    assert b'fleetscope_gpu_temperature_celsius{gpu="0",uuid="GPU-fake-0"} 71.0' in text
    assert snap.readings is snap.readings  # built once, then kept with the snapshot
