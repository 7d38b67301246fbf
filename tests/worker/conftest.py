"""Fixtures of the worker tests: a job store with jobs ready to run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from disa.jobs.manifest import Manifest, new_job_id, now
from disa.jobs.settings import Settings
from disa.jobs.store import JobStore


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(jobs_dir=tmp_path / "jobs", max_attempts=3, soft_time_limit_s=60,
                    hard_time_limit_s=90)


@pytest.fixture
def make_job(store: JobStore, pair_files: tuple[Path, Path]) -> Callable[..., str]:
    """Factory: make_job(options=...) -> id of a queued job holding the phantom pair
    (and, given its text, an initial transform stored as the API stores one)."""

    def make(options: dict | None = None, moving_bytes: bytes | None = None,
             initial_transform: bytes | None = None) -> str:
        job_id = new_job_id()
        inputs = store.create_incoming(job_id) / "inputs"
        (inputs / "fixed.nii.gz").write_bytes(pair_files[0].read_bytes())
        (inputs / "moving.nii.gz").write_bytes(moving_bytes or pair_files[1].read_bytes())
        roles = {"fixed": "inputs/fixed.nii.gz", "moving": "inputs/moving.nii.gz"}
        if initial_transform is not None:
            (inputs / "initial_transform.tfm").write_bytes(initial_transform)
            roles["initial_transform"] = "inputs/initial_transform.tfm"
        t = now()
        store.publish(Manifest(id=job_id, created_at=t, updated_at=t, inputs=roles,
                               options=options or {"similarity": "mind", "starts": 10}))
        return job_id

    return make


def deployment_env(jobs_dir: Path, broker_url: str, queue: str) -> dict[str, str]:
    """DISA_ variables shared by the API and the worker processes of a test deployment."""
    return {"DISA_JOBS_DIR": str(jobs_dir), "DISA_BROKER_URL": broker_url, "DISA_QUEUE": queue,
            "DISA_SWEEP_INTERVAL_S": "0.3", "DISA_READY_CACHE_S": "0", "DISA_API_KEYS": "",
            "DISA_SOFT_TIME_LIMIT_S": "120", "DISA_HARD_TIME_LIMIT_S": "150",
            "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def apply_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], None]:
    """apply_env(env): set the variables in this process and re-read the settings."""
    from disa.jobs.settings import get_settings

    def apply(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    yield apply
    get_settings.cache_clear()
