"""Training: step time over time per job, and step-time quantiles per rank."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards.api import CollectorError, frames, page, refresh

collector = page("Training")
(jobs,) = frames(collector, ("/v1/jobs", "jobs"))

if jobs.height == 0:
    st.info("No training job has reported a step yet. Instrument one with `fleetscope.training(job=...)`.")
    st.stop()

job = st.selectbox("Job", jobs["job"].to_list(), key="job")
try:
    detail = collector.get(f"/v1/jobs/{job}")
    series = collector.frame(f"/v1/jobs/{job}/steps", "steps", last=1000)
except CollectorError as exc:
    st.error(str(exc))
    st.stop()

summary = detail.get("job", {})
cols = st.columns(4)
cols[0].metric("Ranks", summary.get("ranks"))
cols[1].metric("Last step", summary.get("last_step"))
p50 = summary.get("step_time_p50_s")
cols[2].metric("Step time p50", f"{p50:.3f} s" if p50 is not None else "–")
tps = summary.get("tokens_per_s")
cols[3].metric("Tokens/s", f"{tps:,.0f}" if tps is not None else "–")

job_findings = [f for f in collector.get("/v1/findings", job=job).get("findings", []) if f["active"]]
for f in job_findings:
    causes = ", ".join(c["cause"] for c in f.get("probable_causes", [])[:3])
    where = ", ".join(f"{k} {v}" for k, v in f["subject"].items() if k != "job" and v is not None)
    st.warning(f"**{f['kind']}** {where}: probable cause {causes or 'unknown'}")

st.subheader("Step time")
if series.height:
    st.line_chart(
        series.select("step", "step_time_p50_s", "step_time_p95_s", "step_time_max_s").to_pandas(),
        x="step",
        y=["step_time_p50_s", "step_time_p95_s", "step_time_max_s"],
        y_label="seconds",
    )

st.subheader("Ranks")
ranks = pl.DataFrame(detail.get("ranks") or [])
if ranks.height:
    st.dataframe(ranks, hide_index=True, width="stretch")

refresh()
