"""GET /v1/services/{service}/series is bounded: at most max_points points per series whatever step_s asks
for; and past the hot tier the service endpoints aggregate inside the warm tier's scans (nothing the size of
the raw rows is collected) with the same figures as a brute-force computation over the same rows."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from collector.api import create_app
from collector.inference import histogram_quantile, server_latency_quantiles, server_overview, server_services
from collector.inference_series import bounded_step
from tests.collector.test_api import R, batch, post, settings
from tests.conftest import wait_ready

LE = [0.1, 0.5, 1.0, 2.0, 1e300]


def requests(model: str, t0: float, t1: float, every: float, seed: int) -> list[dict]:
    """Request events from t0 to t1: latencies in narrow ranges (few 2% buckets), a third queued for 0 s, 5% errors."""
    rng = random.Random(seed)
    out, ts = [], t0
    while ts < t1:
        out.append({"v": 1, "kind": "request", "service": "chat", "model": model, "ts": ts,
                    "e2e_s": rng.uniform(1.0, 1.5), "ttft_s": rng.uniform(0.1, 0.2), "tpot_s": rng.uniform(0.02, 0.03),
                    "queue_s": 0.0 if rng.random() < 0.3 else rng.uniform(0.05, 0.1),
                    "status": "error" if rng.random() < 0.05 else "ok", "output_tokens": rng.randint(1, 200)})
        ts += every
    return out


def server_frames(model: str, server: str, t0: float, t1: float, every: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out, ts = [], t0
    while ts < t1:
        counts = [float(rng.randint(0, 5)) for _ in LE]
        cumulative = list(np.cumsum(counts))
        out.append({"v": 1, "service": "chat", "model": model, "server": server, "kind": "vllm", "ts": ts, "interval_s": every,
                    "node": server.split(":")[0],
                    "histograms": {m: {"le": LE, "counts": cumulative, "sum": cumulative[-1] * 0.7, "count": cumulative[-1]}
                                   for m in ("e2e", "ttft")},
                    "gauges": {"running": float(rng.randint(0, 30)), "waiting": float(rng.randint(0, 5)), "kv_cache": rng.random()},
                    "counters": {"requests_ok": float(rng.randint(10, 20)), "requests_error": float(rng.randint(0, 2)),
                                 "generation_tokens": float(rng.randint(500, 900)), "preemptions": float(rng.randint(0, 1)),
                                 "prefix_cache_queries": 100.0, "prefix_cache_hits": float(rng.randint(0, 100))}})
        ts += every
    return out


def post_all(client, events=(), servers=(), start: int = 0) -> int:
    seq = start
    for i in range(0, max(len(events), len(servers)), 2000):
        body = batch(seq, events[i:i + 2000])
        body["servers"] = list(servers[i:i + 2000])
        assert post(client, body).status_code == 200
        seq += 1
    return seq


def close(got, want, rel=1e-6):
    """Dicts and lists compared key by key, floats approximately."""
    if isinstance(want, dict):
        assert set(got) == set(want), (got, want)
        for k in want:
            close(got[k], want[k], rel)
    elif isinstance(want, list):
        assert len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            close(g, w, rel)
    elif isinstance(want, float) and not math.isnan(want):
        assert got == pytest.approx(want, rel=rel, abs=1e-9)
    else:
        assert got == want


@pytest.mark.parametrize("since,until", [(0.0, 3600.0), (1_700_000_007.3, 1_700_003_600.0), (1_700_000_000.0, 1_702_592_000.0),
                                         (5.5, 5.5), (1_700_000_000.0, 1_700_000_000.5)])
@pytest.mark.parametrize("max_points", [1, 2, 3, 10, 120, 499, 500, 10_000])
def test_the_bucket_width_never_gives_more_than_max_points_buckets(since, until, max_points):
    for asked in (0.5, 1.0, 7.0, 30.0, 86400.0):
        step = bounded_step(since, until, asked, max_points)
        assert math.floor(until / step) - math.floor(since / step) + 1 <= max_points
        if math.floor(until / asked) - math.floor(since / asked) + 1 <= max_points:
            assert step == asked  # a width that fits is kept: a point means what it meant
        else:
            assert step > asked


def test_the_series_honours_max_points_over_a_long_range(tmp_path):
    now = time.time()
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        post_all(client, requests("m", now - 3000, now - 60, 0.5, seed=1))
        for params, most in (({"since": now - 3600, "step_s": 1, "max_points": 10}, 10),
                             ({"since": now - 3600, "step_s": 1}, 500),  # the default max_points
                             ({"since": now - 3600, "until": now, "max_points": 3}, 3)):
            body = client.get("/v1/services/chat/series", params=params, headers=R).json()
            assert 0 < len(body["series"]) <= most, (params, len(body["series"]))
            ts = [p["ts"] for p in body["series"]]
            assert len(ts) == len(set(ts)) and body["step_s"] >= (3600 if "until" in params else now + 1 - params["since"]) / most
            # every request is in one point: none lost to the coarser buckets
            assert sum(p["requests_per_s"] * body["step_s"] for p in body["series"]) == pytest.approx(len(range(5880)), abs=1)
        fine = client.get("/v1/services/chat/series", params={"since": now - 3600, "step_s": 60}, headers=R).json()
        assert fine["step_s"] == 60 and 48 <= len(fine["series"]) <= 51  # a step that fits is kept


def test_past_the_hot_tier_the_service_reads_aggregate_in_the_scan_and_match_a_brute_force(tmp_path, monkeypatch):
    now = time.time()
    since, until = now - 3 * 3600, now - 30
    events = requests("a", since + 5, now - 60, 1.0, seed=2) + requests("b", since + 5.5, now - 60, 1.0, seed=3)
    servers = [f for model in ("a", "c") for i, server in enumerate(("gpu-1:8000", "gpu-2:8000"))
               for f in server_frames(model, server, since + 7, now - 60, 15.0, seed=10 + i + (model == "c") * 2)]
    s = settings(tmp_path, window_s=900, raw_window_s=120, checkpoint_interval_s=3600, analysis_interval_s=3600,
                 maintenance_interval_s=3600)
    with TestClient(create_app(s)) as client:
        wait_ready(client)
        post_all(client, events, servers)
        store = client.app.state.store
        store.maintain_hot(now)
        store.checkpoint()
        for kind in ("requests", "server_stats", "server_histograms"):
            assert store.hot.complete_since(kind) > since + 3600  # the range reaches the warm tier
            assert list((tmp_path / "data" / f"kind={kind}").glob("date=*/hour=*/*.parquet")), kind
        raw_stats = store.scan("server_stats", since, None).collect()
        raw_hist = store.scan("server_histograms", since, None).collect()
        assert raw_stats.height == len(servers)

        # Every frame the reads collect from a Parquet scan is an aggregate, never the rows.
        collected: list[int] = []
        original = pl.LazyFrame.collect

        def spy(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if "parquet" in self.explain().lower() and isinstance(out, pl.DataFrame):
                collected.append(out.height)
            return out

        monkeypatch.setattr(pl.LazyFrame, "collect", spy)
        params = {"since": since, "until": until, "step_s": 1, "max_points": 12}
        series = client.get("/v1/services/chat/series", params=params, headers=R).json()
        by_node = client.get("/v1/services/chat/series", params={**params, "by": "node"}, headers=R).json()
        listed = client.get("/v1/services", params={"since": since}, headers=R).json()
        detail = client.get("/v1/services/chat", params={"since": since}, headers=R).json()
        monkeypatch.undo()
    assert len(events) > 20_000 and collected and max(collected) < 4000, max(collected)

    # At most max_points points per series.
    step = series["step_s"]
    assert step >= (until - since) / 12
    points: dict[tuple, list] = {}
    for p in series["series"]:
        points.setdefault((p["model"], p["source"]), []).append(p)
    assert set(points) == {("a", "client"), ("b", "client"), ("c", "server")}  # a: the client's figures, not its servers'
    assert all(len(v) <= 12 for v in points.values())
    for body, key in ((series, "model"), (by_node, "node")):
        for part in ("series", "server_state"):
            per: dict[tuple, int] = {}
            for p in body[part]:
                per[(p[key], p.get("source"))] = per.get((p[key], p.get("source")), 0) + 1
            assert per and max(per.values()) <= 12, (key, part, per)

    # The client's figures against the events themselves: counts exact, quantiles within the 2% buckets.
    for model in ("a", "b"):
        rows = [e for e in events if e["model"] == model and since <= e["ts"] <= until]
        buckets: dict[float, list] = {}
        for e in rows:
            buckets.setdefault(e["ts"] // step * step, []).append(e)
        got = {p["ts"]: p for p in points[(model, "client")]}
        assert set(got) == set(buckets)
        for ts, group in buckets.items():
            ok = [e for e in group if e["status"] == "ok"]
            p = got[ts]
            assert p["requests_per_s"] == pytest.approx(len(group) / step)
            assert p["errors_per_s"] == pytest.approx((len(group) - len(ok)) / step)
            assert p["error_ratio"] == pytest.approx((len(group) - len(ok)) / len(group))
            assert p["output_tokens_per_s"] == pytest.approx(sum(e["output_tokens"] for e in ok) / step)
            for m in ("e2e", "ttft", "tpot", "queue"):
                values = np.array([e[f"{m}_s"] for e in ok])
                for q in (50, 95, 99):
                    # the value of rank q (no interpolation: an edge bucket holds few) within its 2% bucket
                    want = float(np.quantile(values, q / 100, method="inverted_cdf"))
                    assert p[f"{m}_p{q}_s"] == pytest.approx(want, rel=0.01, abs=1e-12), (m, q, ts, len(ok))

    # The scraped-only model's figures against its frames.
    frames_c = [f for f in servers if f["model"] == "c" and since <= f["ts"] <= until]
    buckets = {}
    for f in frames_c:
        buckets.setdefault(f["ts"] // step * step, []).append(f)
    got = {p["ts"]: p for p in points[("c", "server")]}
    assert set(got) == set(buckets)
    for ts, group in buckets.items():
        p = got[ts]
        done = sum(f["counters"]["requests_ok"] + f["counters"]["requests_error"] for f in group)
        assert p["requests_per_s"] == pytest.approx(done / step)
        assert p["output_tokens_per_s"] == pytest.approx(sum(f["counters"]["generation_tokens"] for f in group) / step)
        per_server = {}
        for f in group:
            per_server.setdefault(f["server"], []).append(f["gauges"]["running"])
        assert p["running"] == pytest.approx(sum(sum(v) / len(v) for v in per_server.values()))
        for m in ("e2e", "ttft"):
            summed = np.sum([f["histograms"][m]["counts"] for f in group], axis=0).tolist()
            for q in (50, 95, 99):
                assert p[f"{m}_p{q}_s"] == pytest.approx(histogram_quantile(LE, summed, q / 100)), (m, q)

    # The list and the detail, reduced inside the scan, read as the same functions over every row do.
    close(listed["scraped"], server_overview(raw_stats).to_dicts())
    want = {r["model"]: r for r in server_services(raw_stats, raw_hist).to_dicts()}
    assert next(r for r in listed["services"] if r["model"] == "c")["requests"] == pytest.approx(want["c"]["requests"])
    close({k: v for k, v in next(r for r in listed["services"] if r["model"] == "c").items() if k in want["c"]}, want["c"])
    close(detail["scraped"], server_overview(raw_stats).to_dicts())
    close(detail["scraped_latency"], server_latency_quantiles(raw_hist, "chat").to_dicts())
    assert detail["sources"] == {"a": "client", "b": "client", "c": "server"}


def test_node_series_touch_no_more_buckets_than_max_points_whatever_the_range():
    """Buckets start at multiples of their width: a width of span / max_points could touch max_points + 1."""
    from collector.fleet import downsample_every

    for since, until, max_points in [(1_000_003.0, 1_003_603.0, 10), (1_000_059.0, 1_086_459.0, 500), (17.0, 617.0, 7),
                                     (1_700_000_123.5, 1_700_003_723.5, 60), (5.0, 6.5, 1)]:
        every = downsample_every(since, until, max_points)
        if every:
            assert math.floor(until / every) - math.floor(since / every) + 1 <= max_points, (since, until, max_points, every)


def test_quantiles_past_the_hot_tier_count_requests_that_never_queued():
    """The warm tier's quantiles (2%-wide buckets) agree with the exact ones, zeros included: a service whose
    requests mostly never queue has a median queue time of 0, not that of the few that queued."""
    import random

    import polars as pl

    from collector.inference import latency_quantiles, latency_quantiles_approx
    from collector.tables import SCHEMAS

    rng = random.Random(7)
    rows = [{"ts": 1e9 + i, "service": "chat", "model": "m", "status": "ok", "e2e_s": rng.uniform(0.2, 3.0),
             "queue_s": 0.0 if i % 10 < 7 else rng.uniform(0.01, 2.0), "ttft_s": rng.uniform(0.05, 0.5),
             "tpot_s": rng.uniform(0.01, 0.05), "output_tokens": 10} for i in range(5000)]
    frame = pl.DataFrame(rows, schema={k: SCHEMAS["requests"][k] for k in rows[0]})
    exact = latency_quantiles(frame, "chat").row(0, named=True)
    approx = latency_quantiles_approx(frame.lazy(), "chat").row(0, named=True)
    assert exact["queue_p50_s"] == 0.0 and approx["queue_p50_s"] == 0.0  # 70% never queued
    for name, value in exact.items():
        if name.endswith("_s") and value:
            assert approx[name] == pytest.approx(value, rel=0.03), name  # a bucket's width, and interpolation


def test_a_bucket_narrower_than_a_second_is_refused_not_a_server_error():
    """Found by the schemathesis fuzz test: step_s=5e-324 overflowed the bucket count (a 500)."""
    import tempfile
    from pathlib import Path

    from fastapi.testclient import TestClient

    from collector.api import create_app
    from tests.collector.test_api import R, settings
    from tests.conftest import wait_ready

    with tempfile.TemporaryDirectory() as tmp, TestClient(create_app(settings(Path(tmp)))) as c:
        wait_ready(c)
        for step in ("5e-324", "0.5", "0"):
            r = c.get("/v1/services/chat/series", params={"step_s": step}, headers=R)
            assert r.status_code == 422 and "step_s" in r.text, (step, r.status_code)
        assert c.get("/v1/services/chat/series", params={"step_s": "1"}, headers=R).status_code in (200, 404)
