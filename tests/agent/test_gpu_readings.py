"""The GPU source's hot families (XIDs, health, clock events, NVLinks), whose label tuples are made once per GPU
(agent/sources/gpu.py, _LabelSets), hold what each sample's GpuState says: codes outside the catalogue, a GPU
whose labels change, a lost GPU, links with errors."""

from __future__ import annotations

from agent.gpu.health import STATES
from agent.gpu.nvml import Nvml
from agent.gpu.state import CLOCK_EVENT_REASONS
from agent.gpu.xid import CATALOGUE
from agent.sources.base import Reading
from agent.sources.gpu import GpuSource
from tests.agent.fake_pynvml import FakeNvml, device

ERRORS = (("crc_flit_errors", "crc_flit"), ("crc_data_errors", "crc_data"), ("replay_errors", "replay"),
          ("recovery_errors", "recovery"))


def expected(states, health) -> set[Reading]:
    """The hot families' readings, spelled out from the states the plain way."""
    out = set()
    for s in states:
        ids = (("gpu", str(s.index)), ("uuid", s.uuid))
        out.add(Reading("fleetscope_gpu_up", 1.0 if s.up else 0.0, ids))
        for code in sorted(set(CATALOGUE) | set(s.xid_counts or {})) if s.xid_counts is not None else ():
            out.add(Reading("fleetscope_gpu_xid_errors_total", float(s.xid_counts.get(code, 0)), ids + (("xid", str(code)),)))
        for state in STATES:
            out.add(Reading("fleetscope_gpu_health", 1.0 if health[s.uuid].state == state else 0.0, ids + (("state", state),)))
        if not s.up:
            continue
        for link in s.nvlinks:
            lid = ids + (("link", str(link.link)),)
            out.add(Reading("fleetscope_gpu_nvlink_up", 1.0 if link.up else 0.0, lid))
            out.add(Reading("fleetscope_gpu_nvlink_transmit_bytes_total", float(link.tx_bytes), lid))
            out.add(Reading("fleetscope_gpu_nvlink_receive_bytes_total", float(link.rx_bytes), lid))
            for field, kind in ERRORS:
                if getattr(link, field) is not None:
                    out.add(Reading("fleetscope_gpu_nvlink_errors_total", float(getattr(link, field)), lid + (("type", kind),)))
    return out


HOT = ("fleetscope_gpu_up", "fleetscope_gpu_xid_errors_total", "fleetscope_gpu_health", "fleetscope_gpu_nvlink_up",
       "fleetscope_gpu_nvlink_transmit_bytes_total", "fleetscope_gpu_nvlink_receive_bytes_total",
       "fleetscope_gpu_nvlink_errors_total")


def test_hot_families_follow_each_sample_xids_outside_the_catalogue_lost_gpus_and_new_uuids():
    fake = FakeNvml([device(i, nvlink_errors={(3, fake_err): 5}) if i == 1 else device(i)
                     for i, fake_err in ((i, 1) for i in range(4))])
    source = GpuSource(backend=Nvml(fake), expected_gpus=4)
    for step in range(4):
        if step == 1:
            fake.xid(2, 79)
            fake.xid(3, 999)  # not in the catalogue: its own series, in code order
        if step == 2:
            fake.devices[0]["lost"] = True
        if step == 3:
            fake.devices[0]["lost"] = False
            fake.devices[0]["uuid"] = "GPU-fake-replaced"  # a new GPU in the slot: new labels everywhere
        collected = source.collect()
        readings = collected.readings
        assert {r for r in readings if r.name in HOT} == expected(collected.gpus, collected.health)
        assert all(type(r) is Reading and isinstance(r.value, float) for r in readings)
        xids = [r for r in readings if r.name == "fleetscope_gpu_xid_errors_total" and ("gpu", "3") in r.labels]
        codes = [int(dict(r.labels)["xid"]) for r in xids]
        assert codes == sorted(codes)
        assert (999 in codes) == (step >= 1)
    assert any(("uuid", "GPU-fake-replaced") in r.labels for r in readings)


def test_clock_event_series_one_pair_per_reason_with_its_labels():
    fake = FakeNvml([device(0, clock_events=next(iter(CLOCK_EVENT_REASONS)))])
    source = GpuSource(backend=Nvml(fake))
    for _ in range(2):
        readings = source.collect().readings
        active = {dict(r.labels)["reason"]: r.value for r in readings if r.name == "fleetscope_gpu_clock_event_active"}
        seconds = [r for r in readings if r.name == "fleetscope_gpu_clock_event_seconds_total"]
        assert set(active) == set(CLOCK_EVENT_REASONS.values()) and len(seconds) == len(active)
        assert active[CLOCK_EVENT_REASONS[next(iter(CLOCK_EVENT_REASONS))]] == 1.0
        assert sum(active.values()) == 1.0
        assert all(r.labels[:2] == (("gpu", "0"), ("uuid", "GPU-fake-0")) for r in seconds)
