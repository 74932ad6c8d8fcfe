"""GET /v1/findings: what holds work back now (and what did recently), with probable causes; GET /v1/slos."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request

from collector.api.deps import RangeDep, ReadAuth

router = APIRouter(tags=["findings"], dependencies=[ReadAuth])


@router.get("/v1/findings")
def list_findings(
    request: Request,
    r: RangeDep,
    kind: str | None = Query(None, description="straggler, slow_node, hang, stopped, regression, slo_burn"),
    job: str | None = None,
    node: str | None = None,
    service: str | None = None,
    active: bool | None = Query(None, description="only active (true) or only resolved (false) findings"),
) -> dict:
    """Findings active at some time in [since, until] (default: now and the last hour's resolved ones)."""
    out = []
    for f in request.app.state.tracker.findings():
        if kind is not None and f.kind != kind:
            continue
        if active is not None and f.active != active:
            continue
        if r.until is not None and f.start_ts > r.until:
            continue
        if r.since is not None and not f.active and (f.resolved_ts or 0) < r.since:
            continue
        if any(value is not None and f.subject.get(key) != value for key, value in (("job", job), ("node", node), ("service", service))):
            continue
        out.append(f.to_dict())
    return {"findings": out}


@router.get("/v1/slos")
def list_slos(request: Request, r: RangeDep) -> dict:
    """Every declared SLO: burn rate per window and the error budget left; with `since`, also the share
    of bad requests and the burn rate over [since, until]."""
    report = request.app.state.ledger.report(time.time())
    if r.since is not None:
        since, until = r.resolve(0)
        ranges = {x["slo"]: x for x in request.app.state.ledger.over(since, until)}
        report = [{**s, "range": ranges.get(s["slo"])} for s in report]
    return {"slos": report, "as_of": time.time()}
