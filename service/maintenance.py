"""Housekeeping of the job store: retention, and finding jobs whose message may be lost.

Run by the API at start and then periodically (see `runtime.Runtime.sweep`).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from disa.jobs.manifest import TERMINAL_STATES, JobNotFound, Manifest, Progress, now
from disa.jobs.store import JobStore

log = logging.getLogger("disa.service")

#: An upload staging folder untouched this long belongs to a request that died.
STALE_INCOMING_S = 24 * 3600


def remove_expired(store: JobStore, retention_days: float) -> int:
    """Delete finished jobs older than the retention and dead uploads; count the jobs."""
    store.remove_stale_incoming(STALE_INCOMING_S)
    if retention_days <= 0:
        return 0
    cutoff = now() - timedelta(days=retention_days)
    removed = 0
    for m in list(store.manifests()):
        if m.state in TERMINAL_STATES and (m.finished_at or m.updated_at) < cutoff:
            try:
                store.delete(m.id)
                removed += 1
            except JobNotFound:
                continue
    if removed:
        log.info("retention: removed %d finished jobs older than %g days", removed,
                 retention_days)
    return removed


def jobs_to_requeue(store: JobStore, include_queued: bool) -> list[str]:
    """Ids of jobs that must be sent to a worker again.

    'running' jobs whose lock nobody holds were being run by a worker that died
    (the kernel dropped its lock): they go back to 'queued'. 'queued' jobs are
    included on request (at start, or after the broker lost its queue): a
    duplicate message is harmless, a lost one is not.
    """
    found: list[str] = []
    for m in list(store.manifests()):
        if m.state == "queued":
            if include_queued:
                found.append(m.id)
        elif m.state == "running" and _orphaned(store, m):
            found.append(m.id)
    return found


def _orphaned(store: JobStore, m: Manifest) -> bool:
    """True (and the job put back to 'queued') if nobody runs this 'running' job."""
    try:
        lock = store.lock(m.id)
        if not lock.acquire(timeout=0.0):
            return False  # a worker holds it: alive and running
        with lock:
            current = store.read(m.id)  # the worker may have finished meanwhile
            if current.state != "running":
                return False
            current.state = "queued"
            current.progress = Progress(stage="queued", fraction=0.0)
            store.write(current)
            log.warning("job %s: its worker was lost; queued again", m.id)
            return True
    except JobNotFound:
        return False
