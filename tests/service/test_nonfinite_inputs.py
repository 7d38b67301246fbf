"""NaN and infinite voxels are refused through the service in every format alike.

The upload is accepted on its headers (pixels are not decoded there); the worker reads
the images with the engine's reader and fails the job as bad input, naming the file.
Before the NIfTI check on stored data, a NIfTI with NaN voxels registered and
succeeded (ITK's NIfTI reader turns them into 0) while NRRD and MetaImage were refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.jobs.settings import Settings
from disa.worker.execute import execute_job

from .helpers import TINY_OPTIONS


def _with_nonfinite(source: Path, target: Path) -> Path:
    image = sitk.ReadImage(str(source), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[1, 2, 3] = np.nan
    array[4, 5, 6] = np.inf
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(target))
    return target


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nonfinite_voxels_fail_the_job_as_bad_input(client, pair_files, tmp_path: Path,
                                                    extension: str) -> None:
    fixed, moving = pair_files
    bad = _with_nonfinite(moving, tmp_path / f"moving{extension}")
    with open(fixed, "rb") as f, open(bad, "rb") as m:
        r = client.post("/v1/jobs", files={"fixed": ("fixed.nii.gz", f),
                                           "moving": (bad.name, m)},
                        data={"options": json.dumps(TINY_OPTIONS)})
    assert r.status_code == 202, r.text
    runtime = client.app.state.runtime
    settings = Settings(jobs_dir=runtime.settings.jobs_dir, max_attempts=1)
    job_id = r.json()["id"]
    assert execute_job(runtime.store, job_id, settings) == "failed"
    manifest = runtime.store.read(job_id)
    assert manifest.error_kind == "input"
    assert "2 of 13824 voxels are not finite (1 NaN, 1 infinite)" in manifest.error
