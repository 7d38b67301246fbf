"""Real peers for the service and worker tests: a redis-server and Celery worker processes.

Nothing starts at import; a test gets these only by asking for the fixtures.
Redis runs on a free loopback port without persistence (--save "" --appendonly
no) in a temporary folder; workers are `celery -A disa.worker.app worker`
subprocesses with the DISA_ environment the test gives them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import free_port, write_pair


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cold_cache_first`` run before every other test: the warm-up test
    compiles into the suite's own numba cache while it is still empty (test_warm_up.py's
    ``_empty_cache`` says why), which only holds before anything else has run."""
    first = [item for item in items if item.get_closest_marker("cold_cache_first")]
    items[:] = first + [item for item in items if item not in first]


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny phantom pair (24^3 voxels of 4 mm, support.write_pair's motion) as .nii.gz."""
    return write_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(autouse=True)
def fresh_unpack_pool(monkeypatch: pytest.MonkeyPatch):
    """A process-wide DICOM unpack pool of the test's own: an app's or a worker's start
    configures the pool from its settings (size, wait, no /tmp fallback), which must not
    outlive the test."""
    from disa.core.io import dicom_zip

    pool = dicom_zip.UnpackPool(dicom_zip.DEFAULT_POOL_BYTES)
    monkeypatch.setattr(dicom_zip, "_POOL", pool)
    return pool


class RedisServer:
    """A private redis-server; restart() keeps the port and, lacking persistence, loses the data."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis(tmp: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(tmp)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (tests keep apart by queue and jobs folder)."""
    yield from _redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that restart it."""
    yield from _redis(tmp_path_factory.mktemp("redis-own"))


class WorkerProcess:
    """`celery -A disa.worker.app worker --pool prefork` in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, concurrency: int = 1) -> None:
        self.log = log
        name = f"test-{uuid.uuid4().hex[:8]}@localhost"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "disa.worker.app", "worker",
                 "--pool", "prefork", "-c", str(concurrency), "-Q", env["DISA_QUEUE"],
                 "-n", name, "--loglevel", "info", "--without-gossip", "--without-mingle",
                 "--without-heartbeat"],
                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log.read_text()[-3000:]}")
            if b" ready." in self.log.read_bytes():
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready:\n{self.log.read_text()[-3000:]}")

    def children(self) -> list[int]:
        """Pool process ids."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool) at once: no clean-up at all."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: start_worker(env, concurrency=1) -> a ready WorkerProcess; all are stopped
    when the test module ends (a test may stop or kill its own earlier)."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("workers")

    def start(env: dict[str, str], concurrency: int = 1) -> WorkerProcess:
        worker = WorkerProcess(env, logs / f"worker-{len(started)}.log", concurrency)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
