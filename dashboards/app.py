"""fleetscope console: the landing page, a summary of the fleet, its jobs and services."""

from __future__ import annotations

import streamlit as st

from dashboards.api import frames, page, refresh

collector = page("fleetscope")
st.caption("GPU fleet, training jobs and inference services, from the collector's API.")
nodes, jobs, services = frames(collector, ("/v1/nodes", "nodes", {"fields": "node,gpu_count"}), ("/v1/jobs", "jobs"),
                               ("/v1/services", "services"))

cols = st.columns(4)
cols[0].metric("Nodes reporting", nodes.height)
cols[1].metric("GPUs", int(nodes["gpu_count"].sum()) if nodes.height else 0)
cols[2].metric("Training jobs", jobs.height)
cols[3].metric("Inference services", services.height)
st.markdown("Pages: **Fleet** (nodes and GPUs), **Training** (step time per job), **Inference** (latency per service).")

refresh()
