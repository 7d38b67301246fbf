"""DICOM zip uploads are checked from the members' headers: nothing is unpacked, what
the checks decompress counts against one budget per request, a full unpack pool is a
503 with Retry-After, and a corrected geometry is named in the job's JSON."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.io import dicom_zip
from disa.service import routes_jobs

from ..core import dicom_fixtures as dx
from ..core.io_fixtures import zip_folder
from ..core.test_slice_stack import tilted_series
from .helpers import TINY_OPTIONS


def _zipped_series(folder: Path) -> Path:
    image = sitk.GetImageFromArray(np.zeros((8, 32, 32), np.float32))
    image.SetSpacing((2.0, 2.0, 3.0))
    dx.write_series(image, folder / "ct")
    archive = folder / "ct.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted((folder / "ct").iterdir()):
            zf.write(file, file.name)
    return archive


def _post(client, fixed: Path, moving: Path):
    with open(fixed, "rb") as f, open(moving, "rb") as m:
        return client.post("/v1/jobs", files={"fixed": ("f.zip", f), "moving": ("m.zip", m)},
                           data={"options": json.dumps(TINY_OPTIONS)})


def test_a_zip_upload_is_checked_without_unpacking(client, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _zipped_series(tmp_path)
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    def no_unpacking(*args: object) -> None:
        raise AssertionError("a member was unpacked")

    monkeypatch.setattr(dicom_zip, "_copy_member", no_unpacking)
    r = _post(client, archive, archive)
    assert r.status_code == 202, r.text
    assert list(temp.iterdir()) == []


def test_the_zips_of_one_request_share_one_unpack_budget(client, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each zip's headers fit the budget alone; the two of one request do not."""
    archive = _zipped_series(tmp_path)
    headers = 0
    with dicom_zip.unpack_budget(10**9):
        from disa.core.io.images import inspect_image

        inspect_image(archive)
        headers = dicom_zip._REQUEST.get().used
    monkeypatch.setattr(routes_jobs, "UNPACK_BUDGET_BYTES", int(headers * 1.5))
    r = _post(client, archive, archive)
    assert r.status_code == 422, r.text
    assert "the DICOM zips of this request decompress to more than" in r.json()["detail"]
    monkeypatch.setattr(routes_jobs, "UNPACK_BUDGET_BYTES", int(headers * 2.5))
    assert _post(client, archive, archive).status_code == 202


def test_a_full_unpack_pool_is_a_503_with_retry_after(make_client, tmp_path: Path,
                                                      fresh_unpack_pool) -> None:
    """Other requests fill the process's pool: busy, not a bad input (it used to be a 422,
    as UnpackBusy is an InputError); nothing of the upload is kept."""
    client = make_client(unpack_pool_bytes=2 * 1024**2, unpack_wait_s=0.2)
    pool = dicom_zip.unpack_pool()
    assert pool is fresh_unpack_pool and pool.capacity == 2 * 1024**2  # the settings apply
    assert pool.wait_s == 0.2
    archive = _zipped_series(tmp_path)
    with pool.hold(pool.capacity, "other.zip"):
        r = _post(client, archive, archive)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == str(routes_jobs.UNPACK_RETRY_AFTER_S)
    assert "unpacking other DICOM zips" in r.json()["detail"]
    jobs = Path(client.app.state.runtime.store.root)
    assert [p for p in jobs.rglob("*") if p.is_file()] == []
    assert pool.in_use == 0
    assert _post(client, archive, archive).status_code == 202


def test_the_job_json_names_a_corrected_geometry(client, tmp_path: Path) -> None:
    """As result.json does: inputs.fixed.geometry_correction for a tilted series, None for
    a series that needed none."""
    image = sitk.GetImageFromArray(np.zeros((32, 32, 32), np.float32) + 40.0)
    image.SetOrigin((-31.0, -31.0, -31.0))
    image.SetSpacing((2.0, 2.0, 2.0))
    tilted_series(image, tmp_path / "tilted", 12.0, 2.0, (20, 20, 16), np.zeros(3))
    fixed = zip_folder(tmp_path / "tilted", tmp_path / "tilted.zip")
    moving = _zipped_series(tmp_path)
    r = _post(client, fixed, moving)
    assert r.status_code == 202, r.text
    inputs = client.get(r.headers["Location"]).json()["inputs"]
    correction = inputs["fixed"]["geometry_correction"]
    assert correction["corrected"] == ["gantry tilt"]
    assert correction["gantry_tilt_deg"] == pytest.approx(12.0, abs=0.05)
    assert correction["stored_size"] == [20, 20, 16]
    assert inputs["moving"]["geometry_correction"] is None


def test_the_viewer_answers_a_full_unpack_pool_with_503(client, pair_files,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The viewer reads a job's inputs again (a DICOM zip's series unpacked in the job's
    folder); a full pool there is busy too, not a 422 about the job's inputs."""
    from disa.service import viewer

    with open(pair_files[0], "rb") as f, open(pair_files[1], "rb") as m:
        r = client.post("/v1/jobs", files={"fixed": ("f.nii.gz", f), "moving": ("m.nii.gz", m)},
                        data={"options": json.dumps(TINY_OPTIONS)})
    job_id = r.json()["id"]
    store = client.app.state.runtime.store
    manifest = store.read(job_id)
    manifest.state, manifest.files = "succeeded", ["result.json"]
    store.write(manifest)

    def busy(*args: object) -> None:
        raise dicom_zip.UnpackBusy("fixed: the server is unpacking other DICOM zips; "
                                   "try again shortly")

    monkeypatch.setattr(viewer, "load_job_volumes", busy)
    for rest in ("/viewer", "/slices/fixed/axial/0", "/point?x=0&y=0&z=0",
                 "/heatmap?x=0&y=0&z=0"):
        r = client.get(f"/v1/jobs/{job_id}{rest}")
        assert r.status_code == 503, (rest, r.text)
        assert r.headers["Retry-After"] == str(routes_jobs.UNPACK_RETRY_AFTER_S)
        assert "unpacking other DICOM zips" in r.json()["detail"]
