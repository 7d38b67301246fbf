"""The Python client: what leaves the machine, DICOM folders, errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import httpx
import pytest

from disa.service.client import DisaClient, ServiceError, _as_upload


def test_uploads_carry_role_names_not_local_names(tmp_path: Path):
    fixed = tmp_path / "Doe^Jane_T1.nii.gz"
    moving = tmp_path / "Doe^Jane_T2.NRRD"
    fixed.write_bytes(b"fixed-bytes")
    moving.write_bytes(b"moving-bytes")
    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = request.read()
        seen["key"] = request.headers.get("x-api-key")
        return httpx.Response(202, json={"id": "0" * 32, "state": "queued"})

    with DisaClient("http://disa", api_key="k", transport=httpx.MockTransport(handler)) as c:
        assert c.submit(fixed, moving, {"starts": 10})["state"] == "queued"
    body = seen["body"]
    assert b'filename="fixed.nii.gz"' in body and b'filename="moving.nrrd"' in body
    assert b"Doe" not in body and seen["key"] == "k"
    assert json.dumps({"starts": 10}).encode() in body


def test_a_dicom_folder_is_zipped_with_neutral_member_names(tmp_path: Path):
    series = tmp_path / "Doe^Jane" / "CT"
    series.mkdir(parents=True)
    for i in range(3):
        (series / f"IM_Doe_{i}.dcm").write_bytes(b"DICM" + bytes([i]))
    with _as_upload(tmp_path / "Doe^Jane") as upload:
        assert upload.suffix == ".zip"
        with zipfile.ZipFile(upload) as z:
            assert z.namelist() == ["000000.dcm", "000001.dcm", "000002.dcm"]
    assert not upload.exists()


def test_errors_carry_the_service_detail(tmp_path: Path):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "no such job"})

    with DisaClient("http://disa", transport=httpx.MockTransport(handler)) as c, \
            pytest.raises(ServiceError) as info:
        c.job("0" * 32)
    assert info.value.status_code == 404 and info.value.detail == "no such job"
    with pytest.raises(ValueError, match="unsupported file type"):
        DisaClient("http://disa").submit(tmp_path / "a.png", tmp_path / "b.png")


def test_an_initial_transform_is_sent_under_its_role_name_and_h5_refused(tmp_path: Path):
    fixed, moving = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    fixed.write_bytes(b"fixed-bytes")
    moving.write_bytes(b"moving-bytes")
    earlier = tmp_path / "Doe^Jane result"
    earlier.mkdir()
    (earlier / "transform.tfm").write_text("#Insight Transform File V1.0\n")
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(202, json={"id": "0" * 32, "state": "queued"})

    with DisaClient("http://disa", transport=httpx.MockTransport(handler)) as c:
        c.submit(fixed, moving, initial_transform=earlier)  # a result folder: its .tfm
        c.submit(fixed, moving, initial_transform=earlier / "transform.tfm")
        with pytest.raises(ValueError, match=r"takes ITK text transforms \(.tfm, .txt\)"):
            c.submit(fixed, moving, initial_transform=tmp_path / "pose.h5")
    assert len(bodies) == 2  # the .h5 was refused before anything was sent
    for body in bodies:
        assert b'name="initial_transform"; filename="initial_transform.tfm"' in body
        assert b"#Insight Transform File V1.0" in body and b"Doe" not in body


def test_cancel_posts_to_the_cancel_route_and_delete_deletes():
    seen: list[tuple[str, str]] = []
    job_id = "a" * 32

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        if request.method == "DELETE":
            return httpx.Response(409, json={"detail": "job is queued: cancel it first"})
        return httpx.Response(202, json={"id": job_id, "state": "cancelled"})

    with DisaClient("http://disa", transport=httpx.MockTransport(handler)) as c:
        assert c.cancel(job_id)["state"] == "cancelled"
        with pytest.raises(ServiceError) as info:
            c.delete(job_id)
    assert info.value.status_code == 409
    assert seen == [("POST", f"/v1/jobs/{job_id}/cancel"), ("DELETE", f"/v1/jobs/{job_id}")]


def test_submit_waits_while_the_key_has_too_many_uploads_in_progress(tmp_path: Path):
    fixed, moving = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    fixed.write_bytes(b"fixed-bytes")
    moving.write_bytes(b"moving-bytes")
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) < 3:
            return httpx.Response(429, json={"detail": "this API key has 4 uploads in "
                                                       "progress already"},
                                  headers={"Retry-After": "0.1"})
        return httpx.Response(202, json={"id": "0" * 32, "state": "queued"})

    with DisaClient("http://disa", transport=httpx.MockTransport(handler)) as c:
        assert c.submit(fixed, moving)["state"] == "queued"
    assert len(bodies) == 3 and all(b"moving-bytes" in body for body in bodies)
    bodies.clear()
    with DisaClient("http://disa", transport=httpx.MockTransport(handler),
                    busy_wait_s=0) as c, pytest.raises(ServiceError) as info:
        c.submit(fixed, moving)
    assert info.value.status_code == 429 and len(bodies) == 1


def test_submit_waits_while_the_service_is_busy_unpacking(tmp_path: Path):
    """A 503 with Retry-After (the unpack pool is full) is waited out like a 429; a 503
    without one (a proxy's outage page) is answered at once."""
    fixed, moving = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    fixed.write_bytes(b"fixed-bytes")
    moving.write_bytes(b"moving-bytes")
    answers = [httpx.Response(503, json={"detail": "the server is unpacking other DICOM "
                                                   "zips"}, headers={"Retry-After": "0.1"}),
               httpx.Response(202, json={"id": "0" * 32, "state": "queued"})]
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return answers[min(len(seen), len(answers)) - 1]

    with DisaClient("http://disa", transport=httpx.MockTransport(handler)) as c:
        assert c.submit(fixed, moving)["state"] == "queued"
    assert len(seen) == 2

    def outage(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return httpx.Response(503, text="maintenance")

    seen.clear()
    with DisaClient("http://disa", transport=httpx.MockTransport(outage)) as c, \
            pytest.raises(ServiceError) as info:
        c.submit(fixed, moving)
    assert info.value.status_code == 503 and len(seen) == 1
