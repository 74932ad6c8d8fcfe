"""GET /v1/findings: what holds work back now (and what did in the last hour), with probable causes."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from collector.api.deps import ReadAuth

router = APIRouter(tags=["findings"], dependencies=[ReadAuth])


@router.get("/v1/findings")
def list_findings(
    request: Request,
    kind: str | None = Query(None, description="straggler, slow_node, hang, stopped, regression"),
    job: str | None = None,
    node: str | None = None,
    service: str | None = None,
    active: bool | None = Query(None, description="only active (true) or only resolved (false) findings"),
) -> dict:
    out = []
    for f in request.app.state.tracker.findings():
        if kind is not None and f.kind != kind:
            continue
        if active is not None and f.active != active:
            continue
        if any(value is not None and f.subject.get(key) != value for key, value in (("job", job), ("node", node), ("service", service))):
            continue
        out.append(f.to_dict())
    return {"findings": out}


@router.get("/v1/slos")
def list_slos(request: Request) -> dict:
    """Every declared SLO: burn rate per window and the error budget left."""
    return {"slos": request.app.state.tracker.slo_report}
