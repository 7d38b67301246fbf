"""Celery configuration from the DISA settings (no tasks imported: the API sends by name)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from disa.jobs.settings import Settings

#: Name of the one task; the API sends it by name so it never imports the engine.
TASK_NAME = "disa.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for reliable, long, CPU-heavy jobs that carry only a job id."""
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # A message is acknowledged only when its job is done, so a worker that
        # dies mid-job leaves it to be delivered again; one message at a time per
        # process, so a long job never holds a second one hostage.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Redis re-delivers unacknowledged messages after the visibility timeout;
        # it must outlast the hard limit (Celery reads all three places).
        "broker_transport_options": visibility,
        "result_backend_transport_options": visibility,
        "visibility_timeout": settings.visibility_timeout_s,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.hard_time_limit_s,
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": settings.result_backend is None,
        "result_expires": 24 * 3600,
        "broker_connection_retry_on_startup": True,
        # Cancelling running registrations on a broker hiccup would throw away
        # minutes of work; the job store makes a duplicate delivery harmless.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_timeout": 2.0,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0,
                                      "interval_step": 0.2, "interval_max": 0.5},
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def make_celery(settings: Settings, with_tasks: bool = True) -> Celery:
    """A Celery app for `settings`; `with_tasks=False` for senders (the API)."""
    app = Celery("disa", include=["disa.worker.tasks"] if with_tasks else [])
    app.conf.update(celery_config(settings))
    return app
