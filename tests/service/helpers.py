"""Helpers of the service tests: environments, a live uvicorn server, phantom files, waiting."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from disa.jobs.keys import key_digest
from disa.jobs.settings import get_settings

API_KEY = "test-key-5f0c"
#: A second tenant's key (named) and an operator's key (admin role).
OTHER_KEY = "other-key-91ab"
ADMIN_KEY = "admin-key-c3d7"
OTHER_OWNER, ADMIN_OWNER = "other", "ops"
TINY_OPTIONS = {"similarity": "mind", "starts": 10}


def service_env(jobs_dir: Path, broker_url: str | None = None, queue: str = "disa",
                **extra: Any) -> dict[str, str]:
    """DISA_ variables of a test deployment (API and workers alike)."""
    env = {"DISA_JOBS_DIR": str(jobs_dir), "DISA_QUEUE": queue, "DISA_SWEEP_INTERVAL_S": "0.5",
           "DISA_READY_CACHE_S": "0", "DISA_SOFT_TIME_LIMIT_S": "120",
           "DISA_HARD_TIME_LIMIT_S": "150", "DISA_API_KEYS": "", "DISA_BROKER_URL": "",
           # one numba thread per job: tests run jobs side by side on small machines
           "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if broker_url:
        env["DISA_BROKER_URL"] = broker_url
    env.update({f"DISA_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@contextlib.contextmanager
def using_env(env: dict[str, str]) -> Iterator[None]:
    """Apply `env` to this process and make get_settings() read it afresh."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()
    get_settings.cache_clear()


def api_key_env() -> dict[str, str]:
    """Three keys: API_KEY as a plain digest (the form older deployments list), OTHER_KEY
    named 'other', ADMIN_KEY named 'ops' with the admin role."""
    return {"DISA_API_KEYS": f"{key_digest(API_KEY)}, {OTHER_OWNER}={key_digest(OTHER_KEY)}, "
                             f"{ADMIN_OWNER}={key_digest(ADMIN_KEY)}:admin"}


class LiveServer:
    """The app on a real socket: uvicorn in a thread, lifespan included."""

    def __init__(self, app: Any, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                     log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)


@contextlib.contextmanager
def live_service(env: dict[str, str]) -> Iterator[str]:
    """The API app built under `env` (using_env), served on a free port; yields its URL."""
    from disa.service.app import create_app

    from ..support import free_port

    with using_env(env), LiveServer(create_app(), free_port()) as server:
        yield server.url


def open_tab(browser: Any, site: str, width: int = 1280) -> tuple[Any, Any]:
    """A fresh browser context (fresh sessionStorage) and a tab on the page, `width` px wide,
    with its page errors collected in `tab.errors`; the caller closes the context."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    tab = context.new_page()
    tab.errors = []
    tab.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    tab.goto(f"{site}/")
    tab.wait_for_selector("body[data-ready]")
    return context, tab


def enter_key(tab: Any, key: str) -> None:
    """Enter and save `key` on the page; returns once the job list has loaded with it."""
    with tab.expect_response(lambda r: "/v1/jobs?limit=" in r.url and r.status == 200):
        tab.fill("#api-key", key)
        tab.click("#key-save")


def click_pixel(tab: Any, canvas_selector: str, plane: dict[str, Any], column: int,
                row: int) -> None:
    """Click the centre of pixel (column, row) of a viewer plane drawn on a canvas (the
    canvas may be scaled: positions are in its displayed box), then wait for the point."""
    canvas = tab.locator(canvas_selector)
    box = canvas.bounding_box()
    canvas.click(position={"x": (column + 0.5) * box["width"] / plane["width"],
                           "y": (row + 0.5) * box["height"] / plane["height"]})
    tab.wait_for_selector("#point-info[data-fixed]")
