"""The embedded worker (`disa serve` without a broker): retries of storage errors."""

from __future__ import annotations

import logging
from pathlib import Path

from disa.jobs.manifest import Manifest, new_job_id, now
from disa.jobs.settings import Settings
from disa.jobs.store import JobStore
from disa.service.dispatch import EmbeddedDispatcher

from ..support import wait_until
from .helpers import TINY_OPTIONS


def _queued_job(store: JobStore, pair_files: tuple[Path, Path]) -> str:
    job_id = new_job_id()
    inputs = store.create_incoming(job_id) / "inputs"
    for role, path in zip(("fixed", "moving"), pair_files, strict=True):
        (inputs / f"{role}.nii.gz").write_bytes(path.read_bytes())
    t = now()
    store.publish(Manifest(id=job_id, created_at=t, updated_at=t, options=TINY_OPTIONS,
                           inputs={"fixed": "inputs/fixed.nii.gz",
                                   "moving": "inputs/moving.nii.gz"}))
    return job_id


def test_a_storage_error_before_the_run_is_retried_by_the_embedded_worker(
        tmp_path, pair_files, caplog):
    """The job's lock cannot be opened at first (a folder in its place: EISDIR). The job
    is still 'queued', which no sweep sends again: the worker's own retry must run it."""
    caplog.set_level(logging.INFO, logger="disa")
    store = JobStore(tmp_path / "jobs")
    settings = Settings(jobs_dir=store.root, soft_time_limit_s=120, hard_time_limit_s=150)
    job_id = _queued_job(store, pair_files)
    lock = store.job_dir(job_id) / ".lock"
    lock.mkdir()
    dispatcher = EmbeddedDispatcher(store, settings)
    try:
        dispatcher.submit(job_id)
        first = wait_until(lambda: [r for r in caplog.records if job_id in r.getMessage()],
                           30, "the first try")
        assert "retried later" in first[0].getMessage(), first[0].getMessage()
        lock.rmdir()  # storage is back before the retry (1 s later)
        wait_until(lambda: store.read(job_id).state == "succeeded", 180, "the retried run")
        assert store.read(job_id).attempts == 1
    finally:
        dispatcher.close()


def test_the_embedded_worker_stops_retrying_a_job_whose_storage_keeps_failing(
        tmp_path, pair_files, caplog):
    """Failures before a run is recorded cannot use up the job's attempts: the worker
    bounds its retries itself (max_attempts + 1, as the Celery task), so one broken job
    folder cannot hold the only embedded worker for ever."""
    caplog.set_level(logging.INFO, logger="disa")
    store = JobStore(tmp_path / "jobs")
    settings = Settings(jobs_dir=store.root, max_attempts=1, soft_time_limit_s=120,
                        hard_time_limit_s=150)
    job_id = _queued_job(store, pair_files)
    (store.job_dir(job_id) / ".lock").mkdir()  # never fixed
    dispatcher = EmbeddedDispatcher(store, settings)
    try:
        dispatcher.submit(job_id)
        wait_until(lambda: any("storage kept failing" in r.getMessage()
                               for r in caplog.records), 30, "the worker to give up")
        tries = [r for r in caplog.records if "retried later" in r.getMessage()]
        assert len(tries) == 3  # the first try and two retries (1 s, then 2 s later)
        assert store.read(job_id).state == "queued"
    finally:
        dispatcher.close()
