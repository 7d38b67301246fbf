"""The web page: `/` serves static/index.html, `/static/` its scripts and styles.

Plain HTML, CSS and ES modules shipped in the package (no build step, no CDN);
the page talks to the /v1 API with the key the user typed (sessionStorage,
sent as X-API-Key).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

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
