"""Prometheus metrics of the service, computed from the job store (the system of record).

Workers may run on other machines, so stage durations are not observed where
they happen: the API reads them from the manifests of jobs that finished since
its last look, once per job. Jobs are counted per owner (the API key's name or
digest prefix, never the key; `anonymous` without authentication).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from disa.jobs.manifest import STATES, TERMINAL_STATES, Manifest

_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: The owner label of jobs made without an API key.
ANONYMOUS = "anonymous"


def owner_label(owner: str | None) -> str:
    """How metrics and logs name a job's owner: its key's owner name, or `anonymous`."""
    return owner or ANONYMOUS


class ServiceMetrics:
    """The service's metrics in their own registry (one per app, so tests can make many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("disa_jobs", "Jobs in the store by state", ["state"],
                          registry=self.registry)
        self.submitted = Counter("disa_jobs_submitted",
                                 "Jobs accepted by this API process, by owner (API key name)",
                                 ["owner"], registry=self.registry)
        self.finished = Counter("disa_jobs_finished",
                                "Jobs seen finishing, by end state and owner (API key name)",
                                ["state", "owner"], registry=self.registry)
        self.stage_seconds = Histogram("disa_stage_duration_seconds",
                                       "Duration of engine stages of finished jobs", ["stage"],
                                       buckets=_STAGE_BUCKETS, registry=self.registry)
        self.run_seconds = Histogram("disa_job_run_seconds",
                                     "From first start to end, finished jobs",
                                     buckets=_JOB_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("disa_job_queue_wait_seconds",
                                       "From submission to first start",
                                       buckets=_JOB_BUCKETS, registry=self.registry)
        self.workers = Gauge("disa_workers", "Workers answering the last readiness check",
                             registry=self.registry)
        self._seen: set[str] = set()
        self._guard = threading.Lock()
        self.refreshed_at = 0.0

    def refresh(self, manifests: Iterable[Manifest]) -> None:
        """Recount jobs by state and observe the jobs that finished since last time."""
        counts = dict.fromkeys(STATES, 0)
        present: set[str] = set()
        with self._guard:
            for m in manifests:
                counts[m.state] += 1
                present.add(m.id)
                if m.state in TERMINAL_STATES and m.id not in self._seen:
                    self._seen.add(m.id)
                    self._observe(m)
            for state, n in counts.items():
                self.jobs.labels(state=state).set(n)
            self._seen &= present  # forget jobs removed by retention
            self.refreshed_at = time.monotonic()

    def _observe(self, m: Manifest) -> None:
        self.finished.labels(state=m.state, owner=owner_label(m.owner)).inc()
        for stage, seconds in m.stage_seconds.items():
            self.stage_seconds.labels(stage=stage).observe(seconds)
        if m.started_at is not None:
            self.queue_seconds.observe((m.started_at - m.created_at).total_seconds())
            if m.finished_at is not None:
                self.run_seconds.observe((m.finished_at - m.started_at).total_seconds())

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
