"""Fleet: every node and GPU, with utilisation, temperature and power."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from dashboards.api import frames, page, refresh

collector = page("Fleet")
nodes, gpus = frames(collector, ("/v1/nodes", "nodes"), ("/v1/gpus", "gpus"))

if nodes.height == 0:
    st.info("No node has reported yet. Start an agent with --collector-url pointing here.")
    st.stop()

STALE_S = 30
stale = nodes.filter(pl.col("age_s") > STALE_S)
health = gpus["health"].value_counts() if gpus.height and "health" in gpus.columns else pl.DataFrame({"health": [], "count": []})
count = {row["health"]: row["count"] for row in health.iter_rows(named=True)}
cols = st.columns(6)
cols[0].metric("Nodes", nodes.height)
cols[1].metric("Nodes not reporting", stale.height, help=f"no frame for more than {STALE_S} s")
cols[2].metric("GPUs", gpus.height)
cols[3].metric("GPUs healthy", count.get("healthy", 0))
cols[4].metric("GPUs degraded", count.get("degraded", 0))
cols[5].metric("GPUs unhealthy", count.get("unhealthy", 0), help="a GPU off the bus counts here too")

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

if gpus.height:
    st.subheader("GPUs")
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
    st.altair_chart(chart.properties(height=max(120, 28 * nodes.height)), width="stretch")

refresh()
