"""DICOM zip uploads are checked from the members' headers: nothing is unpacked, and what
the checks decompress counts against one budget per request."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.registration import dicom_zip
from disa.service import uploads

from ..registration import dicom_fixtures as dx
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
        from disa.registration.io import inspect_image

        inspect_image(archive)
        headers = dicom_zip._REQUEST.get().used
    monkeypatch.setattr(uploads, "UNPACK_BUDGET_BYTES", int(headers * 1.5))
    r = _post(client, archive, archive)
    assert r.status_code == 422, r.text
    assert "the DICOM zips of this request decompress to more than" in r.json()["detail"]
    monkeypatch.setattr(uploads, "UNPACK_BUDGET_BYTES", int(headers * 2.5))
    assert _post(client, archive, archive).status_code == 202
