"""Training: step time over time per job, and step-time quantiles per rank."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from dashboards.api import api_path, fetch, frames, md, page, refresh, since

collector = page("Training")
(jobs,) = frames(collector, ("/v1/jobs", "jobs", {"since": since()}))

if jobs.height == 0:
    st.info("No training job has reported a step yet. Instrument one with `fleetscope.training(job=...)`.")
    st.stop()

job = st.selectbox("Job", jobs["job"].to_list(), key="job")
detail = fetch(collector, api_path("v1", "jobs", job), since=since(), top=200)  # the ranks that computed longest
series = pl.DataFrame(fetch(collector, api_path("v1", "jobs", job, "steps"), since=since(), max_points=1000).get("steps") or [])

summary = detail.get("job", {})
cols = st.columns(5)
cols[0].metric("Ranks", summary.get("ranks"))
cols[1].metric("Last step", summary.get("last_step"))
p50 = summary.get("step_time_p50_s")
cols[2].metric("Step time p50", f"{p50:.3f} s" if p50 is not None else "–")
tps = summary.get("tokens_per_s")
cols[3].metric("Tokens/s", f"{tps:,.0f}" if tps is not None else "–")
mfu = summary.get("mfu")
cols[4].metric("MFU", f"{mfu:.0%}" if mfu is not None else "–", help="declare flops_per_token in fleetscope.training() to see it")

job_findings = [f for f in fetch(collector, "/v1/findings", job=job, since=since()).get("findings", []) if f["active"]]
for f in job_findings:
    causes = ", ".join(md(c["cause"]) for c in f.get("probable_causes", [])[:3])
    where = ", ".join(f"{md(k)} {md(v)}" for k, v in f["subject"].items() if k != "job" and v is not None)
    st.warning(f"**{md(f['kind'])}** {where}: probable cause {causes or 'unknown'}")

st.subheader("Step time")
if series.height:
    frame = series.select("step", "step_time_p50_s", "step_time_p95_s", "step_time_max_s").to_pandas()
    band = alt.Chart(frame).mark_area(opacity=0.3).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("step_time_p50_s:Q", title="seconds"), y2="step_time_p95_s:Q")
    median = alt.Chart(frame).mark_line().encode(x="step:Q", y="step_time_p50_s:Q")
    worst = alt.Chart(frame).mark_line(strokeDash=[4, 3], color="firebrick").encode(x="step:Q", y="step_time_max_s:Q")
    st.altair_chart((band + median + worst).properties(height=260), width="stretch")
    st.caption("Line: median over ranks; band: median to 95th percentile; dashed: the slowest rank.")

st.subheader("Ranks over time")
answer = fetch(collector, api_path("v1", "jobs", job, "matrix"), last=100)
matrix = pl.DataFrame(answer.get("cells") or [])
if matrix.height:
    if answer.get("ranks_shown", 0) < answer.get("ranks_total", 0):
        st.caption(f"The {answer['ranks_shown']} of {answer['ranks_total']:,} ranks that computed longest.")
    heat = alt.Chart(matrix.to_pandas()).mark_rect().encode(
        x=alt.X("step:O", title="step", axis=alt.Axis(labelOverlap=True)),
        y=alt.Y("rank:O", title="rank"),
        color=alt.Color("relative:Q", title="compute / median", scale=alt.Scale(scheme="redyellowblue", reverse=True,
                                                                                 domain=[0.9, 1.2], clamp=True)),
        tooltip=["rank", "node", "step", "compute_s", "relative"],
    )
    st.altair_chart(heat.properties(height=max(160, 8 * matrix["rank"].n_unique())), width="stretch")

st.subheader("Ranks")
ranks = pl.DataFrame(detail.get("ranks") or [])
if ranks.height:
    if ranks.height < (detail.get("ranks_total") or 0):
        st.caption(f"The {ranks.height:,} of {detail['ranks_total']:,} ranks that computed longest.")
    st.dataframe(ranks, hide_index=True, width="stretch")

refresh()
