"""Request and response models of the HTTP API (version 1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from disa.jobs.manifest import ErrorKind, JobState, Manifest


class ErrorOut(BaseModel):
    """Every error response: one line a user can act on."""

    detail: str = Field(description="what went wrong")


class ProgressOut(BaseModel):
    stage: str = Field(description="engine stage: queued, read, preprocess, descriptors, search, "
                                   "refine, reorient, affine, write, done")
    fraction: float = Field(ge=0.0, le=1.0, description="fraction of the stage done")


class TimingsOut(BaseModel):
    queued_s: float | None = Field(None, description="from submission to the first start")
    run_s: float | None = Field(None, description="from the first start to the end")
    stages: dict[str, float] = Field(default_factory=dict,
                                     description="seconds per engine stage of the last run")


class JobOut(BaseModel):
    """A registration job as the API shows it."""

    id: str = Field(description="job id (32 hex digits)")
    owner: str | None = Field(
        None, description="the API key the job belongs to: its name, or 'sha256:' and a "
                          "prefix of its digest (never the key); null: made without a key")
    state: JobState
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: ProgressOut
    attempts: int = Field(description="runs started (more than 1 after a lost worker)")
    cancel_requested: bool = False
    options: dict[str, Any] = Field(description="registration options (engine names)")
    inputs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per input role: format, size, spacing, modality (header facts) and "
                    "geometry_correction (how a gantry-tilted or unevenly spaced DICOM series "
                    "is resampled onto an orthogonal grid, as in result.json; null if not); "
                    "for initial_transform: format and matrix_fixed_to_moving (4x4, LPS mm)")
    timings: TimingsOut
    result: dict[str, Any] | None = Field(
        None, description="summary of result.json (parameters, similarity, confidence, ...)")
    error: str | None = Field(None, description="why the job failed, for the user")
    error_kind: ErrorKind | None = Field(
        None, description="why the job failed, for programs: 'input' (its files or options "
                          "are at fault; resubmitting them unchanged fails again) or "
                          "'internal' (lost workers, storage errors, the time limit, a bug)")
    files: list[str] = Field(default_factory=list,
                             description="result files to GET under /v1/jobs/{id}/files/")

    @classmethod
    def from_manifest(cls, m: Manifest, cancel_requested: bool = False) -> JobOut:
        queued_s = (m.started_at - m.created_at).total_seconds() if m.started_at else None
        run_s = ((m.finished_at - m.started_at).total_seconds()
                 if m.started_at and m.finished_at else None)
        return cls(id=m.id, owner=m.owner, state=m.state, created_at=m.created_at,
                   updated_at=m.updated_at, started_at=m.started_at, finished_at=m.finished_at,
                   progress=ProgressOut(stage=m.progress.stage,
                                        fraction=min(1.0, max(0.0, m.progress.fraction))),
                   attempts=m.attempts, cancel_requested=cancel_requested, options=m.options,
                   inputs=m.input_info, timings=TimingsOut(queued_s=queued_s, run_s=run_s,
                                                           stages=m.stage_seconds),
                   result=m.result, error=m.error, error_kind=m.error_kind, files=m.files)


class JobListOut(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobOut]
    total: int = Field(description="jobs matching the filter")
    offset: int
    limit: int


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class CheckOut(BaseModel):
    ok: bool
    detail: str


class ReadinessOut(BaseModel):
    """Whether the service can accept and run jobs: broker, storage, workers."""

    status: Literal["ready", "not ready"]
    checks: dict[str, CheckOut]


#: Shared descriptions of error responses, for `responses=` on routes.
_ERRORS: dict[int, str] = {
    400: "malformed request (multipart body, form fields)",
    401: "missing API key (X-API-Key header)",
    403: "wrong API key",
    404: "no such job or file (another API key's job is not found either)",
    408: "the upload sent nothing for DISA_UPLOAD_IDLE_TIMEOUT_S seconds",
    409: "the job is not in a state that allows this",
    413: "upload larger than the configured limit",
    415: "not a multipart/form-data body",
    422: "invalid parameters, options or input images",
    429: "this API key has DISA_MAX_CONCURRENT_UPLOADS uploads in progress already",
    503: "busy: the server is unpacking too many DICOM zips at once (DISA_UNPACK_POOL_BYTES); "
         "send again after Retry-After seconds",
    507: "the jobs storage cannot take the upload (full, quota or I/O error)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these status codes, all with the shared error model."""
    return {code: {"model": ErrorOut, "description": _ERRORS[code]} for code in codes}
