"""Node: one node's GPUs, CPU and memory over time, its GPUs' health events (throttling, XIDs, ECC), and
each GPU's reliability record over weeks: what an operator reads before an RMA or a cordon."""

from __future__ import annotations

import polars as pl
import streamlit as st

import time

from dashboards.api import api_path, fetch, frames, line_chart, page, refresh, since

collector = page("Node")
(nodes,) = frames(collector, ("/v1/nodes", "nodes", {"fields": "node"}))
if nodes.height == 0:
    st.info("No node has reported yet.")
    st.stop()

node = st.selectbox("Node", nodes["node"].to_list(), key="node")
data = fetch(collector, api_path("v1", "nodes", node, "series"), since=since(), max_points=200)  # a chart is a few hundred px wide
latest = fetch(collector, api_path("v1", "nodes", node)).get("gpus", [])

host = pl.DataFrame(data.get("host") or [])
gpus = pl.DataFrame(data.get("gpus") or [])
cols = st.columns(3)
cols[0].metric("GPUs", len(latest))
cols[1].metric("GPUs not healthy", sum(1 for g in latest if g.get("health") not in (None, "healthy")))
cols[2].metric("Frames in range", host.height)

if gpus.height:
    gpus = gpus.with_columns(pl.col("index").cast(pl.String).alias("gpu"))
    left, right = st.columns(2)
    with left:
        st.subheader("GPU utilisation")
        line_chart(gpus, "utilization_ratio", color="gpu")
    with right:
        st.subheader("GPU temperature")
        line_chart(gpus, "temperature_celsius", color="gpu", title="°C")
if host.height:
    host = host.with_columns((pl.col("memory_used_bytes") / pl.col("memory_total_bytes")).alias("memory_used_ratio"))
    st.subheader("CPU and memory")
    line_chart(host, ["cpu_utilization_ratio", "memory_used_ratio"])
    left, right = st.columns(2)
    with left:
        st.subheader("Network (bytes/s)")
        line_chart(host, ["network_receive_bytes_per_second", "network_transmit_bytes_per_second"])
    with right:
        st.subheader("Disks (bytes/s)")
        line_chart(host, ["disk_read_bytes_per_second", "disk_written_bytes_per_second"])

st.subheader("GPUs now")
if latest:
    st.dataframe(pl.DataFrame(latest).select(
        [c for c in ("index", "uuid", "name", "health", "health_reasons", "utilization_ratio", "temperature_celsius",
                     "power_watts", "xid_total") if c in pl.DataFrame(latest).columns]), hide_index=True, width="stretch")

st.subheader("Health events")
events = pl.DataFrame(data.get("events") or [])
if events.height:
    st.dataframe(events.with_columns(pl.from_epoch(pl.col("from_ts"), time_unit="s").alias("from"),
                                     pl.from_epoch(pl.col("to_ts"), time_unit="s").alias("to")).drop("from_ts", "to_ts"),
                 hide_index=True, width="stretch")
else:
    st.success("No throttling, XID or ECC event in the time range.")

st.subheader("Reliability record")
days = st.selectbox("Over the last", [7, 30, 90], index=1, format_func=lambda d: f"{d} days", key="history_days")
history = fetch(collector, api_path("v1", "nodes", node, "history"), since=time.time() - days * 86400)
records = history.get("gpus") or []
if records:
    totals = history["totals"]
    cols = st.columns(4)
    cols[0].metric("XIDs", totals["xids_total"], help=", ".join(f"XID {c}: {n}" for c, n in totals["xids_by_code"].items()) or None)
    cols[1].metric("Uncorrected ECC errors", totals["ecc_uncorrected"])
    cols[2].metric("Hours unhealthy", round(totals["unhealthy_seconds"] / 3600, 1))
    cols[3].metric("Hours throttled", round(sum(totals["throttle_seconds"].values()) / 3600, 1))
    st.dataframe([{
        "GPU": r["index"], "uuid": r["uuid"],
        "XIDs by code": ", ".join(f"{c}×{n}" for c, n in r["xids_by_code"].items()),
        "ECC corrected": r["ecc_corrected"], "ECC uncorrected": r["ecc_uncorrected"],
        "row remap pending": r["row_remap_pending_seen"], "row remap failed": r["row_remap_failure_seen"],
        **{f"{reason} (min)": round(sec / 60, 1) for reason, sec in r["throttle_seconds"].items()},
        "unhealthy (min)": round(r["unhealthy_seconds"] / 60, 1), "off the bus (min)": round(r["lost_seconds"] / 60, 1),
        "observed (h)": round(r["observed_seconds"] / 3600, 1),
    } for r in records], hide_index=True, width="stretch")
else:
    st.info("No GPU samples from this node in that period.")

refresh()
