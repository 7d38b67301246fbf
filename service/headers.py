"""Security headers on every response, and honest `Allow` headers on 405 answers.

Every answer carries a content security policy: the web page and the API docs
their own (see `web`), everything else (JSON, images, files, static assets)
`default-src 'none'`, so nothing the API returns can run or load anything if a
browser opens it as a document.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The policy of every response that sets none of its own.
API_POLICY = "default-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
DEFAULT_HEADERS = {
    "Content-Security-Policy": API_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class SecurityHeaders:
    """ASGI middleware: adds DEFAULT_HEADERS to every HTTP response that lacks them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in DEFAULT_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of `app` answers at this path. Routes of one path with
    different methods are separate routes, and Starlette's 405 names only the first one's;
    here each method is tried against every route. Mounts (static files) answer their own
    405s and are left out."""
    routes = [route for route in app.router.routes if not isinstance(route, Mount)]
    return [method for method in _METHODS
            if any(route.matches({**scope, "method": method})[0] == Match.FULL
                   for route in routes)]


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's HTTP error answer, with a 405's `Allow` listing every method of the path."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        methods = allowed_methods(request.app, request.scope)
        if methods:
            exc = StarletteHTTPException(405, detail=f"method not allowed; allowed: "
                                                     f"{', '.join(methods)}",
                                         headers={**(exc.headers or {}),
                                                  "Allow": ", ".join(methods)})
    return await http_exception_handler(request, exc)
