"""Findings: stragglers, slow nodes, hangs, regressions and SLO burn, with their probable causes."""

from __future__ import annotations

import os
import time

import httpx
import streamlit as st

from dashboards.api import fetch, md, page, refresh, since

collector = page("Findings")
findings = fetch(collector, "/v1/findings", since=since()).get("findings", [])
slos = fetch(collector, "/v1/slos").get("slos", [])

active = [f for f in findings if f["active"]]
cols = st.columns(3)
cols[0].metric("Active findings", len(active))
cols[1].metric("Paging", sum(1 for f in active if f["severity"] == "page"))
cols[2].metric("Resolved in the last hour", len(findings) - len(active))

if not findings:
    st.success("Nothing holds work back right now.")
for f in findings:
    subject = ", ".join(f"{md(k)} {md(v)}" for k, v in f["subject"].items() if v is not None)
    age = time.time() - f["start_ts"]
    # Plain words, not emoji: consoles on servers often lack an emoji font.
    title = f"{md(f['severity'].upper())} · {md(f['kind'])}: {subject} (since {age / 60:.0f} min)"
    if not f["active"]:
        title = f"resolved · {md(f['kind'])}: {subject}"
    with st.expander(title, expanded=f["active"]):
        causes = f.get("probable_causes") or []
        if causes:
            st.markdown("**Probable causes**: " + ", ".join(f"{md(c['cause'])} ({c['score']:.2f})" for c in causes))
        st.json({"evidence": f["evidence"], "probable_causes": causes}, expanded=False)

am_url = os.environ.get("FLEETSCOPE_ALERTMANAGER_URL")
if am_url:
    st.subheader("Firing in Alertmanager")
    try:
        firing = httpx.get(am_url.rstrip("/") + "/api/v2/alerts", params={"active": "true", "silenced": "false",
                                                                           "inhibited": "false"}, timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        st.warning(f"cannot read Alertmanager at {am_url}: {exc}")
        firing = []
    if firing:
        st.dataframe([{"alert": a["labels"].get("alertname"), "severity": a["labels"].get("severity"),
                       "summary": a["annotations"].get("summary"), "since": a.get("startsAt")} for a in firing],
                     hide_index=True, width="stretch")
    else:
        st.success("Nothing is firing.")

if slos:
    st.subheader("SLOs")
    st.dataframe(
        [{"slo": s["slo"], "service": s["service"], "objective": s["objective"],
          "budget left": round(s["error_budget_remaining_ratio"], 4),
          **{f"burn {w}": round(v, 2) for w, v in s["burn_rate"].items()}} for s in slos],
        hide_index=True, width="stretch",
    )

refresh()
