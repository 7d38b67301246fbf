"""How the API hands a job id to a worker: Celery over Redis, or an embedded thread.

Both implementations run the same job function (`disa.worker.execute`); the
job folder is the record, so a message lost here is recovered by a requeue.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from disa.jobs.settings import Settings
from disa.jobs.store import JobStore

log = logging.getLogger("disa.service")


class Dispatcher(Protocol):
    """Sends job ids to workers and answers the readiness questions about them."""

    def submit(self, job_id: str) -> None:
        """Queue a job id (raises on broker failure; the job stays queued in the store)."""

    def broker_identity(self) -> str:
        """An id of the running broker instance (changes when it restarts); raises if down."""

    def worker_count(self) -> int:
        """Workers that answer now (0 if none)."""

    def close(self) -> None:
        """Stop: release connections, stop embedded threads."""


class EmbeddedDispatcher:
    """One background thread consuming a local queue: `disa serve` without Redis.

    The hard time limit cannot be enforced on a thread; the soft limit is, by
    the engine's cooperative cancel(). On shutdown the running job is
    interrupted and goes back to 'queued', so the next start resumes it.
    """

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._stop = threading.Event()
        self._pending: set[str] = set()
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disa-embedded")
        self._identity = f"embedded-{time.time_ns()}"

    def submit(self, job_id: str) -> None:
        with self._guard:
            if job_id in self._pending:  # already waiting in the local queue
                return
            self._pending.add(job_id)
        self._pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        from disa.worker.execute import Interrupted, TransientError, execute_job

        with self._guard:
            self._pending.discard(job_id)
        delay = 1.0
        # As the Celery task's max_retries: the manifest's attempt count cannot bound
        # failures that happen before a run is recorded (lock, manifest read or write).
        retries = self._settings.max_attempts + 1
        while not self._stop.is_set():
            try:
                execute_job(self._store, job_id, self._settings, interrupted=self._stop.is_set)
                return
            except TransientError:
                if retries == 0:
                    log.error("job %s: storage kept failing (or the unpack pool stayed "
                              "full); it is sent again when the API next starts", job_id)
                    return
                retries -= 1
                self._stop.wait(delay)
                delay = min(60.0, delay * 2)
            except Interrupted:
                return
            except Exception:  # never let one job kill the embedded worker
                log.exception("job %s: embedded worker error", job_id)
                return

    def broker_identity(self) -> str:
        return self._identity

    def worker_count(self) -> int:
        return 0 if self._stop.is_set() else 1

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class CeleryDispatcher:
    """Celery over Redis: the API sends the task by name and never imports the engine."""

    def __init__(self, settings: Settings) -> None:
        import redis

        from disa.worker.config import TASK_NAME, make_celery

        self._settings = settings
        self._task_name = TASK_NAME
        self._app = make_celery(settings, with_tasks=False)
        self._redis = redis.Redis.from_url(settings.broker_url or "", socket_timeout=2.0,
                                           socket_connect_timeout=2.0)

    def submit(self, job_id: str) -> None:
        # task_id = job id: Celery's own bookkeeping lines up with the job store.
        self._app.send_task(self._task_name, args=[job_id], task_id=job_id,
                            queue=self._settings.queue)

    def broker_identity(self) -> str:
        info = self._redis.info("server")
        return str(info.get("run_id", ""))

    def worker_count(self) -> int:
        replies = self._app.control.ping(timeout=0.5)
        return len(replies or [])

    def close(self) -> None:
        try:
            self._app.close()
        finally:
            self._redis.close()


def make_dispatcher(store: JobStore, settings: Settings) -> Dispatcher:
    """Celery when a broker is configured, else the embedded worker."""
    if settings.embedded:
        return EmbeddedDispatcher(store, settings)
    return CeleryDispatcher(settings)
