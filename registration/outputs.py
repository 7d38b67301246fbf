"""The result folder of a registration (ARCHITECTURE.md contract).

    transform.tfm      ITK transform, fixed points -> moving points (LPS mm); for the
                       non-linear modes (deformable, rigid+probe) its rigid/affine part
    registered.nii.gz  moving image resampled on the fixed grid with the full mapping
    qa.png             fixed/moving overlay and checkerboard, before and after (and the
                       deformation for non-linear modes)
    displacement.nii.gz  non-linear modes: u(x) = T(x) - x of the full mapping on the fixed
                       grid (3-component float32, LPS mm, ITK displacement-field convention)
    transform.h5       non-linear modes: the full mapping as an ITK composite transform
                       (linear part + displacement field), for sitk.ReadTransform
    result.json        mode, similarity, parameters, objective, confidence, timings,
                       versions, model hash (written last: its presence means complete)

Every file is written to a temporary name in the folder and moved into place
with os.replace, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from disa.registration.atomic import write_json
from disa.registration.io import write_image
from disa.registration.pipeline import RegistrationResult
from disa.registration.qa import render_qa

TRANSFORM_FILE = "transform.tfm"
REGISTERED_FILE = "registered.nii.gz"
QA_FILE = "qa.png"
RESULT_FILE = "result.json"
DISPLACEMENT_FILE = "displacement.nii.gz"
FIELD_TRANSFORM_FILE = "transform.h5"


def resample_moving(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform
                    ) -> sitk.Image:
    """The moving image on the fixed grid (linear; outside the moving image: its minimum)."""
    background = float(sitk.GetArrayViewFromImage(moving).min())
    return sitk.Resample(moving, fixed, transform, sitk.sitkLinear, background, sitk.sitkFloat32)


def write_transform(transform: sitk.Transform, path: Path) -> None:
    """Write an ITK transform file atomically (the writer picks the format from the suffix:
    '.tfm' text, '.h5' HDF5, which also holds displacement fields)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteTransform(transform, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the API may run as another user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def versions() -> dict[str, str]:
    """Versions of the software that produced a result (for reproducibility)."""
    found = {"python": platform.python_version()}
    for package in ("disa", "numpy", "scipy", "SimpleITK", "numba", "onnxruntime",
                    "onnxruntime-gpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_result_folder(result: RegistrationResult, fixed: sitk.Image, moving: sitk.Image,
                        outdir: str | Path, inputs: dict[str, Any] | None = None,
                        extra: Callable[[dict[str, Any]], list[str]] | None = None
                        ) -> dict[str, Any]:
    """Write transform, registered image, QA picture and result.json; return the JSON data.

    ``extra(data)`` writes further files (e.g. DICOM REG) and returns their
    names; it runs before result.json, which stays the last file written.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    write_transform(result.transform, outdir / TRANSFORM_FILE)
    files = [TRANSFORM_FILE, REGISTERED_FILE, QA_FILE, RESULT_FILE]
    final = result.transform
    convention = ("transform.tfm maps fixed points to moving points (LPS mm); "
                  "sitk.Resample(moving, fixed, transform) gives registered.nii.gz")
    if result.field_transform is not None and result.displacement is not None:
        final = result.field_transform
        write_transform(final, outdir / FIELD_TRANSFORM_FILE)
        write_image(result.displacement, outdir / DISPLACEMENT_FILE)
        files[1:1] = [FIELD_TRANSFORM_FILE, DISPLACEMENT_FILE]
        convention = ("transform.h5 (the full mapping) maps fixed points to moving points "
                      "(LPS mm); sitk.Resample(moving, fixed, sitk.ReadTransform('transform.h5')) "
                      "gives registered.nii.gz; displacement.nii.gz is u(x) = T(x) - x on the "
                      "fixed grid; transform.tfm holds the rigid/affine part only")
    registered = resample_moving(moving, fixed, final)
    write_image(registered, outdir / REGISTERED_FILE)
    before = resample_moving(moving, fixed, sitk.Transform())
    title = (f"DISA {result.mode} / {result.similarity}: confidence {result.confidence:.2f}"
             + (" AMBIGUOUS" if result.ambiguous else ""))
    render_qa(fixed, registered, before=before, path=outdir / QA_FILE, title=title,
              displacement=result.displacement)
    data = {
        "format": "disa-result/1",
        **result.summary(),
        "transform_convention": convention,
        "files": files,
        "inputs": inputs or {},
        "versions": versions(),
    }
    if extra is not None:
        data["files"] += extra(data)
    write_json(data, outdir / RESULT_FILE)
    return data
