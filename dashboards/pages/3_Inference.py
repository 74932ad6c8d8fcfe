"""Inference: latency quantiles (end to end, queue, TTFT, time per output token) per service and model."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards.api import api_path, fetch, frames, md, page, refresh, since

collector = page("Inference")
(services,) = frames(collector, ("/v1/services", "services", {"since": since()}))

if services.height == 0:
    st.info("No inference service has reported a request yet. Instrument one with `fleetscope.inference(...)`.")
    st.stop()

st.dataframe(services, hide_index=True, width="stretch")
service = st.selectbox("Service", services["service"].unique().sort().to_list(), key="service")
models = pl.DataFrame(fetch(collector, api_path("v1", "services", service), since=since()).get("models") or [])
for row in models.iter_rows(named=True):
    st.subheader(f"{md(service)} · {md(row['model'])}")
    cols = st.columns(4)
    for col, (label, key) in zip(cols, [("e2e", "e2e"), ("queue", "queue"), ("TTFT", "ttft"), ("time per output token", "tpot")]):
        p50, p99 = row.get(f"{key}_p50_s"), row.get(f"{key}_p99_s")
        col.metric(f"{label} p50", f"{p50 * 1000:.1f} ms" if p50 is not None else "–",
                   help=f"p99 {p99 * 1000:.1f} ms" if p99 is not None else None)
    st.caption(f"{row['requests']} requests, error ratio {row['error_ratio']:.2%}")

slos = [s for s in fetch(collector, "/v1/slos").get("slos", []) if s["service"] == service]
if slos:
    st.subheader("SLOs")
    st.dataframe([{"slo": s["slo"], "objective": s["objective"],
                   "attained": round(s["good"] / s["requests"], 4) if s["requests"] else None,
                   "budget left": round(s["error_budget_remaining_ratio"], 4),
                   **{f"burn {w}": round(v, 2) for w, v in s["burn_rate"].items()}} for s in slos],
                 hide_index=True, width="stretch")

refresh()
