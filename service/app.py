"""The FastAPI app: `uvicorn disa.service.app:app` or `disa serve`.

Nothing is read at import: the lifespan reads the settings, opens the job
store, starts the dispatcher (Celery or the embedded worker), requeues the
jobs accepted but not finished, and starts the periodic sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from disa import __version__
from disa.jobs.settings import get_settings
from disa.service import routes_health, routes_jobs, routes_metrics, routes_viewer, web
from disa.service.headers import DEFAULT_HEADERS, SecurityHeaders, http_error
from disa.service.runtime import Runtime
from disa.service.validation import describe_all

API_PREFIX = "/v1"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = await asyncio.to_thread(Runtime.start, get_settings())
    app.state.runtime = runtime
    try:
        await asyncio.to_thread(runtime.startup)
        sweeper = asyncio.create_task(runtime.sweep_forever(), name="disa-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
    finally:
        await asyncio.to_thread(runtime.close)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """Request validation errors as the shared error model: one line in `detail`."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": describe_all(exc.errors()) or "invalid request"},
                        status_code=422)


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """Any unhandled exception as the shared error model rather than Starlette's text/plain
    500: its type only (no paths or data reach the client). Starlette raises the exception
    again after this answer, so the server still logs the traceback."""
    # Starlette answers this one outside every middleware, SecurityHeaders included.
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500,
                        headers=DEFAULT_HEADERS)


def _operation_id(route: APIRoute) -> str:
    """Operation ids clients can live with: 'jobs-submit_job' rather than a path mangle."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app() -> FastAPI:
    """A new app (tests make several; each gets its own runtime in its lifespan)."""
    app = FastAPI(
        title="DISA registration service",
        version=__version__,
        summary="Multimodal 3D image registration jobs (rigid/affine) over HTTP",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        # FastAPI's docs pages load their scripts from a CDN: web.install serves /docs
        # from the package's own files instead (and no ReDoc).
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(routes_health.router)
    app.include_router(routes_metrics.router)
    app.include_router(routes_jobs.router, prefix=API_PREFIX)
    app.include_router(routes_viewer.router, prefix=API_PREFIX)
    web.install(app)
    _use_shared_error_model(app)
    return app


def _use_shared_error_model(app: FastAPI) -> None:
    """FastAPI documents 422 with its own list-shaped model; ours is {"detail": str}."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                response = operation.get("responses", {}).get("422")
                if response is not None:
                    response["content"] = {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorOut"}}}
                    response.setdefault("description", "invalid request")
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


app = create_app()
