"""Fixtures of the API tests: an app whose dispatcher only records ids (the phantom pair
files: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from disa.service import runtime as runtime_module
from disa.service.app import create_app

from .helpers import service_env, using_env


class RecordingDispatcher:
    """Stands in for Celery in API tests: remembers the ids it was given."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.workers = 1
        self.broker_up = True
        self.identity = "broker-1"

    def submit(self, job_id: str) -> None:
        if not self.broker_up:
            raise ConnectionError("broker down")
        self.sent.append(job_id)

    def broker_identity(self) -> str:
        if not self.broker_up:
            raise ConnectionError("broker down")
        return self.identity

    def worker_count(self) -> int:
        return self.workers

    def close(self) -> None:
        pass


@pytest.fixture
def dispatcher(monkeypatch: pytest.MonkeyPatch) -> RecordingDispatcher:
    recording = RecordingDispatcher()
    monkeypatch.setattr(runtime_module, "make_dispatcher", lambda store, settings: recording)
    return recording


@pytest.fixture
def make_client(tmp_path: Path, dispatcher: RecordingDispatcher
                ) -> Iterator[Callable[..., TestClient]]:
    """Factory: make_client(**settings) -> a TestClient (lifespan running) of a fresh app
    with the recording dispatcher and a fresh jobs folder. `raise_server_exceptions=False`
    shows unhandled errors as the client sees them instead of raising them in the test."""
    stack: list = []

    def make(raise_server_exceptions: bool = True, **settings: object) -> TestClient:
        env = service_env(tmp_path / "jobs", broker_url="redis://unused:1/0", **settings)
        ctx = using_env(env)
        ctx.__enter__()
        client = TestClient(create_app(), raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        stack.append((ctx, client))
        return client

    yield make
    for ctx, client in reversed(stack):
        client.__exit__(None, None, None)
        ctx.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()
