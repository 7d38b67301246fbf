"""Shared route dependencies as Annotated aliases.

They are `async def` on purpose: they do no I/O, and FastAPI would run plain
`def` dependencies in its thread pool, one hop each, on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyHeader

from disa.jobs.manifest import JOB_ID_PATTERN, JobNotFound, Manifest
from disa.jobs.settings import Settings
from disa.jobs.store import JobStore
from disa.service.runtime import Runtime
from disa.service.security import OPEN_CALLER, Caller, find_key


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings_dep(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Settings:
    return runtime.settings


async def get_store(runtime: Annotated[Runtime, Depends(get_runtime)]) -> JobStore:
    return runtime.store


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[JobStore, Depends(get_store)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="API key; required when the server lists keys")


async def require_api_key(settings: SettingsDep,
                          key: Annotated[str | None, Security(_api_key_header)]) -> Caller:
    """Who the request acts for: 401 without a key, 403 with a wrong one; when no keys are
    configured, everyone is the one open caller."""
    keys = settings.api_key_entries
    if not keys:
        return OPEN_CALLER
    if not key:
        raise HTTPException(status_code=401, detail="missing API key: send it in X-API-Key",
                            headers={"WWW-Authenticate": "APIKey"})
    found = find_key(key, keys)
    if found is None:
        raise HTTPException(status_code=403, detail="API key not accepted")
    return Caller(owner=found.owner, admin=found.admin)


CallerDep = Annotated[Caller, Depends(require_api_key)]


def read_visible(store: JobStore, job_id: str, caller: Caller) -> Manifest:
    """The manifest of a job the caller may see; 404 alike for an unknown job and for
    another key's job, so ids of other tenants' jobs cannot even be confirmed."""
    try:
        manifest = store.read(job_id)
    except JobNotFound:
        manifest = None
    if manifest is None or not caller.sees(manifest.owner):
        raise HTTPException(status_code=404, detail="no such job")
    return manifest

JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, min_length=32, max_length=32,
                                description="job id (32 lowercase hex digits)")]
