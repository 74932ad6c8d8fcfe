"""Grafana dashboards as code (grafana-foundation-sdk): fleet, node and GPU, training job, inference service.

    python -m dashboards.grafana.build            # write dashboards/grafana/*.json
    python -m dashboards.grafana.build --check    # exit 1 when the committed JSON is out of date

Every panel queries the data source picked in the dashboard's `datasource` variable: the cluster's own
Prometheus or the VictoriaMetrics it remote-writes to (both provisioned in deploy/grafana/, both of type
prometheus). A `cluster` variable narrows every query to one cluster's series: in VictoriaMetrics each
cluster's series carry its Prometheus' `external_labels: {cluster: ...}`; in a cluster's own Prometheus the
label is absent and "All" (`.*`, which matches the empty value) selects everything.
Alerts firing in Prometheus show as annotations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef

HERE = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
C = 'cluster=~"$cluster"'  # the matcher every selector carries


def q(expr: str, legend: str = "") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DS)
    return query.legend_format(legend) if legend else query


def ts(title: str, unit: str, *queries: prometheus.Dataquery, width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DS).span(width).height(8)
    for i, query in enumerate(queries):
        panel = panel.with_target(query.ref_id(chr(ord("A") + i)))
    return panel


def single(title: str, expr: str, unit: str = "none") -> stat.Panel:
    return stat.Panel().title(title).unit(unit).datasource(DS).span(4).height(4).with_target(q(expr).ref_id("A"))


def datasource_variable() -> dashboard.DatasourceVariable:
    # No `current`: Grafana starts on the provisioned default (Prometheus per cluster, VictoriaMetrics centrally).
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def variable(name: str, query: str, label: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).query(query).datasource(DS)
            .include_all(True).multi(True).all_value(".*").refresh(2))  # refresh on time range change


# The SDK's annotation target has no PromQL field (yet): the annotation is added to the JSON in render().
ALERTS_ANNOTATION = {
    "name": "Firing alerts", "datasource": {"type": "prometheus", "uid": "${datasource}"}, "enable": True,
    "iconColor": "red", "expr": f'ALERTS{{alertstate="firing", {C}}}', "step": "30s",
    "titleFormat": "{{alertname}}", "textFormat": "{{instance}} {{training_job}} {{service}}", "tagKeys": "severity",
}


def base(uid: str, title: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).tags(["fleetscope"]).refresh("30s").time("now-1h", "now")
            .with_variable(datasource_variable())
            .with_variable(variable("cluster", "label_values(fleetscope_agent_build_info, cluster)", "Cluster")))


def fleet() -> dashboard.Dashboard:
    c = f"{{{C}}}"
    return (
        base("fleetscope-fleet", "fleetscope / Fleet")
        .with_row(dashboard.Row("Now"))
        .with_panel(single("Agents up", f'sum(up{{job=~"fleetscope-agent.*", {C}}})'))
        .with_panel(single("GPUs present", f"sum(fleetscope_gpus_present{c})"))
        .with_panel(single("GPUs unhealthy", f'sum(fleetscope_gpu_health{{state="unhealthy", {C}}})'))
        .with_panel(single("GPUs degraded", f'sum(fleetscope_gpu_health{{state="degraded", {C}}})'))
        .with_panel(single("Active findings", f"count(fleetscope_finding_active{c}) or vector(0)"))
        .with_panel(single("XIDs in the last hour", f"sum(increase(fleetscope_gpu_xid_errors_total{c}[1h]))"))
        .with_row(dashboard.Row("GPUs by node"))
        .with_panel(ts("GPU utilisation (mean per node)", "percentunit",
                       q(f"avg by (cluster, instance) (fleetscope_gpu_utilization_ratio{c})", "{{instance}} {{cluster}}")))
        .with_panel(ts("Hottest GPU per node", "celsius", q(f"max by (cluster, instance) (fleetscope_gpu_temperature_celsius{c})", "{{instance}} {{cluster}}")))
        .with_panel(ts("GPU power per node", "watt", q(f"sum by (cluster, instance) (fleetscope_gpu_power_watts{c})", "{{instance}} {{cluster}}")))
        .with_panel(table.Panel().title("Why GPUs are not healthy").datasource(DS).span(12).height(8)
                    .with_target(q(f"fleetscope_gpu_health_reason{c}").instant().format("table").ref_id("A")))
    )


def node() -> dashboard.Dashboard:
    h = f'{{{C}, instance=~"$instance"}}'
    g = f'{{{C}, instance=~"$instance", gpu=~"$gpu"}}'
    return (
        base("fleetscope-node", "fleetscope / Node and GPU")
        .with_variable(variable("instance", f"label_values(fleetscope_agent_build_info{{{C}}}, instance)", "Node"))
        .with_variable(variable("gpu", f"label_values(fleetscope_gpu_up{h}, gpu)", "GPU"))
        .with_row(dashboard.Row("GPUs"))
        .with_panel(ts("Utilisation", "percentunit", q(f"fleetscope_gpu_utilization_ratio{g}", "{{instance}} GPU {{gpu}}")))
        .with_panel(ts("Temperature and slowdown point", "celsius",
                       q(f"fleetscope_gpu_temperature_celsius{g}", "{{instance}} GPU {{gpu}}"),
                       q(f"fleetscope_gpu_temperature_slowdown_celsius{g}", "slowdown {{instance}} GPU {{gpu}}")))
        .with_panel(ts("Power and limit", "watt", q(f"fleetscope_gpu_power_watts{g}", "{{instance}} GPU {{gpu}}"),
                       q(f"fleetscope_gpu_power_limit_watts{g}", "limit {{instance}} GPU {{gpu}}")))
        .with_panel(ts("SM clock, share of max", "percentunit",
                       q(f"fleetscope_gpu_sm_clock_hertz{g} / fleetscope_gpu_sm_clock_max_hertz{g}", "{{instance}} GPU {{gpu}}")))
        .with_panel(ts("Memory used", "bytes", q(f"fleetscope_gpu_memory_used_bytes{g}", "{{instance}} GPU {{gpu}}")))
        .with_panel(ts("Clock events holding clocks down", "none",
                       q(f'fleetscope_gpu_clock_event_active{{{C}, instance=~"$instance", gpu=~"$gpu", reason!="gpu_idle"}} == 1',
                         "{{instance}} GPU {{gpu}} {{reason}}")))
        .with_panel(ts("XIDs", "none", q(f"increase(fleetscope_gpu_xid_errors_total{g}[5m])", "{{instance}} GPU {{gpu}} XID {{xid}}")))
        .with_panel(ts("ECC errors", "none", q(f"fleetscope_gpu_ecc_errors_total{g}", "{{instance}} GPU {{gpu}} {{type}} {{counter}}")))
        .with_panel(ts("PCIe throughput", "Bps", q(f"fleetscope_gpu_pcie_receive_bytes_per_second{g}", "rx {{instance}} GPU {{gpu}}"),
                       q(f"fleetscope_gpu_pcie_transmit_bytes_per_second{g}", "tx {{instance}} GPU {{gpu}}")))
        .with_panel(ts("NVLink errors", "ops", q(f"sum by (cluster, instance, gpu, type) (rate(fleetscope_gpu_nvlink_errors_total{g}[5m]))",
                                                 "{{instance}} GPU {{gpu}} {{type}}")))
        .with_row(dashboard.Row("Host"))
        .with_panel(ts("CPU utilisation", "percentunit", q(f"fleetscope_cpu_utilization_ratio{h}", "{{instance}}")))
        .with_panel(ts("Memory available", "bytes", q(f"fleetscope_memory_available_bytes{h}", "{{instance}}")))
        .with_panel(ts("Network", "Bps",
                       q(f"sum by (cluster, instance) (rate(fleetscope_network_receive_bytes_total{h}[5m]))", "rx {{instance}}"),
                       q(f"sum by (cluster, instance) (rate(fleetscope_network_transmit_bytes_total{h}[5m]))", "tx {{instance}}")))
        .with_panel(ts("Disk busy", "percentunit",
                       q(f"rate(fleetscope_disk_io_time_seconds_total{h}[5m])", "{{instance}} {{device}}")))
    )


def training() -> dashboard.Dashboard:
    j = f'{{{C}, training_job=~"$training_job"}}'
    return (
        base("fleetscope-training", "fleetscope / Training job")
        .with_variable(variable("training_job", f"label_values(fleetscope_training_last_step{{{C}}}, training_job)", "Job"))
        .with_panel(ts("Median step time", "s", q(f"fleetscope_training_step_time_p50_seconds{j}", "{{training_job}}")))
        .with_panel(ts("Tokens per second", "short", q(f"fleetscope_training_tokens_per_second{j}", "{{training_job}}")))
        .with_panel(ts("MFU", "percentunit", q(f"fleetscope_training_mfu_ratio{j}", "{{training_job}}")))
        .with_panel(ts("Straggler score by rank", "percentunit",
                       q(f"fleetscope_training_straggler_score{j}", "{{training_job}} rank {{rank}} ({{node}})")))
        .with_panel(ts("Silence and hang threshold", "s", q(f"fleetscope_training_last_progress_age_seconds{j}", "silence {{training_job}}"),
                       q(f"fleetscope_training_hang_threshold_seconds{j}", "hang after {{training_job}}")))
        .with_panel(ts("Step time against baseline", "percentunit",
                       q(f"fleetscope_training_step_time_change_ratio{j}", "{{training_job}}")))
        .with_row(dashboard.Row("Goodput: where the GPU-hours went, across restarts"))
        .with_panel(ts("Goodput (productive share of the job's life)", "percentunit",
                       q(f"fleetscope_training_goodput_ratio{j}", "{{training_job}}")))
        # GPU-seconds lost per second: how many of the job's GPUs, on average, each reason kept from useful work.
        .with_panel(ts("GPUs lost, by reason (stacked)", "short",
                       q(f"sum by (cluster, training_job, reason) (rate(fleetscope_training_badput_seconds_total{j}[5m]))",
                         "{{training_job}} {{reason}}"))
                    .stacking(common.StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40))
        .with_panel(table.Panel().title("Findings").datasource(DS).span(24).height(8)
                    .with_target(q(f"fleetscope_finding_active{j}").instant().format("table").ref_id("A")))
    )


def quantiles(title: str, what: str, sel: str) -> timeseries.Panel:
    """p50, p95 and p99 of one latency, per service and model, from the collector (client events or servers)."""
    return ts(title, "s", *(q(f"fleetscope_inference_{what}_{p}_seconds{sel}", f"{p} {{{{service}}}} {{{{model}}}}")
                            for p in ("p50", "p95", "p99")), width=8)


def inference() -> dashboard.Dashboard:
    s = f'{{{C}, service=~"$service"}}'
    by_server = "sum by (cluster, instance, service, model)"
    return (
        base("fleetscope-inference", "fleetscope / Inference service")
        # every service the collector knows, whether it reports with the client or is read from its servers
        .with_variable(variable("service", f"label_values(fleetscope_inference_requests_per_second{{{C}}}, service)", "Service"))
        .with_row(dashboard.Row("Traffic and latency (the client's events, else the servers' histograms: see `source`)"))
        .with_panel(ts("Requests per second", "reqps",
                       q(f"fleetscope_inference_requests_per_second{s}", "{{service}} {{model}} ({{source}})"), width=8))
        .with_panel(ts("Error ratio", "percentunit", q(f"fleetscope_inference_error_ratio{s}", "{{service}} {{model}}"), width=8))
        .with_panel(ts("Output tokens per second", "short",
                       q(f"fleetscope_inference_output_tokens_per_second{s}", "{{service}} {{model}}"), width=8))
        .with_panel(quantiles("Time to first token", "ttft", s))
        .with_panel(quantiles("Time per output token", "tpot", s))
        .with_panel(quantiles("End to end", "e2e", s))
        .with_row(dashboard.Row("Servers, per replica (read by the agent on each node from vLLM, SGLang, TGI, Triton)"))
        .with_panel(ts("KV-cache use", "percentunit",
                       q(f"fleetscope_inference_kv_cache_usage_ratio{s}", "{{instance}} {{service}} {{model}}"), width=8))
        .with_panel(ts("Running and waiting requests", "short",
                       q(f"fleetscope_inference_requests_running{s}", "running {{instance}} {{model}}"),
                       q(f"fleetscope_inference_requests_waiting{s}", "waiting {{instance}} {{model}}"), width=8))
        .with_panel(ts("Preemptions per second", "short",
                       q(f"{by_server} (rate(fleetscope_inference_preemptions_total{s}[5m]))", "{{instance}} {{model}}"), width=8))
        .with_panel(ts("Prefix-cache hit ratio", "percentunit",
                       q(f"{by_server} (rate(fleetscope_inference_prefix_cache_hit_tokens_total{s}[5m])) / "
                         f"{by_server} (rate(fleetscope_inference_prefix_cache_queried_tokens_total{s}[5m]))",
                         "{{instance}} {{model}}"), width=8))
        .with_row(dashboard.Row("SLOs"))
        .with_panel(ts("SLO burn rate", "short", q(f"fleetscope_slo_burn_rate{s}", "{{slo}} {{window}}")))
        .with_panel(ts("Error budget left", "percentunit", q(f"fleetscope_slo_error_budget_remaining_ratio{s}", "{{slo}}")))
    )


DASHBOARDS = {"fleet": fleet, "node": node, "training": training, "inference": inference}


def render() -> dict[Path, str]:
    encoder = JSONEncoder(sort_keys=True, indent=2)
    out = {}
    for name, build in DASHBOARDS.items():
        doc = json.loads(encoder.encode(build().build()))
        doc.setdefault("annotations", {}).setdefault("list", []).append(ALERTS_ANNOTATION)
        out[HERE / f"{name}.json"] = json.dumps(doc, sort_keys=True, indent=2) + "\n"
    return out


def panel_queries(text: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel of a dashboard's JSON."""
    doc = json.loads(text)
    return [(p.get("title", ""), t["expr"]) for p in doc.get("panels", []) for t in p.get("targets", []) if "expr" in t]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    files = render()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p.name} (run python -m dashboards.grafana.build)", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(files[p])
    print(f"wrote {len(stale)} dashboard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
