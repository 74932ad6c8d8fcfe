"""Every Grafana panel's query returns data from a real Prometheus scraping a real agent and collector,
fed by a training job (with a slow rank) and an inference service through the real client."""

from __future__ import annotations

from tests.e2e.dashboard_fleet import ALL, assert_every_panel_returns_data, start_fleet


def test_every_panel_query_returns_a_series(procs, tmp_path):
    prometheus = start_fleet(procs, tmp_path)
    assert_every_panel_returns_data(prometheus, ALL)
