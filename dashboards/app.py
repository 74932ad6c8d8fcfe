"""fleetscope console: the landing page, a summary of the fleet, its jobs and services."""

from __future__ import annotations

import streamlit as st

from dashboards.api import CollectorError, get_collector

st.set_page_config(page_title="fleetscope", layout="wide")
st.title("fleetscope")
st.caption("GPU fleet, training jobs and inference services, from the collector's API.")

collector = get_collector()
try:
    nodes = collector.frame("/v1/nodes", "nodes")
    jobs = collector.frame("/v1/jobs", "jobs")
    services = collector.frame("/v1/services", "services")
except CollectorError as exc:
    st.error(str(exc))
    st.stop()

cols = st.columns(4)
cols[0].metric("Nodes reporting", nodes.height)
cols[1].metric("GPUs", int(nodes["gpu_count"].sum()) if nodes.height else 0)
cols[2].metric("Training jobs", jobs.height)
cols[3].metric("Inference services", services.height)
st.markdown("Pages: **Fleet** (nodes and GPUs), **Training** (step time per job), **Inference** (latency per service).")
