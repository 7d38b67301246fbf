"""Over real HTTP with a real redis-server and a real Celery worker process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from disa.service.app import create_app
from disa.service.client import DisaClient

from ..support import free_port, wait_until, write_pair
from .helpers import (
    API_KEY,
    TINY_OPTIONS,
    LiveServer,
    api_key_env,
    service_env,
    using_env,
)


@pytest.fixture(scope="module")
def deployment(redis_server, start_worker, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """API (uvicorn thread) + one worker process with two pool processes, own queue."""
    env = {**service_env(tmp_path_factory.mktemp("jobs"), redis_server.url, queue="roundtrip"),
           **api_key_env()}
    worker = start_worker(env, concurrency=2)
    with using_env(env), LiveServer(create_app(), free_port()) as server:
        yield server.url, worker


@pytest.fixture(scope="module")
def client(deployment) -> Iterator[DisaClient]:
    with DisaClient(deployment[0], api_key=API_KEY) as c:
        yield c


def test_round_trip_with_a_real_registration(client, tmp_path: Path):
    import SimpleITK as sitk

    fixed, moving = write_pair(tmp_path / "in", size=32)
    job = client.submit(fixed, moving, {"similarity": "mind", "starts": 30, "seed": 3})
    stages: list[str] = []
    job = client.wait(job["id"], poll_s=0.2, timeout_s=120,
                      on_progress=lambda stage, fraction: stages.append(stage))
    assert job["state"] == "succeeded", job["error"]
    assert job["timings"]["run_s"] > 0 and "search" in job["timings"]["stages"]
    assert "search" in stages or "refine" in stages  # progress was visible while running
    paths = client.download(job["id"], tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(["transform.tfm", "registered.nii.gz",
                                                     "qa.png", "result.json"])
    transform = sitk.ReadTransform(str(tmp_path / "out" / "transform.tfm"))
    assert transform.GetNumberOfParameters() >= 6
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    for key in ("mode", "similarity", "parameters", "final_objective", "evaluations", "starts",
                "timings_s", "confidence", "versions"):
        assert key in result
    assert result["parameters"] == job["result"]["parameters"]
    # the phantom moved by (10, -8, 9) mm: the estimate is near it
    assert abs(result["parameters"][3] - 10) < 2 and abs(result["parameters"][4] + 8) < 2
    registered = sitk.ReadImage(str(tmp_path / "out" / "registered.nii.gz"))
    assert registered.GetSize() == (32, 32, 32)
    assert (tmp_path / "out" / "qa.png").read_bytes()[:4] == b"\x89PNG"


def test_twenty_concurrent_submissions_all_complete(client, pair_files):
    with ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(lambda _: client.submit(*pair_files, TINY_OPTIONS), range(20)))
    assert len({j["id"] for j in jobs}) == 20
    done = [client.wait(j["id"], poll_s=0.5, timeout_s=180) for j in jobs]
    assert [j["state"] for j in done] == ["succeeded"] * 20, [j["error"] for j in done]
    page = client.jobs(limit=100, state="succeeded")
    assert {j["id"] for j in jobs} <= {j["id"] for j in page["items"]}


def test_a_broken_file_fails_its_job_with_a_message_and_the_worker_stays_up(
        client, deployment, pair_files, tmp_path: Path):
    data = pair_files[1].read_bytes()
    truncated = tmp_path / "moving.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])  # the header is fine, the pixels are not
    job = client.wait(client.submit(pair_files[0], truncated, TINY_OPTIONS)["id"],
                      poll_s=0.2, timeout_s=60)
    assert job["state"] == "failed"
    assert job["error"].startswith("moving.nii.gz:") and "truncated" in job["error"]
    assert deployment[1].alive
    again = client.wait(client.submit(*pair_files, TINY_OPTIONS)["id"], poll_s=0.2,
                        timeout_s=60)
    assert again["state"] == "succeeded"


def test_cancel_a_running_job(client, tmp_path: Path):
    fixed, moving = write_pair(tmp_path / "in", size=40)
    job = client.submit(fixed, moving, {"similarity": "mind", "starts": 2000})
    wait_until(lambda: client.job(job["id"])["state"] == "running", 60, "the job to start")
    cancelled = client.cancel(job["id"])
    assert cancelled["cancel_requested"] is True
    end = client.wait(job["id"], poll_s=0.2, timeout_s=60)
    assert end["state"] == "cancelled"
    with pytest.raises(Exception, match="409"):
        client.download(job["id"], tmp_path / "out", names=["transform.tfm"])
    assert client.cancel(job["id"])["state"] == "cancelled"  # again: nothing changes
    assert client.delete(job["id"]) is None  # finished now: deleted
    with pytest.raises(Exception, match="404"):
        client.job(job["id"])


def test_readyz_sees_the_worker_and_metrics_the_jobs(deployment):
    import httpx

    ready = httpx.get(f"{deployment[0]}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"]["ok"]
    metrics = httpx.get(f"{deployment[0]}/metrics", timeout=10).text
    assert 'disa_jobs{state="succeeded"}' in metrics
    assert "disa_stage_duration_seconds_count" in metrics


def test_series_are_chosen_by_uid_in_a_multi_series_zip(client, tmp_path: Path):
    """One zip holding the fixed and the moving DICOM series, each chosen by its UID."""
    import zipfile

    import SimpleITK as sitk

    from disa.core.io.images import read_dicom_headers
    from disa.service.client import ServiceError
    from disa.training import phantom as ph

    from ..core import dicom_fixtures as dx

    pair = ph.make_pair(ph.rigid_truth((6, -4, 5), (6, -5, 4)),
                        fixed_grid=ph.make_grid((24, 24, 24), (4.0, 4.0, 4.0)))
    dx.write_series(pair.fixed, tmp_path / "ct", modality="CT", slope=0.001, intercept=0.0)
    dx.write_series(pair.moving, tmp_path / "mr", modality="MR", series_number=2)
    uids = {k: read_dicom_headers(tmp_path / k)[0].SeriesInstanceUID for k in ("ct", "mr")}
    both = tmp_path / "both.zip"
    with zipfile.ZipFile(both, "w") as z:
        for k in ("ct", "mr"):
            for f in sorted((tmp_path / k).iterdir()):
                z.write(f, f"{k}-{f.name}")
    with pytest.raises(ServiceError) as caught:
        client.submit(both, both, TINY_OPTIONS)
    assert caught.value.status_code == 422 and uids["ct"] in caught.value.detail
    job = client.submit(both, both, TINY_OPTIONS, fixed_series_uid=uids["ct"],
                        moving_series_uid=uids["mr"])
    done = client.wait(job["id"], timeout_s=120)
    assert done["state"] == "succeeded", done
    client.download(job["id"], tmp_path / "out")
    registered = sitk.ReadImage(str(tmp_path / "out" / "registered.nii.gz"))
    assert registered.GetSize() == pair.fixed.GetSize()


def test_an_initial_transform_travels_from_client_to_engine(client, tmp_path: Path):
    """The client's initial transform end to end: uploaded, checked, stored, given to the
    engine by the worker, recorded in result.json; started at the truth with no search
    range, the job ends there. (That register() receives it is tested with the engine
    stubbed in tests/registration/test_cli.py: this tiny phantom converges from the
    header pose too, so the result alone cannot tell.)"""
    import numpy as np
    import SimpleITK as sitk

    from disa.registration.transform.parametric import linear_matrix
    from disa.training import phantom as ph

    truth = ph.rigid_truth((8, -6, 7), (10, -8, 9))  # write_pair's motion, fixed -> moving
    pose = tmp_path / "pose.tfm"
    sitk.WriteTransform(truth, str(pose))
    expected = linear_matrix(truth)
    fixed, moving = write_pair(tmp_path / "in")
    job = client.submit(fixed, moving, {"similarity": "mind", "starts": 10,
                                        "rotation_range": 0, "translation_range": 0},
                        initial_transform=pose)
    np.testing.assert_allclose(job["inputs"]["initial_transform"]["matrix_fixed_to_moving"],
                               expected, atol=1e-9)
    job = client.wait(job["id"], poll_s=0.2, timeout_s=120)
    assert job["state"] == "succeeded", job["error"]
    client.download(job["id"], tmp_path / "out", names=["result.json"])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    recorded = result["inputs"]["initial_transform"]
    assert recorded["path"] == "initial_transform.tfm"
    np.testing.assert_allclose(recorded["matrix_fixed_to_moving"], expected, atol=1e-9)
    found = np.asarray(job["result"]["matrix_fixed_to_moving"])
    points = np.array([[x, y, z, 1.0] for x in (-30, 30) for y in (-30, 30) for z in (-30, 30)])
    assert np.abs(points @ (found - expected).T)[:, :3].max() < 2.0
