"""A job's record and states: manifest.json, as the API and the workers read and write it.

A new field of a job goes on Manifest (with a default, so that manifests of older
versions still load); the API's view of it is disa.service.models.JobOut. The
file itself is written and read by disa.jobs.store, under the job's lock.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from disa.core.errors import DisaError

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Why a job failed, for programs: "input" (its files or options; resubmitting them
#: as they are fails again) or "internal" (the service: lost workers, storage, time limit).
ErrorKind = Literal["input", "internal"]
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)


class JobNotFound(DisaError, LookupError):
    """No job with this id (or the id is not a well-formed job id)."""


class Progress(BaseModel):
    """Where a job is: the engine's stage name and the fraction of it done (0..1)."""

    stage: str = "queued"
    fraction: float = 0.0


class Manifest(BaseModel):
    """The record of one job (manifest.json). Times are UTC."""

    format: Literal["disa-job/1"] = "disa-job/1"
    id: str
    #: the API key the job belongs to, as its owner name (keys.ApiKey.owner: the key's
    #: name or a prefix of its digest, never the key); None: made without authentication
    owner: str | None = None
    state: JobState = "queued"
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    #: role (fixed, moving, fixed_mask, moving_mask, initial_transform) -> path relative
    #: to the job folder
    inputs: dict[str, str]
    #: role -> header facts (format, size, spacing); no names, no DICOM UIDs
    input_info: dict[str, dict[str, Any]] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    #: role (fixed, moving) -> chosen SeriesInstanceUID of a multi-series DICOM zip
    series: dict[str, str] = Field(default_factory=dict)
    attempts: int = 0
    #: seconds spent in each engine stage of the last run
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    files: list[str] = Field(default_factory=list)
    error: str | None = None
    #: set with `error` when the job failed (absent in manifests of older versions)
    error_kind: ErrorKind | None = None


def now() -> datetime:
    """The current time, UTC, timezone-aware."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex digits (uuid4)."""
    return uuid.uuid4().hex


def is_job_id(name: str) -> bool:
    """True if `name` is a well-formed job id (a folder name under the jobs folder)."""
    return isinstance(name, str) and _JOB_ID.fullmatch(name) is not None


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it is well-formed, else raise JobNotFound.

    Every path under the jobs folder is built from a checked id, so no URL can
    reach outside it.
    """
    if not is_job_id(job_id):
        raise JobNotFound(job_id)
    return job_id
