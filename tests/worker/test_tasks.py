"""The Celery task around execute_job: which failures Celery retries."""

from __future__ import annotations

from disa.jobs.settings import get_settings
from disa.service.dispatch import CeleryDispatcher

from ..support import wait_until
from .conftest import deployment_env


def test_a_storage_error_before_the_run_is_retried_and_the_job_runs(
        redis_server, start_worker, apply_env, store, make_job):
    """The job's lock cannot be opened when the first delivery arrives (a folder in its
    place: EISDIR, as from failing shared storage). The manifest still says 'queued', which
    no sweep sends again, so Celery's retry must bring the job back."""
    env = {**deployment_env(store.root, redis_server.url, "retry-start"),
           "DISA_SWEEP_INTERVAL_S": "3600"}
    apply_env(env)
    worker = start_worker(env)
    job_id = make_job()
    lock = store.job_dir(job_id) / ".lock"
    lock.mkdir()
    dispatcher = CeleryDispatcher(get_settings())
    try:
        dispatcher.submit(job_id)
        task = f"disa.run_job[{job_id}]"

        def outcome() -> str | None:
            lines = [line for line in worker.log.read_text().splitlines()
                     if task in line and ("retry" in line or "raised" in line)]
            return lines[0] if lines else None

        first = wait_until(outcome, 60, "the first delivery to end")
        assert "retry" in first, first  # not "raised unexpected: OSError"
        lock.rmdir()  # storage is back before the retry (5 s later)
        wait_until(lambda: store.read(job_id).state == "succeeded", 120, "the retried run")
        assert store.read(job_id).attempts == 1
    finally:
        dispatcher.close()
