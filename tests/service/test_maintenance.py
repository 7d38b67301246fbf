"""Retention and requeue: what the API's start and its sweeper do to the store."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from disa.jobs.manifest import Manifest, new_job_id, now
from disa.jobs.settings import Settings
from disa.jobs.store import JobStore
from disa.service.maintenance import jobs_to_requeue, remove_expired
from disa.service.runtime import Runtime

from .conftest import RecordingDispatcher


def _job(store: JobStore, state: str, age_days: float = 0.0) -> str:
    job_id = new_job_id()
    store.create_incoming(job_id)
    t = now() - timedelta(days=age_days)
    m = Manifest(id=job_id, state=state, created_at=t, updated_at=t,
                 finished_at=t if state in ("succeeded", "failed", "cancelled") else None,
                 inputs={})
    store.publish(m)
    return job_id


def test_retention_removes_only_old_finished_jobs(tmp_path: Path):
    store = JobStore(tmp_path)
    old_done = _job(store, "succeeded", age_days=10)
    old_failed = _job(store, "failed", age_days=10)
    old_queued = _job(store, "queued", age_days=10)  # accepted work is never dropped
    new_done = _job(store, "succeeded", age_days=1)
    assert remove_expired(store, retention_days=7) == 2
    assert sorted(store.ids()) == sorted([old_queued, new_done])
    assert not store.exists(old_done) and not store.exists(old_failed)
    assert remove_expired(store, retention_days=0) == 0  # 0 keeps everything


def test_requeue_takes_queued_jobs_and_running_jobs_nobody_runs(tmp_path: Path):
    store = JobStore(tmp_path)
    queued = _job(store, "queued")
    orphan = _job(store, "running")
    alive = _job(store, "running")
    _job(store, "succeeded")
    lock = store.lock(alive)
    assert lock.acquire()  # a live worker holds this one
    try:
        assert jobs_to_requeue(store, include_queued=False) == [orphan]
        assert store.read(orphan).state == "queued"  # put back, its attempt stays counted
        assert sorted(jobs_to_requeue(store, include_queued=True)) == sorted([queued, orphan])
    finally:
        lock.release()


def _runtime(tmp_path: Path) -> tuple[Runtime, RecordingDispatcher]:
    dispatcher = RecordingDispatcher()
    settings = Settings(jobs_dir=tmp_path, broker_url="redis://x:1/0", retention_days=7)
    return Runtime(settings=settings, store=JobStore(tmp_path), dispatcher=dispatcher), dispatcher


def test_start_requeues_everything_accepted_and_unfinished(tmp_path: Path):
    runtime, sent = _runtime(tmp_path)
    queued = _job(runtime.store, "queued")
    orphan = _job(runtime.store, "running")
    _job(runtime.store, "cancelled")
    runtime.startup()
    assert sorted(sent.sent) == sorted([queued, orphan])


def test_sweep_requeues_queued_jobs_after_a_broker_restart_or_outage(tmp_path: Path):
    runtime, broker = _runtime(tmp_path)
    runtime.startup()
    queued = _job(runtime.store, "queued")
    runtime.sweep()
    assert broker.sent == []  # same broker: its queue still holds the message
    broker.identity = "broker-2"  # restarted, possibly empty
    runtime.sweep()
    assert broker.sent == [queued]
    broker.broker_up = False
    runtime.dispatch(queued)  # cannot send now: remembered
    runtime.sweep()
    broker.broker_up = True
    runtime.sweep()
    assert broker.sent == [queued, queued]


def test_readiness_reports_each_check(tmp_path: Path):
    runtime, broker = _runtime(tmp_path)
    runtime.settings.ready_cache_s = 0
    assert runtime.readiness().status == "ready"
    broker.workers = 0
    ready = runtime.readiness()
    assert ready.status == "not ready" and not ready.checks["workers"].ok
    broker.broker_up = False
    assert not runtime.readiness().checks["broker"].ok
