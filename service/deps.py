"""Shared route dependencies as Annotated aliases.

They are `async def` on purpose: they do no I/O, and FastAPI would run plain
`def` dependencies in its thread pool, one hop each, on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyHeader

from disa.service.runtime import Runtime
from disa.service.security import key_accepted
from disa.service.settings import Settings
from disa.service.store import JOB_ID_PATTERN, JobStore


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
                    key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """401 without a key, 403 with a wrong one; open when no keys are configured."""
    digests = settings.api_key_digests
    if not digests:
        return
    if not key:
        raise HTTPException(status_code=401, detail="missing API key: send it in X-API-Key",
                            headers={"WWW-Authenticate": "APIKey"})
    if not key_accepted(key, digests):
        raise HTTPException(status_code=403, detail="API key not accepted")


ApiKeyDep = Annotated[None, Depends(require_api_key)]

JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, min_length=32, max_length=32,
                                description="job id (32 lowercase hex digits)")]
