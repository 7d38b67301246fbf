"""A worker killed with SIGKILL mid-job: the job completes on a new worker, same result."""

from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from disa.service.app import create_app

from .conftest import deployment_env


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_job_survives_its_worker_being_killed(redis_server, start_worker, apply_env,
                                             tmp_path):
    from disa.core.io.images import write_image
    from disa.training import phantom as ph

    pair = ph.make_pair(ph.rigid_truth((8, -6, 7), (10, -8, 9)),
                        fixed_grid=ph.make_grid((40, 40, 40), (4.0, 4.0, 4.0)))
    write_image(pair.fixed, tmp_path / "f.nii.gz")
    write_image(pair.moving, tmp_path / "m.nii.gz")
    files = {"fixed": ("f.nii.gz", (tmp_path / "f.nii.gz").read_bytes()),
             "moving": ("m.nii.gz", (tmp_path / "m.nii.gz").read_bytes())}
    options = json.dumps({"similarity": "mind", "starts": 200, "seed": 11})
    env = deployment_env(tmp_path / "jobs", redis_server.url, "kill")
    apply_env(env)
    first = start_worker(env)
    with TestClient(create_app()) as api:
        job_id = api.post("/v1/jobs", files=files, data={"options": options}).json()["id"]

        def job():
            return api.get(f"/v1/jobs/{job_id}").json()

        _wait(lambda: job()["progress"]["stage"] in ("search", "refine"), 60,
              "the job to be searching")
        first.kill()  # main process and pool child at once: no clean-up, no requeue by Celery
        assert job()["state"] in ("running", "queued")  # queued once the sweeper saw it
        start_worker(env)  # the API's sweeper finds the orphan (its lock is free) and requeues
        end = _wait(lambda: job()["state"] in ("succeeded", "failed") and job(), 90,
                    "the job to finish on the new worker")
        assert end["state"] == "succeeded", end["error"]
        assert end["attempts"] == 2

        # the same inputs and seed once more, undisturbed: the same parameters
        again_id = api.post("/v1/jobs", files=files, data={"options": options}).json()["id"]
        again = _wait(lambda: (j := api.get(f"/v1/jobs/{again_id}").json())["state"]
                      in ("succeeded", "failed") and j, 60, "the reference job")
        assert again["state"] == "succeeded" and again["attempts"] == 1
        assert again["result"]["parameters"] == end["result"]["parameters"]


def test_killed_pool_process_is_replaced_and_the_job_redelivered(redis_server, start_worker,
                                                                 apply_env, tmp_path):
    """The OOM-killer case: only the pool child dies; Celery rejects the message back to
    the queue (task_reject_on_worker_lost) and the worker's new child runs it."""
    import os
    import signal

    from disa.core.io.images import write_image
    from disa.training import phantom as ph

    pair = ph.make_pair(ph.rigid_truth((8, -6, 7), (10, -8, 9)),
                        fixed_grid=ph.make_grid((40, 40, 40), (4.0, 4.0, 4.0)))
    write_image(pair.fixed, tmp_path / "f.nii.gz")
    write_image(pair.moving, tmp_path / "m.nii.gz")
    files = {"fixed": ("f.nii.gz", (tmp_path / "f.nii.gz").read_bytes()),
             "moving": ("m.nii.gz", (tmp_path / "m.nii.gz").read_bytes())}
    env = {**deployment_env(tmp_path / "jobs", redis_server.url, "child"),
           "DISA_SWEEP_INTERVAL_S": "3600"}  # Celery alone must bring it back
    apply_env(env)
    worker = start_worker(env)
    with TestClient(create_app()) as api:
        job_id = api.post("/v1/jobs", files=files,
                          data={"options": json.dumps({"similarity": "mind", "starts": 50})}
                          ).json()["id"]

        def job():
            return api.get(f"/v1/jobs/{job_id}").json()

        _wait(lambda: job()["progress"]["stage"] in ("search", "refine"), 60, "the search")
        (child,) = worker.children()
        os.kill(child, signal.SIGKILL)
        end = _wait(lambda: job()["state"] in ("succeeded", "failed") and job(), 90,
                    "the job to finish")
        assert end["state"] == "succeeded", end["error"]
        assert end["attempts"] == 2 and worker.alive
