"""Training: step time over time per job, step-time quantiles per rank, and where the job's GPU-hours went."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards.api import BADPUT_COLORS, api_path, fetch, frames, goodput, md, page, refresh, since


def quantity(field: str) -> dict:
    return {"field": field, "type": "quantitative"}


collector = page("Training")
(jobs,) = frames(collector, ("/v1/jobs", "jobs", {"since": since()}))

if jobs.height == 0:
    st.info("No training job has reported a step yet. Instrument one with `fleetscope.training(job=...)`.")
    st.stop()

job = st.selectbox("Job", jobs["job"].to_list(), key="job")
detail = fetch(collector, api_path("v1", "jobs", job), since=since(), top=200)  # the ranks that computed longest
series = pl.DataFrame(fetch(collector, api_path("v1", "jobs", job, "steps"), since=since(), max_points=1000).get("steps") or [])

summary = detail.get("job", {})
spent, spent_series = goodput(collector, job)
cols = st.columns(6)
cols[0].metric("Ranks", summary.get("ranks"))
cols[1].metric("Last step", summary.get("last_step"))
p50 = summary.get("step_time_p50_s")
cols[2].metric("Step time p50", f"{p50:.3f} s" if p50 is not None else "–")
tps = summary.get("tokens_per_s")
cols[3].metric("Tokens/s", f"{tps:,.0f}" if tps is not None else "–")
mfu = summary.get("mfu")
cols[4].metric("MFU", f"{mfu:.0%}" if mfu is not None else "–", help="declare flops_per_token in fleetscope.training() to see it")
ratio = spent.get("goodput_ratio")
cols[5].metric("Goodput", f"{ratio:.1%}" if ratio is not None else "–",
               help="productive GPU time over all of the job's GPU time, across its restarts (see Goodput below)")

slurm_jobs = detail.get("slurm") or []
if slurm_jobs:  # the Slurm job that runs it now (the newest); all of them, one per incarnation, under Slurm below
    latest = slurm_jobs[-1]
    st.caption(f"Slurm job **{md(latest['slurm_job'])}** · user {md(latest.get('user') or '?')} · partition "
               f"{md(latest.get('partition') or '?')}" + (f" · {len(slurm_jobs)} Slurm jobs in all" if len(slurm_jobs) > 1 else ""))

job_findings = [f for f in fetch(collector, "/v1/findings", job=job, since=since()).get("findings", []) if f["active"]]
for f in job_findings:
    causes = ", ".join(md(c["cause"]) for c in f.get("probable_causes", [])[:3])
    where = ", ".join(f"{md(k)} {md(v)}" for k, v in f["subject"].items() if k != "job" and v is not None)
    st.warning(f"**{md(f['kind'])}** {where}: probable cause {causes or 'unknown'}")

st.subheader("Step time")
if series.height:
    # Vega-Lite specs written out, not built with Altair: Altair spends 30-50 ms a chart building its dict.
    step = {"field": "step", "type": "quantitative"}
    lines = series.select("step", "step_time_p50_s", "step_time_p95_s", "step_time_max_s")
    st.vega_lite_chart(lines, {"height": 260, "layer": [
        {"mark": {"type": "area", "opacity": 0.3}, "encoding": {
            "x": {**step, "title": "step"}, "y": {**quantity("step_time_p50_s"), "title": "seconds"},
            "y2": {"field": "step_time_p95_s"}}},
        {"mark": {"type": "line"}, "encoding": {"x": step, "y": quantity("step_time_p50_s")}},
        {"mark": {"type": "line", "color": "firebrick", "strokeDash": [4, 3]},
         "encoding": {"x": step, "y": quantity("step_time_max_s")}}]}, width="stretch")
    st.caption("Line: median over ranks; band: median to 95th percentile; dashed: the slowest rank.")

st.subheader("Ranks over time")
answer = fetch(collector, api_path("v1", "jobs", job, "matrix"), last=100)
matrix = pl.DataFrame(answer.get("cells") or [])
if matrix.height:
    if answer.get("ranks_shown", 0) < answer.get("ranks_total", 0):
        st.caption(f"The {answer['ranks_shown']} of {answer['ranks_total']:,} ranks that computed longest.")
    st.vega_lite_chart(matrix, {"height": max(160, 8 * matrix["rank"].n_unique()), "mark": {"type": "rect"}, "encoding": {
        "x": {"field": "step", "type": "ordinal", "title": "step", "axis": {"labelOverlap": True}},
        "y": {"field": "rank", "type": "ordinal", "title": "rank"},
        "color": {**quantity("relative"), "title": "compute / median",
                  "scale": {"scheme": "redyellowblue", "reverse": True, "domain": [0.9, 1.2], "clamp": True}},
        "tooltip": [quantity("rank"), {"field": "node", "type": "nominal"}, quantity("step"), quantity("compute_s"),
                    quantity("relative")]}}, width="stretch")

st.subheader("Ranks")
ranks = pl.DataFrame(detail.get("ranks") or [])
if ranks.height:
    if ranks.height < (detail.get("ranks_total") or 0):
        st.caption(f"The {ranks.height:,} of {detail['ranks_total']:,} ranks that computed longest.")
    pods = pl.DataFrame(detail.get("pods") or [])
    if pods.height:  # on Kubernetes: each rank's pod (verified: read by the agent, not only claimed by the client)
        ranks = ranks.join(pods.select("rank", "namespace", "pod", "container", "verified"), on="rank", how="left")
    st.dataframe(ranks, hide_index=True, width="stretch")

st.subheader("Goodput")
if spent_series.height:
    reasons = [r for r in BADPUT_COLORS if spent_series.filter(pl.col("reason") == r)["gpu_hours"].sum() > 0]
    st.vega_lite_chart(spent_series.filter(pl.col("reason").is_in(reasons)), {
        "height": 240, "mark": {"type": "area"},
        "transform": [{"calculate": f"indexof({reasons!r}, datum.reason)", "as": "order"}],
        "encoding": {
            "x": {"field": "time", "type": "temporal", "title": None},
            "y": {**quantity("gpu_hours"), "stack": True, "title": "GPU-hours"},
            "color": {"field": "reason", "type": "nominal", "title": None, "sort": reasons,
                      "scale": {"domain": reasons, "range": [BADPUT_COLORS[r] for r in reasons]}},
            "order": quantity("order"),
            "tooltip": [{"field": "time", "type": "temporal"}, {"field": "reason", "type": "nominal"},
                        {**quantity("gpu_hours"), "format": ".3f"}]}}, width="stretch")
    seconds = spent.get("gpu_seconds") or {}
    total = spent.get("total_gpu_seconds") or 0.0
    st.dataframe(pl.DataFrame({"reason": list(seconds), "gpu_hours": [v / 3600 for v in seconds.values()],
                               "share": [v / total if total else None for v in seconds.values()]}),
                 hide_index=True, width="stretch")
    st.caption("GPU time of the job's whole life by where it went: productive steps, steps recomputed after a restore, "
               "checkpoint saves, start-up and restarts, hangs, other declared pauses, data-loader stalls and "
               "waiting for stragglers. Each restart of the job is one incarnation:")
    st.dataframe(pl.DataFrame(spent.get("incarnations") or []), hide_index=True, width="stretch")

if slurm_jobs:
    st.subheader("Slurm")
    st.caption("The Slurm jobs whose processes reported this job's steps, oldest first: a new sbatch is a new job id, "
               "a requeue keeps the id and counts restarts; steps are srun launches.")
    table = pl.DataFrame(slurm_jobs).with_columns(
        pl.col("steps").list.join(", "), pl.col("nodes").list.join(", "),
        (pl.col("first_step_ts") * 1000).cast(pl.Int64).cast(pl.Datetime("ms")).alias("first_step"),
        (pl.col("last_step_end_ts") * 1000).cast(pl.Int64).cast(pl.Datetime("ms")).alias("last_step_end"),
    ).drop("first_step_ts", "last_step_end_ts")
    st.dataframe(table, hide_index=True, width="stretch")

refresh()
