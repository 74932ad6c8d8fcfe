"""The scale-out store: a real Prometheus scraping real agents and a collector remote-writes into a real
VictoriaMetrics (Debian's victoria-metrics), and every Grafana panel's query returns data from it, narrowed to
the cluster named in Prometheus' external_labels."""

from __future__ import annotations

from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.e2e.dashboard_fleet import ALL, assert_every_panel_returns_data, instant_query, start_fleet

CLUSTER = "e2e-cluster"


def test_every_panel_query_returns_a_series_from_victoriametrics(procs, tmp_path):
    victoria_metrics = require_binary("victoria-metrics")
    require_binary("prometheus")
    port = free_port()
    vm = f"http://127.0.0.1:{port}"
    procs("victoria-metrics", [victoria_metrics, f"-storageDataPath={tmp_path / 'vm'}", f"-httpListenAddr=127.0.0.1:{port}",
                               "-retentionPeriod=1d",
                               # samples are searchable once written, not 30 s later (the default)
                               "-search.latencyOffset=1s"])
    wait_until(lambda: http_get(vm + "/health")[0] == 200, what="victoria-metrics")
    start_fleet(procs, tmp_path, cluster=CLUSTER, remote_write=f"{vm}/api/v1/write")

    assert_every_panel_returns_data(vm, {**ALL, "$cluster": CLUSTER})
    # the label is what keeps clusters apart: another cluster's selection is empty
    assert instant_query(vm, 'fleetscope_agent_build_info{cluster="another-cluster"}') == []
    assert len(instant_query(vm, f'fleetscope_agent_build_info{{cluster="{CLUSTER}"}}')) == 2
