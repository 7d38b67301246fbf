"""The web page: `/` serves static/index.html (and `/jobs/{id}`, a job's result view, the
same file), `/static/` its scripts and styles; `/docs` the interactive API docs.

Plain HTML, CSS and ES modules shipped in the package (no build step, no CDN);
the page talks to the /v1 API with the key the user typed (sessionStorage,
sent as X-API-Key). The API docs are Swagger UI, whose files come from the
fastapi-offline package and are served from `/docs-assets/` (FastAPI's own
/docs loads them from a CDN); both pages carry a content security policy.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from disa.service.deps import JobIdPath

log = logging.getLogger("disa.service")

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: The page loads only its own files and talks only to its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: The API docs: Swagger UI's own files (no inline script or style; it draws icons from
#: data: URLs). Requests, "Try it out" included, go to this origin only.
DOCS_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'none'"),
}
DOCS_PATH = "/docs"
DOCS_ASSETS_PATH = "/docs-assets"


def docs_assets_dir() -> Path | None:
    """Swagger UI's files as the fastapi-offline package ships them, or None."""
    try:
        folder = Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def install(app: FastAPI) -> None:
    """Add the page (`/`) and its assets (`/static/...`) to the app; not in the OpenAPI schema.

    An installation without the static files (package data missing) still serves the API.
    """
    if not (STATIC_DIR / "index.html").is_file():
        log.warning("web page files not found in %s: serving the API only", STATIC_DIR)
        return
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers=PAGE_HEADERS)

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def result_page(job_id: JobIdPath) -> FileResponse:
        """A job's result view: the same page, which opens the job named in its address
        (a link to share or bookmark; the data still needs the API key)."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers=PAGE_HEADERS)

    _install_docs(app)


def _install_docs(app: FastAPI) -> None:
    """`/docs`: Swagger UI from this server's own files (never a CDN)."""
    assets = docs_assets_dir()
    if assets is None:
        log.warning("Swagger UI files (package fastapi-offline) not found: no %s page",
                    DOCS_PATH)
        return
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=assets), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html",
                            headers=DOCS_HEADERS)
