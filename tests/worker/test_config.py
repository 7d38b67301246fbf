"""Celery settings that make long jobs survive lost workers and redeliveries."""

from __future__ import annotations

from disa.jobs.settings import Settings
from disa.worker.config import TASK_NAME, celery_config, make_celery


def test_reliability_settings():
    s = Settings(broker_url="redis://127.0.0.1:1/0", soft_time_limit_s=600,
                 hard_time_limit_s=700)
    conf = celery_config(s)
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_soft_time_limit"] == 600 and conf["task_time_limit"] == 700
    for timeout in (conf["broker_transport_options"]["visibility_timeout"],
                    conf["result_backend_transport_options"]["visibility_timeout"],
                    conf["visibility_timeout"]):
        assert timeout > conf["task_time_limit"]
    assert conf["accept_content"] == ["json"]


def test_worker_app_registers_the_task_and_sender_does_not(monkeypatch):
    s = Settings(broker_url="redis://127.0.0.1:1/0")
    sender = make_celery(s, with_tasks=False)
    assert TASK_NAME not in sender.tasks
    import disa.worker.tasks as tasks

    assert tasks.run_job.name == TASK_NAME
    assert tasks.run_job.acks_late and tasks.run_job.reject_on_worker_lost
