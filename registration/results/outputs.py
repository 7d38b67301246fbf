"""The result folder of a registration (ARCHITECTURE.md contract).

    transform.tfm      ITK transform, fixed points -> moving points (LPS mm); for the
                       non-linear modes (deformable, rigid+probe) its rigid/affine part
    registered.nii.gz  moving image resampled on the fixed grid with the full mapping
    qa.png             fixed/moving overlay and checkerboard, before and after (and the
                       deformation for non-linear modes), in planes through the centre of
                       the overlap (result.json: view_point_mm)
    displacement.nii.gz  non-linear modes: u(x) = T(x) - x of the full mapping on the fixed
                       grid (3-component float32, LPS mm, ITK displacement-field convention)
    inverse_displacement.nii.gz  non-linear modes: v(y) = T^-1(y) - y on the *moving* grid
                       (same conventions: DisplacementFieldTransform(v) maps moving points
                       to fixed points, so it carries fixed labels onto the moving grid)
    warped_labels.nii.gz  with a label map of the moving image (``labels``): the labels on
                       the fixed grid through the full mapping, nearest neighbour, same type
    transform.h5       non-linear modes: the full mapping as an ITK composite transform
                       (linear part + displacement field), for sitk.ReadTransform
    result.json        mode, similarity, parameters, objective, confidence, timings,
                       versions, model hash (written last: its presence means complete);
                       non-linear modes add to ``deformation`` the det J figures inside the
                       fixed foreground (``foreground_jacobian``, also in qa.png) and the
                       inverse's method and accuracy (``inverse``)

The folder is written as a whole: its files go into a fresh hidden sibling
(``.NAME.partial-XXXXXXXX``), which then takes the folder's place by rename. A
reader sees the previous result or the complete new one, never a mix: a failed
run leaves the previous result as it was, and files of an earlier run that the
new one does not write (transform.h5 of a deformable run before a rigid one) go
with it. Because the folder is replaced, only a new folder, an empty one or a
previous result may be named for it: a folder holding anything else is refused
(InputError) rather than deleted.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from disa.core.atomic import fsync_dir, write_json
from disa.core.errors import InputError
from disa.core.grid import Grid
from disa.core.io.images import write_image
from disa.core.preprocess import foreground_mask
from disa.core.result_files import (
    DISPLACEMENT_FILE,
    FIELD_TRANSFORM_FILE,
    INVERSE_DISPLACEMENT_FILE,
    QA_FILE,
    REGISTERED_FILE,
    RESULT_FILE,
    RESULT_NAMES,
    TRANSFORM_FILE,
    WARPED_LABELS_FILE,
)
from disa.registration.pipeline import RegistrationResult
from disa.registration.results.labels import describe_labels, warp_labels
from disa.registration.results.qa import moving_data_mask, render_qa, view_centre
from disa.registration.results.readable import (
    VERDICT_COLOURS,
    describe_transform,
    verdict_evidence,
    verdict_line,
)
from disa.registration.transform.displacement import (
    dense_displacement,
    inverse_residual,
    inverse_transform,
    summarise_jacobian,
)

#: Voxels (at most) of the fixed image read for its automatic foreground (the det J
#: figures and the inverse's accuracy count it): a larger image is read every k-th voxel.
FOREGROUND_VOXELS = 4_000_000


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


def check_output_folder(outdir: str | Path) -> Path:
    """Check, before any work, that ``outdir`` can take a result; return its real path.

    Creates missing parent folders. Raises InputError, its message starting with
    ``outdir`` as given, when ``outdir`` is an existing file, is (or holds) the
    current folder, is a folder holding anything but a previous result (replacing
    it would delete those files), or cannot be created (a parent is a file, no
    permission).
    """
    shown = str(outdir)
    target = Path(os.path.realpath(outdir))  # "." and "..", and a link's target folder
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        # Even empty, it would be swapped away from under the shell that stands in it.
        raise InputError(f"{shown}: is the current folder (or holds it); the result replaces "
                         "the whole folder, so name a new folder for it")
    _check_replaceable(target, shown)
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{shown}: cannot create the result folder: {existing.name} is a file, "
                         "not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The sibling that write_result_folder stages into must be creatable there.
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=target.parent))
    except OSError as exc:
        raise InputError(f"{shown}: cannot create the result folder: "
                         f"{exc.strerror or type(exc).__name__}") from exc
    return target


def _check_replaceable(target: Path, shown: str) -> None:
    """InputError unless ``target`` is absent, an empty folder or a previous result's."""
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(f"{shown}: is an existing file, not a folder; name a folder for the "
                         "result")
    with os.scandir(target) as entries:
        foreign = sorted(e.name for e in entries if not _is_result_entry(e))
    if foreign:
        shown_names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"{shown}: folder holds {len(foreign)} file(s) that are not part of a "
                         f"DISA result ({shown_names}); the result replaces the whole folder, so "
                         "name a new or empty folder")


def _is_result_entry(entry: os.DirEntry[str]) -> bool:
    """A file that a result writer leaves: a result name, or the temporary name that an
    interrupted older writer left (".NAME.*" of write_image and atomic_write, ".tmp-*" of
    write_transform)."""
    if not entry.is_file(follow_symlinks=False):
        return False
    name = entry.name
    return (name in RESULT_NAMES or name.startswith(".tmp-")
            or any(name.startswith(f".{known}.") for known in RESULT_NAMES))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target`` (a sibling), replacing what is there.

    Absent or empty ``target`` (the worker's fresh job folder): one rename, atomic.
    A previous result: it is renamed aside first, then ``staging`` in, then the old
    one deleted; for the instant between the two renames ``target`` is absent, never
    a mix, and should the second rename fail the previous result is put back.
    """
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def write_result_folder(result: RegistrationResult, fixed: sitk.Image, moving: sitk.Image,
                        outdir: str | Path, inputs: dict[str, Any] | None = None,
                        extra: Callable[[dict[str, Any], Path], list[str]] | None = None,
                        *, labels: sitk.Image | None = None,
                        labels_path: str | Path | None = None,
                        fixed_mask: sitk.Image | None = None) -> dict[str, Any]:
    """Write transform, registered image, QA picture and result.json; return the JSON data.

    The files are written into a fresh hidden sibling of ``outdir``, which then
    replaces ``outdir`` (module docstring): the previous result stays whole if
    anything fails, and is replaced only by a complete new one. Raises InputError
    when ``outdir`` is a file or a folder holding other files (nothing is deleted).
    ``extra(data, folder)`` writes further files (e.g. DICOM REG) into ``folder``,
    the folder being written, and returns their names; it runs before
    result.json, which stays the last file written. ``labels``: an integer label
    map on the moving grid (``labels.read_label_map``; ``labels_path`` its file,
    for result.json), written as warped_labels.nii.gz on the fixed grid.
    ``fixed_mask`` (non-zero = foreground, any grid in the fixed frame): the
    foreground that the det J figures and the inverse's accuracy count; default
    the fixed image's automatic foreground (``preprocess.foreground_mask``).
    """
    target = Path(os.path.realpath(outdir))
    _check_replaceable(target, str(outdir))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; the API may run as another user
        data = _write_files(result, fixed, moving, staging, inputs, extra,
                            _LabelRequest(labels, labels_path), fixed_mask)
        # Checked again: the folder may have changed during the run.
        _check_replaceable(target, str(outdir))
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # (gone already after the swap)
    return data


@dataclass(frozen=True)
class _LabelRequest:
    """A label map to warp (on the moving grid) and the file it came from."""

    labels: sitk.Image | None
    path: str | Path | None


def fixed_foreground(fixed: sitk.Image, fixed_mask: sitk.Image | None = None,
                     max_voxels: int = FOREGROUND_VOXELS) -> sitk.Image:
    """Where the fixed image has anatomy: UInt8 (1 = foreground) in the fixed frame.

    The user's ``fixed_mask`` when given (non-zero voxels, its own grid), else the
    automatic foreground of the registration (Otsu, dilated, holes filled:
    ``preprocess.foreground_mask``) of the fixed image read every k-th voxel per
    axis (at most ``max_voxels``), on that strided grid (voxel i = fixed voxel k i).
    """
    if fixed_mask is not None:
        return sitk.Cast(fixed_mask != 0, sitk.sitkUInt8)
    size = np.asarray(fixed.GetSize())
    step = max(1, int(np.ceil((float(np.prod(size)) / max_voxels) ** (1 / 3) - 1e-9)))
    sample = np.asarray(sitk.GetArrayViewFromImage(fixed)[::step, ::step, ::step])
    mask = sitk.GetImageFromArray(foreground_mask(sample).astype(np.uint8))
    mask.SetOrigin(fixed.GetOrigin())
    mask.SetSpacing(tuple(float(v) * step for v in fixed.GetSpacing()))
    mask.SetDirection(fixed.GetDirection())
    return mask


def _write_inverse(forward: sitk.Transform, moving: sitk.Image, outdir: Path,
                   foreground: sitk.Image, fixed_spacing: tuple[float, ...]) -> dict[str, Any]:
    """inverse_displacement.nii.gz (moving grid) and its facts for result.json: how it
    was made and how far T(y + v(y)) lands from y where y + v(y) is fixed foreground."""
    start = time.perf_counter()
    # Nodes finer than the finer image's voxels would only cost time (inverse_transform).
    finest = float(min(*fixed_spacing, *moving.GetSpacing()))
    inverse, facts = inverse_transform(forward, min_spacing_mm=finest)
    field = dense_displacement(inverse, moving)
    write_image(field, outdir / INVERSE_DISPLACEMENT_FILE)
    accuracy = inverse_residual(forward, field, foreground)
    return {"file": INVERSE_DISPLACEMENT_FILE, **facts, **accuracy,
            "region": "moving voxels whose fixed point lies in the fixed foreground",
            "seconds": time.perf_counter() - start}


def _write_files(result: RegistrationResult, fixed: sitk.Image, moving: sitk.Image,
                 outdir: Path, inputs: dict[str, Any] | None,
                 extra: Callable[[dict[str, Any], Path], list[str]] | None,
                 labels: _LabelRequest, fixed_mask: sitk.Image | None) -> dict[str, Any]:
    """The files of write_result_folder, into the (staging) folder ``outdir``."""
    write_transform(result.transform, outdir / TRANSFORM_FILE)
    files = [TRANSFORM_FILE, REGISTERED_FILE, QA_FILE, RESULT_FILE]
    final = result.transform
    convention = ("transform.tfm maps fixed points to moving points (LPS mm); "
                  "sitk.Resample(moving, fixed, transform) gives registered.nii.gz")
    deformation: dict[str, Any] | None = None
    jacobian = None
    if result.field_transform is not None and result.displacement is not None:
        final = result.field_transform
        write_transform(final, outdir / FIELD_TRANSFORM_FILE)
        write_image(result.displacement, outdir / DISPLACEMENT_FILE)
        files[1:1] = [FIELD_TRANSFORM_FILE, DISPLACEMENT_FILE, INVERSE_DISPLACEMENT_FILE]
        convention = ("transform.h5 (the full mapping) maps fixed points to moving points "
                      "(LPS mm); sitk.Resample(moving, fixed, sitk.ReadTransform('transform.h5')) "
                      "gives registered.nii.gz; displacement.nii.gz is u(x) = T(x) - x on the "
                      "fixed grid; inverse_displacement.nii.gz is v(y) = T^-1(y) - y on the "
                      "moving grid (moving points to fixed points: sitk.Resample(fixed_labels, "
                      "moving, sitk.DisplacementFieldTransform(v)) carries fixed labels onto "
                      "the moving grid); transform.tfm holds the rigid/affine part only")
        # One foreground for both figures: where labels and anatomy are.
        foreground = fixed_foreground(fixed, fixed_mask)
        jacobian = summarise_jacobian(result.displacement, foreground)
        source = "fixed mask" if fixed_mask is not None else "automatic"
        deformation = {**(result.deformation or {}),
                       "foreground_jacobian": {**jacobian.statistics, "foreground": source},
                       "inverse": _write_inverse(final, moving, outdir, foreground,
                                                 fixed.GetSpacing())}
    registered = resample_moving(moving, fixed, final)
    write_image(registered, outdir / REGISTERED_FILE)
    warped_labels = None
    if labels.labels is not None:
        warped = warp_labels(labels.labels, fixed, final)
        write_image(warped, outdir / WARPED_LABELS_FILE)
        files.insert(files.index(REGISTERED_FILE) + 1, WARPED_LABELS_FILE)
        warped_labels = describe_labels(labels.labels, warped, labels.path or "labels")
    before = resample_moving(moving, fixed, sitk.Transform())
    summary = result.summary()
    evidence = verdict_evidence(summary)
    # The verdict first, with the same evidence and numbers as result.json and the page.
    title = f"{verdict_line({**summary, 'verdict_evidence': evidence})}  |  " \
            f"{result.mode} / {result.similarity}"
    # Once for both: the QA planes and the web viewer's first slices centre on the overlap.
    data_region = moving_data_mask(moving)
    centre = view_centre(fixed, moving, final, moving_mask=data_region)
    render_qa(fixed, registered, before=before, path=outdir / QA_FILE, title=title,
              title_colour=VERDICT_COLOURS.get(str(summary.get("verdict"))),
              displacement=result.displacement, point=centre, moving=moving, transform=final,
              moving_mask=data_region, before_transform=sitk.Transform(), jacobian=jacobian)
    data = {
        "format": "disa-result/1",
        **summary,
        "verdict_evidence": evidence,
        "transform_convention": convention,
        "transform_description": describe_transform(result.matrix,
                                                    Grid.from_image(fixed).center,
                                                    str(result.mode)),
        # LPS mm point that qa.png's planes pass through and the web viewer starts at.
        "view_point_mm": list(centre.point),
        "view_point": centre.source,
        **({"deformation": deformation} if deformation is not None else {}),
        **({"warped_labels": warped_labels} if warped_labels is not None else {}),
        "files": files,
        "inputs": inputs or {},
        "versions": versions(),
    }
    if extra is not None:
        data["files"] += extra(data, outdir)
    write_json(data, outdir / RESULT_FILE)
    return data
