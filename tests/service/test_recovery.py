"""Nothing accepted is lost when Redis restarts empty: the job store requeues it."""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from disa.service.app import create_app

from ..support import wait_until
from .helpers import TINY_OPTIONS, service_env, using_env


def _submit(client: TestClient, pair_files) -> str:
    import json

    files = {"fixed": ("f.nii.gz", pair_files[0].read_bytes()),
             "moving": ("m.nii.gz", pair_files[1].read_bytes())}
    r = client.post("/v1/jobs", files=files, data={"options": json.dumps(TINY_OPTIONS)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_redis_restart_with_queued_jobs_then_api_restart_and_a_worker(
        private_redis, start_worker, pair_files, tmp_path):
    env = service_env(tmp_path / "jobs", private_redis.url, queue="restart",
                      sweep_interval_s=3600)  # only the start-up requeue may act here
    queue = redis.Redis.from_url(private_redis.url)
    with using_env(env):
        with TestClient(create_app()) as api:
            ids = [_submit(api, pair_files) for _ in range(3)]
            assert queue.llen("restart") == 3  # no worker: the messages wait in Redis
        private_redis.restart()  # no persistence: the queue is gone
        assert queue.llen("restart") == 0
        with TestClient(create_app()) as api:  # the API starts again and requeues
            assert queue.llen("restart") == 3
            start_worker(env)
            for job_id in ids:
                wait_until(lambda j=job_id: api.get(f"/v1/jobs/{j}").json()["state"]
                           == "succeeded", 120, f"job {job_id}")


def test_sweeper_requeues_when_the_broker_comes_back_empty(private_redis, pair_files,
                                                           tmp_path):
    env = service_env(tmp_path / "jobs", private_redis.url, queue="sweep",
                      sweep_interval_s=0.2)
    queue = redis.Redis.from_url(private_redis.url)
    with using_env(env), TestClient(create_app()) as api:
        ids = [_submit(api, pair_files) for _ in range(2)]
        assert queue.llen("sweep") == 2
        private_redis.restart()
        # the sweeper sees a new Redis run_id and sends every queued job again
        wait_until(lambda: queue.llen("sweep") == 2, 20, "the jobs to be requeued")
        assert all(api.get(f"/v1/jobs/{j}").json()["state"] == "queued" for j in ids)
