"""Every Grafana panel's query returns data from a real Prometheus scraping a real agent and collector, fed
by a training job (with a slow rank) and an inference service through the real client; and, through the
scale-out store, from a real VictoriaMetrics (Debian's victoria-metrics) that Prometheus remote-writes
into, narrowed to the cluster named in Prometheus' external_labels. One fleet feeds both (it takes most
of a minute to have every panel's data)."""

from __future__ import annotations

from tests.conftest import free_port, http_get, require_binary, wait_until
from tests.e2e.dashboard_fleet import ALL, assert_every_panel_returns_data, instant_query, start_fleet

CLUSTER = "e2e-cluster"


def test_every_panel_query_returns_a_series_from_prometheus_and_from_victoriametrics(procs, tmp_path):
    victoria_metrics = require_binary("victoria-metrics")
    require_binary("prometheus")
    port = free_port()
    vm = f"http://127.0.0.1:{port}"
    procs("victoria-metrics", [victoria_metrics, f"-storageDataPath={tmp_path / 'vm'}", f"-httpListenAddr=127.0.0.1:{port}",
                               "-retentionPeriod=1d",
                               # samples are searchable once written, not 30 s later (the default)
                               "-search.latencyOffset=1s"])
    wait_until(lambda: http_get(vm + "/health")[0] == 200, what="victoria-metrics")
    prometheus = start_fleet(procs, tmp_path, cluster=CLUSTER, remote_write=f"{vm}/api/v1/write")

    assert_every_panel_returns_data(prometheus, ALL)
    assert_every_panel_returns_data(vm, {**ALL, "$cluster": CLUSTER})
    # the label is what keeps clusters apart: another cluster's selection is empty
    assert instant_query(vm, 'fleetscope_agent_build_info{cluster="another-cluster"}') == []
    assert len(instant_query(vm, f'fleetscope_agent_build_info{{cluster="{CLUSTER}"}}')) == 2
