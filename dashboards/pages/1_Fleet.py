"""Fleet: every node and GPU, with utilisation, temperature and power.

Sized for thousands of nodes: the counts come from the nodes' summaries, the GPUs that need
attention are asked for by state, and the GPU map shows at most 64 nodes (the ones in the most
trouble, or those of one rack)."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from dashboards.api import fetch, frames, md, page, refresh

MAP_NODES = 64

collector = page("Fleet")
(nodes,) = frames(collector, ("/v1/nodes", "nodes"))

if nodes.height == 0:
    st.info("No node has reported yet. Start an agent with --collector-url pointing here.")
    st.stop()

STALE_S = 30
stale = nodes.filter(pl.col("age_s") > STALE_S)
reported = nodes.select(*(pl.col(c).fill_null(0).sum().alias(c) for c in ("gpu_count", "gpus_down", "gpus_degraded", "gpus_unhealthy")
                          if c in nodes.columns)).row(0, named=True)
gpus_total = int(reported.get("gpu_count", 0) + reported.get("gpus_down", 0))
cols = st.columns(6)
cols[0].metric("Nodes", nodes.height)
cols[1].metric("Nodes not reporting", stale.height, help=f"no frame for more than {STALE_S} s")
cols[2].metric("GPUs", gpus_total)
cols[3].metric("GPUs healthy", gpus_total - int(reported.get("gpus_degraded", 0)) - int(reported.get("gpus_unhealthy", 0)),
               help="GPUs whose agent reports no health verdict count here")
cols[4].metric("GPUs degraded", int(reported.get("gpus_degraded", 0)))
cols[5].metric("GPUs unhealthy", int(reported.get("gpus_unhealthy", 0)), help="a GPU off the bus counts here too")

st.subheader("Nodes")
st.dataframe(
    nodes.select(
        *[c for c in ("cluster", "rack") if c in nodes.columns and nodes[c].null_count() < nodes.height],
        "node",
        pl.col("age_s").round(1).alias("last frame (s ago)"),
        (pl.col("cpu_utilization_ratio") * 100).round(1).alias("CPU %"),
        (pl.col("memory_used_bytes") / 2**30).round(1).alias("memory used GiB"),
        "gpu_count",
        (pl.col("gpu_utilization_mean_ratio") * 100).round(1).alias("GPU util mean %"),
        pl.col("gpu_temperature_max_celsius").alias("GPU temp max °C"),
        pl.col("gpu_power_watts").round(0).alias("GPU power W"),
        "sources_down",
    ),
    hide_index=True,
    width="stretch",
)

trouble = pl.DataFrame(fetch(collector, "/v1/gpus", health="degraded,unhealthy").get("gpus") or [])
if trouble.height:
    st.subheader("GPUs that need attention")
    st.dataframe(trouble.select([c for c in ("node", "index", "uuid", "health", "health_reasons", "temperature_celsius",
                                             "xid_total") if c in trouble.columns]), hide_index=True, width="stretch")

# The GPU map: one rack, or the nodes in the most trouble (a map of thousands of nodes is unreadable).
racks = sorted(r for r in nodes["rack"].drop_nulls().unique().to_list()) if "rack" in nodes.columns else []
rack = st.selectbox("Rack", ["the nodes in the most trouble", *racks], key="rack") if racks else None
shown = nodes.filter(pl.col("rack") == rack) if rack and rack in racks else nodes
order = [pl.col(c).fill_null(0) for c in ("gpus_unhealthy", "gpus_down", "gpus_degraded", "gpu_temperature_max_celsius")
         if c in shown.columns]
shown = shown.sort(order, descending=True).head(MAP_NODES) if order else shown.head(MAP_NODES)
gpus = pl.DataFrame(fetch(collector, "/v1/gpus", node=",".join(shown["node"].to_list())).get("gpus") or [])
if gpus.height:
    st.subheader("GPUs")
    if shown.height < nodes.height:
        st.caption(f"{shown.height} of {nodes.height:,} nodes: " + (f"rack {md(rack)}" if rack and rack in racks else
                                                                   "those with the most GPUs unhealthy, down, degraded or hot"))
    has_health = "health" in gpus.columns and gpus["health"].null_count() < gpus.height
    measure = st.radio(  # health first, when the agents report it (older agents do not)
        "Colour by", ["health", "utilization", "temperature", "power"], index=0 if has_health else 1, horizontal=True,
        key="gpu_measure",
    )
    gpus = gpus.with_columns(
        pl.col("health").cast(pl.String).replace_strict({"healthy": 0, "degraded": 1, "unhealthy": 2}, default=None,
                                                        return_dtype=pl.Int64)
        .alias("health_level") if "health" in gpus.columns else pl.lit(None, pl.Int64).alias("health_level"))
    column, domain = {
        # Fixed scales, so a glance compares against what is normal, not against the neighbours.
        "health": ("health_level", [0, 2]),
        "utilization": ("utilization_ratio", [0, 1]),
        "temperature": ("temperature_celsius", [20, 95]),
        "power": ("power_watts", [0, max(700.0, float(gpus["power_watts"].max() or 0))]),
    }[measure]
    extra = [c for c in ("health", "health_reasons") if c in gpus.columns]
    heat = gpus.select("node", pl.col("index").cast(pl.String).alias("gpu"), column, "uuid", "name", *extra).to_pandas()
    chart = (
        alt.Chart(heat)
        .mark_rect(stroke="white")
        .encode(
            x=alt.X("gpu:O", title="GPU"),
            y=alt.Y("node:N", title="node"),
            color=alt.Color(f"{column}:Q", title=measure, scale=alt.Scale(scheme="orangered", domain=domain)),
            tooltip=["node", "gpu", column, "uuid", "name", *extra],
        )
    )
    st.altair_chart(chart.properties(height=max(120, 28 * shown.height)), width="stretch")

refresh()
