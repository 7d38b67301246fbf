"""/metrics in the Prometheus text format (jobs by state, stage durations, queue wait)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from disa.service.deps import RuntimeDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                             "description": "text exposition format"}})
def metrics(runtime: RuntimeDep) -> Response:
    runtime.refresh_metrics_if_stale()
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
