"""SLOs: good and bad requests per minute, multiwindow burn rates, budgets, findings and restarts."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest
from fastapi.testclient import TestClient

from tests.conftest import wait_ready

from collector.api import create_app
from collector.settings import Settings
from collector.slo import Slo, SloLedger, burning, good_and_total, load_slos
from collector.tables import SCHEMAS

NOW = 1_800_000_000.0
TTFT = Slo(name="chat-ttft", service="chat", indicator="ttft", threshold_s=0.5, objective=0.99)


def requests(rows: list[tuple[float, float | None, str]]) -> pl.DataFrame:
    return pl.DataFrame([{"ts": ts, "service": "chat", "model": "m", "status": status, "e2e_s": 1.0, "ttft_s": ttft}
                         for ts, ttft, status in rows], schema={k: SCHEMAS["requests"][k] for k in
                                                                ("ts", "service", "model", "status", "e2e_s", "ttft_s")})


def test_good_means_succeeded_within_the_threshold():
    frame = requests([(NOW, 0.2, "ok"), (NOW + 1, 0.9, "ok"), (NOW + 2, 0.1, "error"), (NOW + 3, None, "ok"),
                      (NOW + 4, None, "cancelled")])
    (row,) = good_and_total(frame, TTFT).rows()
    assert row == (NOW // 60 * 60, 1.0, 4.0)  # the ok request with no first token is not counted
    availability = Slo(name="a", service="chat", indicator="availability", objective=0.999)
    assert good_and_total(frame, availability).rows()[0][1:] == (4.0, 5.0)


def test_burn_rates_per_window_and_the_workbook_rules():
    ledger = SloLedger([TTFT])
    # an hour of good traffic, then the last five minutes 20% slow
    good = [(NOW - 3600 + i * 6, 0.2, "ok") for i in range(550)]
    slow = [(NOW - 290 + i * 0.29, 0.9 if i % 5 == 0 else 0.2, "ok") for i in range(1000)]
    ledger.observe(requests(good + slow))
    (report,) = ledger.report(NOW)
    assert report["burn_rate"]["5m"] == pytest.approx(20.0, rel=0.05)
    assert report["burn_rate"]["1h"] == pytest.approx(200 / 1550 / 0.01, rel=0.05)
    assert report["error_budget_remaining_ratio"] < 0
    (burn,) = burning([report])
    # the last hour burns at ~13x (under 14.4), the last 6 h and 30 min above 6x: the second pair pages
    assert burn["severity"] == "page" and burn["rule"] == "6h/30m >= 6.0"
    calm = {**report, "burn_rate": {"5m": 20.0, "30m": 1.0, "1h": 2.0, "6h": 1.0, "3d": 0.5}}
    assert burning([calm]) == []  # a short spike alone does not page


def test_bad_slo_configuration_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[slo]]\nname = "x"\nservice = "chat"\nindicator = "latency"\nobjective = 0.99\n')
    with pytest.raises(ValueError, match="indicator must be one of"):
        load_slos(path)
    path.write_text('[[slo]]\nname = "x"\nservice = "chat"\nindicator = "ttft"\nobjective = 99\nthreshold_s = 0.5\n')
    with pytest.raises(ValueError, match="objective must be between 0 and 1"):
        load_slos(path)


def burn_5m(text: str) -> float:
    import re

    m = re.search(r'fleetscope_slo_burn_rate\{service="chat",slo="chat-ttft",window="5m"\} (\S+)', text)
    assert m, "no 5m burn rate on /metrics"
    return float(m.group(1))


def app_settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", ingest_tokens=frozenset({"w"}), read_tokens=frozenset({"r"}), slos=(TTFT,))


def post_requests(client, seq: int, n: int, slow_every: int) -> None:
    now = time.time()
    events = [{"v": 1, "kind": "request", "service": "chat", "model": "m", "ts": now - 200 + i * 0.1, "e2e_s": 1.0,
               "ttft_s": 0.9 if i % slow_every == 0 else 0.1} for i in range(n)]
    body = {"v": 1, "agent_id": "a", "seq": seq, "node": "n", "sent_ts": now, "events": events}
    assert client.post("/v1/ingest", content=json.dumps(body), headers={"Authorization": "Bearer w"}).status_code == 200


def test_a_burning_slo_is_a_finding_and_a_metric_and_survives_a_restart(tmp_path):
    with TestClient(create_app(app_settings(tmp_path))) as client:
        wait_ready(client)
        post_requests(client, 0, 1000, slow_every=4)  # 25% of requests miss a 99% objective
        client.app.state.analyse_now()
        (f,) = client.get("/v1/findings?kind=slo_burn", headers={"Authorization": "Bearer r"}).json()["findings"]
        assert f["subject"] == {"service": "chat", "slo": "chat-ttft"} and f["severity"] == "page"
        assert f["evidence"]["burn_rate"]["5m"] == pytest.approx(25.0, rel=0.05)
        text = client.get("/metrics", headers={"Authorization": "Bearer r"}).text
        assert burn_5m(text) == pytest.approx(25.0, rel=0.05)
    # after a restart the ledger is rebuilt from what was checkpointed to disk
    with TestClient(create_app(app_settings(tmp_path))) as client:
        wait_ready(client)
        client.app.state.analyse_now()
        text = client.get("/metrics", headers={"Authorization": "Bearer r"}).text
        assert burn_5m(text) == pytest.approx(25.0, rel=0.05)


def test_scraped_servers_count_towards_slos_from_their_histograms():
    from collector.slo import good_and_total_from_servers

    hist = pl.DataFrame([
        {"ts": NOW, "service": "chat", "model": "m", "server": "s", "metric": "ttft",
         "le": [0.1, 0.5, 1.0, 1e300], "counts": [50.0, 90.0, 99.0, 100.0], "sum": 20.0, "count": 100.0},
        {"ts": NOW + 5, "service": "chat", "model": "m", "server": "s", "metric": "e2e",
         "le": [0.1, 0.5, 1.0, 1e300], "counts": [0.0, 0.0, 10.0, 10.0], "sum": 8.0, "count": 10.0},
    ], schema=SCHEMAS["server_histograms"])
    assert good_and_total_from_servers(hist, pl.DataFrame(schema=SCHEMAS["server_stats"]), TTFT) == [(NOW // 60 * 60, 90.0, 100.0)]
    between = Slo(name="x", service="chat", indicator="ttft", threshold_s=0.3, objective=0.9)
    assert good_and_total_from_servers(hist, pl.DataFrame(schema=SCHEMAS["server_stats"]), between)[0][1] == pytest.approx(70.0)
    ledger = SloLedger([TTFT])
    ledger.observe_servers(hist, pl.DataFrame(schema=SCHEMAS["server_stats"]))
    (report,) = ledger.report(NOW + 10)
    assert report["burn_rate"]["5m"] == pytest.approx(10 / 100 / 0.01)
