"""The Celery task: one job id in, the same job id out (no patient data in messages or logs)."""

from __future__ import annotations

import logging

from celery import Task
from celery.signals import worker_process_init

from disa.jobs.settings import get_settings
from disa.jobs.store import JobStore
from disa.worker.app import app
from disa.worker.config import TASK_NAME
from disa.worker.execute import TransientError, execute_job

log = logging.getLogger("disa.worker")

_store: JobStore | None = None


def _job_store() -> JobStore:
    """The job store of this worker process (made on first use, after fork)."""
    global _store
    if _store is None:
        _store = JobStore(get_settings().jobs_dir)
    return _store


@worker_process_init.connect
def _child_started(**_: object) -> None:
    """In each pool process, after fork: start from clean per-process state.

    The parent never runs a job, so no ONNX session or numba thread pool can
    have been inherited; the engine creates its extractor lazily in the child.
    Importing the engine here (not running it) spares the first job the import.
    """
    global _store
    _store = None
    import disa.registration.runner  # noqa: F401


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: str) -> str:
    """Run job `job_id` from the shared jobs folder; retry only on transient errors (shared
    storage failed, the DICOM unpack pool stayed full)."""
    settings = get_settings()
    settings.apply_unpack_pool()  # per process; the same values every time
    try:
        execute_job(_job_store(), job_id, settings)
    except TransientError as exc:
        # Backoff 5, 10, 20 ... s. The manifest's attempt count bounds the retries of
        # failed runs; max_retries those of failures before a run is recorded (lock,
        # manifest), which leave the job queued for the API's next start.
        countdown = min(120, 5 * 2**self.request.retries)
        raise self.retry(countdown=countdown, max_retries=settings.max_attempts + 1,
                         exc=exc) from None
    return job_id
