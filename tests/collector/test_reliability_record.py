"""The reliability record (GET /v1/gpus/{uuid}/history, /v1/nodes/{node}/history) field by field, through the API:
ECC counts (an agent restart and driver reload in the range, where the counters drop), row remapping pending then
failed, time unhealthy, degraded, off the bus and throttled, XIDs by code, and when each happened; from the hot
tier's raw frames, and from the warm tier's minute and hour rollups once the range is older than the hot tier."""

from __future__ import annotations

import shutil
import time

import polars as pl
import pytest
from fastapi.testclient import TestClient

from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready

from collector import history, partitions
from collector.api import create_app

EVERY = 10.0  # seconds between an agent's samples
MIN = 60.0
NODE = "node-0"


def _times():
    """S: the scenario's start, on an hour, 3 to 4 hours ago (hour rollups of whole hours); E: its last sample,
    30 s ago; the late stretch (degraded, thermal throttling) is [L, L + 300 s), within the last ten minutes."""
    now = time.time()
    start = (now - 3 * 3600) // 3600 * 3600
    end = start + (now - 30 - start) // EVERY * EVERY
    return start, end, end - 400


class Scenario:
    """GPU-a of node-0, minute by minute from S (see the expected record in `expected`):
    0-5 power cap; 15 ECC corrected +3 (lifetime 100 -> 103); 20 XID 79 and off the bus until 30; 40 corrected +2;
    50 XID 48, uncorrected +1, row remap pending, unhealthy until 70; 55 XID 48, uncorrected +1;
    70 the agent restarts after a driver reload: XID counts start again from none, the ECC counters (volatile)
    from 0, corrected already 1 at the first sample; 90 corrected +4; 100 XID 31; 110 uncorrected +1,
    remap failure, unhealthy until 125; late: degraded with thermal slowdown for 300 s.
    GPU-b: healthy all along, lifetime ECC corrected 7 before and after the restart, nothing else."""

    def __init__(self):
        self.start, self.end, self.late = _times()
        self.restart = self.start + 70 * MIN

    def at(self, m: float) -> float:
        return self.start + m * MIN

    def gpu_a(self, t: float) -> dict:
        m = (t - self.start) / MIN
        g: dict = {"index": 0, "uuid": "GPU-a", "utilization_ratio": 0.9, "temperature_celsius": 60.0,
                   "health": "healthy", "clock_event_mask": 0}
        if t < self.restart:
            xids = {**({"79": 1} if m >= 20 else {}), **({"48": 1 + (m >= 55)} if m >= 50 else {})}
            corrected = 100 + 3 * (m >= 15) + 2 * (m >= 40)
            uncorrected = (m >= 50) + (m >= 55)
            pending, failure = m >= 50, False
        else:
            xids = {"31": 1} if m >= 100 else {}
            corrected = 1 + 4 * (m >= 90)
            uncorrected = int(m >= 110)
            pending, failure = False, 110 <= m < 125
        g.update(xid_counts=xids, xid_total=sum(xids.values()), ecc_corrected_total=int(corrected),
                 ecc_uncorrected_total=int(uncorrected), remap_pending=pending, remap_failure=failure)
        if m < 5:
            g["clock_event_mask"] = 0x4  # sw_power_cap
        if 20 <= m < 30:  # off the bus: NVML answers nothing but that it is gone
            for k in ("utilization_ratio", "temperature_celsius", "clock_event_mask", "ecc_corrected_total",
                      "ecc_uncorrected_total", "remap_pending", "remap_failure"):
                g.pop(k)
            g.update(up=False, health="unhealthy", health_reasons=["gpu_lost"])
        elif 50 <= m < 70:
            g.update(health="unhealthy", health_reasons=["xid_48", "ecc_uncorrected", "row_remap_pending"])
        elif 110 <= m < 125:
            g.update(health="unhealthy", health_reasons=["row_remap_failed"])
        elif self.late <= t < self.late + 300:
            g.update(health="degraded", health_reasons=["sw_thermal_slowdown"], clock_event_mask=0x20)
        return g

    def gpu_b(self, t: float) -> dict:
        return {"index": 1, "uuid": "GPU-b", "utilization_ratio": 0.5, "health": "healthy", "ecc_corrected_total": 7,
                "ecc_uncorrected_total": 0, "remap_pending": False, "remap_failure": False}

    def frames(self) -> list[dict]:
        out, t = [], self.start
        while t <= self.end:
            out.append({"v": 1, "kind": "host", "node": NODE, "ts": t, "cpu_utilization_ratio": 0.5,
                        "gpus": [self.gpu_a(t), self.gpu_b(t)]})
            t += EVERY
        return out

    def post(self, client) -> None:
        frames = self.frames()
        for seq, i in enumerate(range(0, len(frames), 200)):
            resp = post(client, batch(seq, frames=frames[i:i + 200]))
            assert resp.status_code == 200 and resp.json()["frames"] == len(frames[i:i + 200]), resp.text

    def expected(self) -> dict:
        """GPU-a's record, and when each kind of event was first and last seen (the sample's time)."""
        at, late = self.at, self.late
        return {
            "uuid": "GPU-a", "node": NODE, "index": 0, "from_ts": self.start, "to_ts": self.end,
            "observed_seconds": self.end - self.start + EVERY,
            "xids_by_code": {"31": 1, "48": 2, "79": 1}, "xids_total": 4,
            "ecc_corrected": 3 + 2 + 1 + 4,  # the restart's drop (105 -> 1) counts as 1 new, not as -104
            "ecc_uncorrected": 3,
            "row_remap_pending_seen": True, "row_remap_failure_seen": True,
            "throttle_seconds": {"thermal_slowdown": 300.0, "power_cap": 300.0, "hw_slowdown": 0.0},
            "unhealthy_seconds": (10 + 20 + 15) * MIN, "degraded_seconds": 300.0, "lost_seconds": 10 * MIN,
            "health_reasons_seen": sorted({"gpu_lost", "xid_48", "ecc_uncorrected", "row_remap_pending",
                                           "row_remap_failed", "sw_thermal_slowdown"}),
            "when": {
                "xids_by_code": {"31": span(at(100), at(100)), "48": span(at(50), at(55)), "79": span(at(20), at(20))},
                "ecc_corrected": span(at(15), at(90)),
                "ecc_uncorrected": span(at(50), at(110)),
                "row_remap_pending": span(at(50), self.restart - EVERY),
                "row_remap_failure": span(at(110), at(125) - EVERY),
                "unhealthy": span(at(20), at(125) - EVERY),
                "degraded": span(late, late + 300 - EVERY),
                "lost": span(at(20), at(30) - EVERY),
                "throttle": {"thermal_slowdown": span(late, late + 300 - EVERY),
                             "power_cap": span(at(0), at(5) - EVERY), "hw_slowdown": None},
            },
        }


def span(first: float, last: float) -> dict:
    return {"first_ts": first, "last_ts": last}


QUIET_WHEN = {"xids_by_code": {}, "ecc_corrected": None, "ecc_uncorrected": None, "row_remap_pending": None,
              "row_remap_failure": None, "unhealthy": None, "degraded": None, "lost": None,
              "throttle": {"thermal_slowdown": None, "power_cap": None, "hw_slowdown": None}}


def check_record(got: dict, want: dict, seconds: float, when: float) -> None:
    """Every field of the record: counts exactly, seconds within `seconds`, times of events within `when`
    (a sample period: a raw frame's, a minute's or an hour's)."""
    assert set(got) == set(want), set(got) ^ set(want)
    for key in ("uuid", "node", "index", "xids_by_code", "xids_total", "ecc_corrected", "ecc_uncorrected",
                "row_remap_pending_seen", "row_remap_failure_seen", "health_reasons_seen"):
        assert got[key] == want[key], key
    for key in ("observed_seconds", "unhealthy_seconds", "degraded_seconds", "lost_seconds"):
        assert got[key] == pytest.approx(want[key], abs=seconds), key
    for reason, value in want["throttle_seconds"].items():
        assert got["throttle_seconds"][reason] == pytest.approx(value, abs=seconds), reason
    assert set(got["throttle_seconds"]) == set(want["throttle_seconds"])
    assert got["from_ts"] == pytest.approx(want["from_ts"], abs=when)
    assert got["to_ts"] == pytest.approx(want["to_ts"], abs=when)
    check_when(got["when"], want["when"], when)


def check_when(got: dict, want: dict, when: float) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for key, value in want.items():
        if key in ("xids_by_code", "throttle"):
            assert set(got[key]) == set(value), key
            for sub, s in value.items():
                check_span(got[key][sub], s, when, f"{key}.{sub}")
        else:
            check_span(got[key], value, when, key)


def check_span(got: dict | None, want: dict | None, when: float, what: str) -> None:
    if want is None:
        assert got is None, what
        return
    assert got is not None, what
    assert set(got) == {"first_ts", "last_ts"}, what
    # A rollup's time is the start of its minute or hour: never after the event, at most its span before.
    assert want["first_ts"] - when <= got["first_ts"] <= want["first_ts"] + 1e-6, (what, got, want)
    assert want["last_ts"] - when <= got["last_ts"] <= want["last_ts"] + 1e-6, (what, got, want)


def quiet_b(record: dict, scenario: Scenario, seconds: float) -> None:
    assert record["uuid"] == "GPU-b" and record["index"] == 1
    assert record["xids_by_code"] == {} and record["xids_total"] == 0
    assert record["ecc_corrected"] == 0 and record["ecc_uncorrected"] == 0  # 7 all along, the restart included
    assert record["row_remap_pending_seen"] is False and record["row_remap_failure_seen"] is False
    assert record["unhealthy_seconds"] == record["degraded_seconds"] == record["lost_seconds"] == 0
    assert record["throttle_seconds"] == {"thermal_slowdown": 0, "power_cap": 0, "hw_slowdown": 0}
    assert record["observed_seconds"] == pytest.approx(scenario.end - scenario.start + EVERY, abs=seconds)
    assert record["health_reasons_seen"] == []
    assert record["when"] == QUIET_WHEN


def node_totals(totals: dict, want: dict, seconds: float) -> None:
    assert totals["xids_by_code"] == want["xids_by_code"] and totals["xids_total"] == want["xids_total"]
    assert totals["ecc_corrected"] == want["ecc_corrected"] and totals["ecc_uncorrected"] == want["ecc_uncorrected"]
    assert totals["unhealthy_seconds"] == pytest.approx(want["unhealthy_seconds"], abs=seconds)
    for reason, value in want["throttle_seconds"].items():
        assert totals["throttle_seconds"][reason] == pytest.approx(value, abs=seconds)


def test_the_record_from_the_hot_tiers_raw_frames(tmp_path):
    """All of the range raw in the hot tier: every field within one sample period (10 s)."""
    scenario = Scenario()
    s = settings(tmp_path, window_s=5 * 3600, raw_window_s=5 * 3600)
    app = create_app(s)
    with TestClient(app) as c:
        wait_ready(c)
        scenario.post(c)
        app.state.store.maintain_hot()
        assert app.state.store.hot.complete_since("gpus") < scenario.start  # the hot tier serves all of it
        want = scenario.expected()
        q = {"since": scenario.start, "until": time.time()}
        body = c.get("/v1/gpus/GPU-a/history", params=q, headers=R).json()
        check_record(body["record"], want, seconds=EVERY, when=EVERY)
        node = c.get(f"/v1/nodes/{NODE}/history", params=q, headers=R).json()
        a, b = node["gpus"]
        check_record(a, want, seconds=EVERY, when=EVERY)
        quiet_b(b, scenario, seconds=EVERY)
        node_totals(node["totals"], want, seconds=EVERY)
        quiet_b(c.get("/v1/gpus/GPU-b/history", params=q, headers=R).json()["record"], scenario, seconds=EVERY)


def test_the_record_past_the_hot_tier_from_minute_and_hour_rollups(tmp_path):
    """The hot tier holds its last 15 minutes (2 raw): the rest of the range is read from the warm tier, per
    minute for one GPU's history, per hour for a node's (each within its span), the late stretch from the hot tier."""
    scenario = Scenario()
    app = create_app(settings(tmp_path, window_s=900, raw_window_s=120))
    with TestClient(app) as c:
        wait_ready(c)
        scenario.post(c)
        store = app.state.store
        store.maintain_hot()
        store.checkpoint()
        hot_from = store.hot.complete_since("gpus")
        assert scenario.at(125) < hot_from < scenario.late  # events in the warm tier, the late stretch in the hot
        # A node's record over hours reads hour rollups (the restart's hour among them). Each keeps its counters' first
        # value and increase within the hour: the first hour needs no minute rollup for a starting point (rows written
        # before they were kept do: tests/collector/test_rollup_counters.py)
        until = time.time()
        rows = history.samples(store, "gpus", scenario.start, until, ("node", [NODE]), max_points=3)
        hours = rows.filter(pl.col("span_s") == 3600)
        assert hours["ts"].to_list()[:4] == [scenario.start] * 2 + [scenario.at(60)] * 2
        assert hours["xid_total_within"].null_count() == 0
        assert rows.filter((pl.col("ts") == scenario.start) & (pl.col("span_s") == 60)).height == 0
        want = scenario.expected()
        q = {"since": scenario.start, "until": until}
        body = c.get("/v1/gpus/GPU-a/history", params=q, headers=R).json()
        check_record(body["record"], want, seconds=EVERY, when=MIN)
        node = c.get(f"/v1/nodes/{NODE}/history", params=q, headers=R).json()
        a, b = node["gpus"]
        check_record(a, want, seconds=EVERY, when=3600)
        quiet_b(b, scenario, seconds=EVERY)
        node_totals(node["totals"], want, seconds=EVERY)
        quiet_b(c.get("/v1/gpus/GPU-b/history", params=q, headers=R).json()["record"], scenario, seconds=EVERY)
        # Retention by size can leave a day's hour rollups where the minute rollups of its first hours are gone: the
        # range's first hour is then its hour rollup alone, which counts its whole hour
        shutil.rmtree(tmp_path / "data" / "kind=gpus_1m" / partitions.hour_of(scenario.start))
        (a, _) = c.get(f"/v1/nodes/{NODE}/history", params={**q, "until": until + 1}, headers=R).json()["gpus"]
        for key in ("observed_seconds", "unhealthy_seconds", "lost_seconds"):
            assert a[key] == pytest.approx(want[key], abs=EVERY), key
        assert (a["xids_by_code"], a["ecc_corrected"], a["ecc_uncorrected"]) == (want["xids_by_code"], 10, 3)


def frame(t: float, gpu: dict) -> dict:
    return {"v": 1, "kind": "host", "node": NODE, "ts": t, "gpus": [{"index": 0, "uuid": "GPU-a", **gpu}]}


def test_a_minute_whose_frames_came_in_two_parts_counts_once(tmp_path):
    """A minute rolled up before its last frames came (an agent that caught up after an outage) has two rollup rows
    of the same time. The record merges them: its time is the whole minute, not the later part's share of it,
    and its counters neither drop nor count twice, in whichever order the rows come."""
    app = create_app(settings(tmp_path, window_s=3600, raw_window_s=120))
    with TestClient(app) as c:
        wait_ready(c)
        now = time.time()
        m = (now - 1200) // MIN * MIN  # the split minute, 20 minutes ago
        start, end = m - 10 * MIN, m + 10 * MIN

        def gpu(t: float) -> dict:
            hit = t >= m + 40  # an XID 79 and an uncorrected ECC error 40 s into the minute
            return {"health": "unhealthy" if m <= t < m + MIN else "healthy", "ecc_corrected_total": 5000,
                    "ecc_uncorrected_total": 20 + hit, "xid_counts": {"79": 1} if hit else {}, "xid_total": int(hit)}

        times = [start + i * EVERY for i in range(int((end - start) / EVERY))]
        first = [frame(t, gpu(t)) for t in times if t < m + 30]
        late = [frame(t, gpu(t)) for t in times if t >= m + 30]
        assert post(c, batch(0, frames=first)).status_code == 200
        app.state.store.maintain_hot()
        assert post(c, batch(1, frames=late)).status_code == 200
        app.state.store.maintain_hot()
        rows = history.samples(app.state.store, "gpus", start, now, ("uuid", ["GPU-a"]))
        assert rows.filter(rows["ts"] == m).height == 2  # the minute has two rollup rows: the case under test
        record = c.get("/v1/gpus/GPU-a/history", params={"since": start, "until": now}, headers=R).json()["record"]
        assert record["unhealthy_seconds"] == pytest.approx(MIN, abs=EVERY)
        assert record["observed_seconds"] == pytest.approx(end - start, abs=EVERY)
        assert (record["ecc_corrected"], record["ecc_uncorrected"]) == (0, 1)
        assert record["xids_by_code"] == {"79": 1} and record["xids_total"] == 1
        assert record["when"]["ecc_uncorrected"] == record["when"]["xids_by_code"]["79"] == span(m, m)
        assert record["when"]["unhealthy"] == span(m, m)


def test_xids_before_an_agent_restart_within_an_hour_are_in_a_nodes_record(tmp_path):
    app = create_app(settings(tmp_path, window_s=900, raw_window_s=120))
    with TestClient(app) as c:
        wait_ready(c)
        now = time.time()
        start = (now - 3 * 3600) // 3600 * 3600
        hour = start + 3600  # the range's second hour: read from its hour rollup
        times = [start + i * EVERY for i in range(int((now - 60 - start) / EVERY))]
        # XID 79 at 10 past, the node rebooted at 40 past: the new agent counts from none, an XID 31 at 50 past
        def xids(t: float) -> dict:
            return {"79": 1} if hour + 600 <= t < hour + 2400 else {"31": 1} if hour + 3000 <= t else {}

        frames = [frame(t, {"xid_counts": xids(t), "xid_total": sum(xids(t).values())}) for t in times]
        for seq, i in enumerate(range(0, len(frames), 300)):
            assert post(c, batch(seq, frames=frames[i:i + 300])).status_code == 200
        app.state.store.maintain_hot()
        app.state.store.checkpoint()
        q = {"since": start, "until": now}
        gpu = c.get("/v1/gpus/GPU-a/history", params=q, headers=R).json()["record"]
        assert (gpu["xids_by_code"], gpu["xids_total"]) == ({"31": 1, "79": 1}, 2)  # per minute
        node = c.get(f"/v1/nodes/{NODE}/history", params=q, headers=R).json()["gpus"][0]
        assert (node["xids_by_code"], node["xids_total"]) == ({"31": 1, "79": 1}, 2)  # per hour: {"31": 1}, 1
