"""/healthz (the process answers) and /readyz (broker, storage and a worker are there)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from disa.service.deps import RuntimeDep
from disa.service.models import HealthOut, ReadinessOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the API process answers")
def healthz() -> HealthOut:
    return HealthOut()


@router.get("/readyz", response_model=ReadinessOut,
            summary="Readiness: broker reachable, jobs folder writable, a worker answering",
            responses={503: {"model": ReadinessOut, "description": "not ready; see checks"}})
def readyz(runtime: RuntimeDep) -> JSONResponse:
    ready = runtime.readiness()
    return JSONResponse(ready.model_dump(), status_code=200 if ready.status == "ready" else 503)
