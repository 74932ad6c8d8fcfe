"""Inference: every service, instrumented with the client or read from its servers; latency, traffic and the servers' state."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards.api import (api_path, as_times, fetch, frames, line_chart, long_series, md, page, refresh, service_series,
                            since)

collector = page("Inference")
(services,) = frames(collector, ("/v1/services", "services", {"since": since()}))

if services.height == 0:
    st.info("No inference service has reported a request or been scraped yet. Instrument one with "
            "`fleetscope.inference(...)`, or point the agent at its server's /metrics (`[[agent.inference_servers]]`).")
    st.stop()

shown = [c for c in ("service", "model", "source", "requests", "error_ratio", "e2e_p50_s", "ttft_p50_s", "last_request_ts",
                     "nodes", "running", "waiting", "kv_cache_usage_ratio") if c in services.columns]
st.dataframe(as_times(services.select(shown), "last_request_ts").rename({"last_request_ts": "last request"}),
             hide_index=True, width="stretch")
st.caption("source: **client** figures come from the request events of `fleetscope.inference(...)` (exact); **server** "
           "figures from the servers' own histograms (interpolated within their buckets). A service reported both ways "
           "is counted once, from the client.")
service = st.selectbox("Service", services["service"].unique().sort().to_list(), key="service")
detail = fetch(collector, api_path("v1", "services", service), since=since())
LATENCIES = [("e2e", "e2e"), ("queue", "queue"), ("TTFT", "ttft"), ("time per output token", "tpot")]


def ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds is not None else "–"


for row in detail.get("models") or []:  # instrumented with the client
    st.subheader(f"{md(service)} · {md(row['model'])}")
    for col, (label, key) in zip(st.columns(4), LATENCIES):
        p99 = row.get(f"{key}_p99_s")
        col.metric(f"{label} p50", ms(row.get(f"{key}_p50_s")), help=f"p99 {ms(p99)}" if p99 is not None else None)
    st.caption(f"{row['requests']} requests, error ratio {row['error_ratio']:.2%} · source: client")

sources = detail.get("sources") or {}
scraped = pl.DataFrame(detail.get("scraped_latency") or [], infer_schema_length=None)
overview = {r["model"]: r for r in detail.get("scraped") or []}
for model in [m for m, s in sources.items() if s == "server"]:  # read only from the servers
    st.subheader(f"{md(service)} · {md(model)}")
    rows = {r["metric"]: r for r in scraped.filter(pl.col("model") == model).iter_rows(named=True)} if scraped.height else {}
    for col, (label, key) in zip(st.columns(4), LATENCIES):
        r = rows.get(key)
        if r is None:
            mean = overview.get(model, {}).get(f"{key}_mean_s")  # Triton: means only
            col.metric(f"{label} p50", "–" if mean is None else f"mean {ms(mean)}",
                       help="the server reports no histogram for it" if mean is None else
                       "the server reports means only (Triton gives quantiles when started with "
                       "--metrics-config summary_latencies=true)")
            continue
        note = ""
        if r["p50_s"] is not None and r["lowest_bound_s"] is not None and r["p50_s"] < r["lowest_bound_s"]:
            note = (f" Below the server's smallest bucket ({ms(r['lowest_bound_s'])}) quantiles are interpolated, "
                    f"not measured: the mean ({ms(r['mean_s'])}) is exact.")
        col.metric(f"{label} p50", ms(r["p50_s"]), help=f"p99 {ms(r['p99_s'])}, mean {ms(r['mean_s'])}.{note}")
        if note:
            col.caption(f"interpolated below {ms(r['lowest_bound_s'])}; mean {ms(r['mean_s'])}")
    o = overview.get(model, {})
    if o:
        st.caption(f"{o['requests']:.0f} requests, error ratio {(o['error_ratio'] or 0):.2%} · source: server ({o['kind']})")

replicas = pl.DataFrame(detail.get("replicas") or [], infer_schema_length=None)
if replicas.height:  # on Kubernetes: the pod of each replica, as its request events named it
    st.subheader("Replicas")
    st.dataframe(as_times(replicas.with_columns(pl.col("models").list.join(", ")), "first_request_ts", "last_request_ts"),
                 hide_index=True, width="stretch")
    st.caption("verified: the agent read the pod from the sending process (its Unix socket names the sender); "
               "otherwise the client named its own pod (POD_NAME, POD_NAMESPACE or its hostname).")

slurm_jobs = pl.DataFrame(detail.get("slurm") or [], infer_schema_length=None)
if slurm_jobs.height:  # under Slurm: the Slurm jobs whose processes served the requests (collector/slurm.py)
    st.subheader("Slurm")
    st.dataframe(as_times(slurm_jobs.with_columns(pl.col("steps", "nodes").cast(pl.List(pl.String)).list.join(", ")),
                          "first_request_ts", "last_request_end_ts"), hide_index=True, width="stretch")
    st.caption("The Slurm jobs whose processes sent this service's request events, oldest first: a new sbatch is a "
               "new job id, a requeue keeps the id and counts restarts.")

st.header("Over time")
by = st.radio("Per", ["model", "node"], horizontal=True, key="by",
              format_func=lambda b: {"model": "model", "node": "replica (node)"}[b])
series, state = service_series(collector, service, by)
def small_chart(frame, title: str, columns: dict, unit: str, empty: str) -> None:
    """One titled chart of `columns` of `frame` per model or replica, or why there is none."""
    st.markdown(f"**{title}**")
    lines = long_series(frame, by, columns)
    if lines.height:
        line_chart(lines, "value", color="series", title=unit)
    else:
        st.caption(empty)


if series.height:
    for title, key in (("Time to first token", "ttft"), ("Time per output token", "tpot"), ("End to end", "e2e")):
        lines = long_series(series, by, {f"{key}_p{p}_s": f"p{p}" for p in (50, 95, 99)})
        if lines.height:
            st.subheader(title)
            line_chart(lines, "value", color="series", title="seconds")
    cols = st.columns(3)
    for col, (title, columns, unit) in zip(cols, [
        ("Requests per second", {"requests_per_s": "requests", "errors_per_s": "errors"}, "per second"),
        ("Error ratio", {"error_ratio": "errors"}, "share of requests"),
        ("Output tokens per second", {"output_tokens_per_s": "tokens/s"}, "tokens per second"),
    ]):
        with col:
            small_chart(series, title, columns, unit, "no data in the range")
if state.height:
    st.header("Servers")
    cols = st.columns(2)
    for i, (title, columns, unit) in enumerate([
        ("KV-cache use", {"kv_cache_usage_ratio": "KV cache"}, "share in use"),
        ("Running and waiting requests", {"running": "running", "waiting": "waiting"}, "requests"),
        ("Preemptions per second", {"preemptions_per_s": "preemptions"}, "per second"),
        ("Prefix-cache hit ratio", {"prefix_cache_hit_ratio": "hits"}, "share of prompt tokens"),
    ]):
        with cols[i % 2]:
            small_chart(state, title, columns, unit, "the servers do not report it")

slos = [s for s in fetch(collector, "/v1/slos").get("slos", []) if s["service"] == service]
if slos:
    st.subheader("SLOs")
    st.dataframe([{"slo": s["slo"], "objective": s["objective"],
                   "attained": round(s["good"] / s["requests"], 4) if s["requests"] else None,
                   "budget left": round(s["error_budget_remaining_ratio"], 4),
                   **{f"burn {w}": round(v, 2) for w, v in s["burn_rate"].items()}} for s in slos],
                 hide_index=True, width="stretch")

refresh()
