"""What one API process holds while it runs: settings, store, dispatcher, metrics, sweeper.

Made in the app's lifespan (so settings are read at start, not at import) and
reached by routes through the dependencies in `deps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from disa.jobs.settings import Settings
from disa.jobs.store import JobStore
from disa.service.dispatch import Dispatcher, make_dispatcher
from disa.service.maintenance import jobs_to_requeue, remove_expired
from disa.service.metrics import ServiceMetrics
from disa.service.models import CheckOut, ReadinessOut
from disa.service.upload_slots import UploadSlots

log = logging.getLogger("disa.service")


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    dispatcher: Dispatcher
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    uploads: UploadSlots = field(default_factory=lambda: UploadSlots(4))
    #: the broker lost messages (or could not take one): requeue queued jobs when it is back
    _requeue_queued: bool = False
    _broker_id: str | None = None
    _ready: tuple[float, ReadinessOut] | None = None
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        store = JobStore(settings.jobs_dir)
        settings.apply_unpack_pool()  # the header checks here and the embedded worker's reads
        if not settings.api_key_digests:
            log.warning("DISA_API_KEYS is empty: the API accepts requests without a key")
        runtime = cls(settings=settings, store=store,
                      dispatcher=make_dispatcher(store, settings),
                      uploads=UploadSlots(settings.max_concurrent_uploads))
        log.info("jobs in %s; %s", store.root,
                 "embedded worker (no broker)" if settings.embedded else "Celery broker")
        return runtime

    def close(self) -> None:
        self.dispatcher.close()

    # ----------------------------------------------------------- dispatch

    def dispatch(self, job_id: str) -> bool:
        """Send a job to a worker; if the broker fails, a later sweep sends it again."""
        try:
            self.dispatcher.submit(job_id)
        except Exception as exc:  # the job is safe in the store either way
            log.warning("job %s: broker did not take it (%s); will requeue", job_id,
                        type(exc).__name__)
            with self._guard:
                self._requeue_queued = True
            return False
        return True

    def recover(self, include_queued: bool) -> list[str]:
        """Send again the jobs that may have no message in the broker; return their ids."""
        ids = jobs_to_requeue(self.store, include_queued)
        for job_id in ids:
            # A broker that refuses one will refuse the rest: leave them all for
            # the next sweep instead of waiting out a timeout per job.
            if not self.dispatch(job_id):
                return []
        if ids:
            log.info("requeued %d jobs", len(ids))
        return ids

    # -------------------------------------------------------------- sweep

    def startup(self) -> None:
        """At start: housekeeping, then requeue everything accepted and not finished."""
        remove_expired(self.store, self.settings.retention_days)
        self._broker_id = self._broker_identity()
        self.recover(include_queued=True)
        self.metrics.refresh(self.store.manifests())

    def sweep(self) -> None:
        """Periodic: retention, orphaned jobs, broker restarts, metrics."""
        remove_expired(self.store, self.settings.retention_days)
        identity = self._broker_identity()
        with self._guard:
            restarted = identity is not None and identity != self._broker_id
            if restarted and self._broker_id is not None:
                log.warning("broker restarted: queued jobs are sent again")
            requeue = identity is not None and (restarted or self._requeue_queued)
            if identity is not None:
                self._broker_id = identity
                self._requeue_queued = False
        self.recover(include_queued=requeue)
        self.metrics.refresh(self.store.manifests())

    async def sweep_forever(self) -> None:
        """The sweeper task of the app's lifespan (its work runs in a thread)."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:  # housekeeping must never take the API down
                log.exception("sweep failed")

    def _broker_identity(self) -> str | None:
        try:
            return self.dispatcher.broker_identity()
        except Exception:
            with self._guard:
                self._requeue_queued = True  # it may come back empty
            return None

    # ---------------------------------------------------------- readiness

    def readiness(self) -> ReadinessOut:
        """Broker, storage and worker checks, reused for `ready_cache_s` seconds."""
        cached = self._ready
        if cached is not None and time.monotonic() - cached[0] < self.settings.ready_cache_s:
            return cached[1]
        checks = {"storage": _check(self.store.check_writable, "writable"),
                  "broker": _check(self.dispatcher.broker_identity,
                                   "embedded" if self.settings.embedded else "reachable")}
        workers = 0
        if checks["broker"].ok:
            with contextlib.suppress(Exception):
                workers = self.dispatcher.worker_count()
        self.metrics.workers.set(workers)
        checks["workers"] = CheckOut(ok=workers > 0, detail=f"{workers} answering")
        ready = ReadinessOut(status="ready" if all(c.ok for c in checks.values())
                             else "not ready", checks=checks)
        self._ready = (time.monotonic(), ready)
        return ready

    def refresh_metrics_if_stale(self, max_age_s: float = 5.0) -> None:
        if time.monotonic() - self.metrics.refreshed_at > max_age_s:
            self.metrics.refresh(self.store.manifests())


def _check(probe, ok_detail: str) -> CheckOut:
    try:
        probe()
    except Exception as exc:
        return CheckOut(ok=False, detail=f"failed: {type(exc).__name__}")
    return CheckOut(ok=True, detail=ok_detail)
