"""Label maps carried from the moving image onto the fixed grid (``disa register --warp-labels``).

A label map drawn on the moving image (same grid: size, spacing, origin and
direction) is resampled onto the fixed image grid through the result's final
mapping T (fixed point -> moving point, LPS mm: the rigid/affine transform, or
transform.h5's full mapping for the non-linear modes) by nearest neighbour, so
every fixed voxel x gets the label found at T(x); 0 where T(x) falls outside
the moving image. Labels keep their integer voxel type. The other direction
(fixed labels onto the moving grid) is ``sitk.Resample(labels, moving,
DisplacementFieldTransform(inverse_displacement.nii.gz))`` for non-linear
results, and ``transform.GetInverse()`` for linear ones.

The file is checked before any registration work (one-line InputError naming it):
a regular NIfTI, NRRD or MetaImage file, 3D scalar, on the moving image's grid,
whole-number voxel values of at most 2^24 in magnitude (the pixels pass through
the float32 reader of ``io.read_image``, exact up to there; real label maps stay
far below). A label map stored as floating point with whole values is written
with the smallest integer type that holds its values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.images import check_regular_file, inspect_image, read_image
from disa.core.io.limits import DEFAULT_LIMITS, ImageInfo, InputLimits

#: Name of the warped label map in the result folder.
WARPED_LABELS_FILE = "warped_labels.nii.gz"
#: Largest label magnitude read exactly through float32 (2^24).
MAX_LABEL = 2**24
#: Header geometry of the label map may differ from the moving image's by file-format
#: rounding only (NIfTI keeps the origin and the rotation in float32): spacing by this
#: fraction, direction cosines by this much, origin by this fraction of the smallest voxel.
_SPACING_RTOL = 1e-3
_DIRECTION_ATOL = 1e-3
_ORIGIN_VOXELS = 0.05

_INTEGER_TYPES = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                  sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64}
_INTEGER_NAMES = {sitk.GetPixelIDValueAsString(p): p for p in _INTEGER_TYPES}
#: Integer types tried, smallest first, for a label map stored as floating point.
_SMALLEST_FIRST = ((sitk.sitkUInt8, np.uint8), (sitk.sitkInt8, np.int8),
                   (sitk.sitkUInt16, np.uint16), (sitk.sitkInt16, np.int16),
                   (sitk.sitkInt32, np.int32))


def _labelled(message: str) -> str:
    """Messages about the label map say so first, as "fixed: ..." does for the images."""
    return f"label map: {message}"


def read_label_map(path: str | Path, moving: ImageInfo,
                   limits: InputLimits = DEFAULT_LIMITS) -> sitk.Image:
    """Read and check a label map drawn on the moving image (described by ``moving``).

    Returns it as an integer image carrying the moving image's geometry exactly
    (the header's may differ by format rounding only). Raises InputError, its message
    starting "label map: NAME: ", when it is not a regular image file, not 3D scalar,
    not on the moving grid, or not whole numbers within +-2^24.
    """
    path = Path(path)
    name = path.name or str(path)
    if path.is_dir():
        raise InputError(_labelled(f"{name}: is a folder; give a NIfTI, NRRD or MetaImage "
                                   "file of labels on the moving image's grid"))
    try:
        check_regular_file(path, name)
        info = inspect_image(path, limits)
    except InputError as exc:
        raise InputError(_labelled(str(exc))) from exc
    if info.format == "dicom":
        raise InputError(_labelled(f"{name}: a DICOM zip is not a label map; give a NIfTI, "
                                   "NRRD or MetaImage file"))
    _check_on_moving_grid(info, moving, name)
    # (ImageInfo names the stored type in words; None: floating point.)
    stored = _INTEGER_NAMES.get(info.pixel_type)
    try:
        values = read_image(path, limits)
    except InputError as exc:
        raise InputError(_labelled(str(exc))) from exc
    labels = _as_integer(values, stored, name)
    labels.SetOrigin(moving.origin)
    labels.SetSpacing(moving.spacing)
    labels.SetDirection(moving.direction)
    return labels


def _check_on_moving_grid(info: ImageInfo, moving: ImageInfo, name: str) -> None:
    """InputError unless the label map's header describes the moving image's grid."""
    if tuple(info.size) != tuple(moving.size):
        raise InputError(_labelled(
            f"{name}: is {_dims(info.size)} voxels, the moving image {_dims(moving.size)}; "
            "the label map must be on the moving image's grid"))
    problems = []
    spacing, moving_spacing = np.asarray(info.spacing), np.asarray(moving.spacing)
    if not np.allclose(spacing, moving_spacing, rtol=_SPACING_RTOL, atol=0):
        problems.append(f"spacing {_vec(info.spacing)} mm vs {_vec(moving.spacing)}")
    if not np.allclose(info.origin, moving.origin, rtol=0,
                       atol=_ORIGIN_VOXELS * float(moving_spacing.min())):
        problems.append(f"origin {_vec(info.origin)} mm vs {_vec(moving.origin)}")
    if not np.allclose(info.direction, moving.direction, rtol=0, atol=_DIRECTION_ATOL):
        problems.append("direction cosines differ")
    if problems:
        raise InputError(_labelled(
            f"{name}: same size but not the moving image's grid ({'; '.join(problems)}); "
            "the label map must be on the moving image's grid"))


def _as_integer(values: sitk.Image, stored: int | None, name: str) -> sitk.Image:
    """The float32 voxels of a label map back as integers (the stored type when it is one)."""
    array = sitk.GetArrayViewFromImage(values)
    whole = np.equal(np.floor(array), array)
    if not whole.all():
        bad = float(array[~whole].flat[0])
        raise InputError(_labelled(
            f"{name}: voxel values are not whole numbers (e.g. {bad:g}); a label map holds "
            "integer labels (resample labels with nearest neighbour, never linearly)"))
    low, high = float(array.min()), float(array.max())
    if max(abs(low), abs(high)) > MAX_LABEL:
        raise InputError(_labelled(
            f"{name}: labels up to {max(abs(low), abs(high)):.0f}; at most {MAX_LABEL} "
            "are supported"))
    if stored is not None:
        return sitk.Cast(values, stored)
    for pixel_id, dtype in _SMALLEST_FIRST:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return sitk.Cast(values, pixel_id)
    raise AssertionError("unreachable: |labels| <= 2^24 fit int32")


def warp_labels(labels: sitk.Image, fixed: sitk.Image, transform: sitk.Transform
                ) -> sitk.Image:
    """``labels`` (moving grid) on the fixed grid through ``transform`` (fixed point ->
    moving point, LPS mm): nearest neighbour, same voxel type, 0 outside the moving image."""
    return sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0.0,
                         labels.GetPixelID())


def describe_labels(source: sitk.Image, warped: sitk.Image, path: str | Path
                    ) -> dict[str, Any]:
    """result.json's ``warped_labels``: the file, its voxel type and which labels arrived.

    ``labels_missing`` lists the non-zero labels of the source that land on no fixed
    voxel (outside the fixed field of view, or too small for the fixed voxels).
    """
    present = _label_values(source)
    arrived = set(_label_values(warped))
    return {"file": WARPED_LABELS_FILE, "source": Path(path).name,
            "voxel_type": warped.GetPixelIDTypeAsString(),
            "labels": len(present),
            "labels_missing": [v for v in present if v not in arrived]}


def _label_values(image: sitk.Image) -> list[int]:
    """The distinct non-zero labels of an integer image, ascending."""
    array = sitk.GetArrayViewFromImage(image)
    if array.size and array.dtype.kind == "u" and int(array.max()) < 2**16:
        # bincount: one pass instead of np.unique's sort of every voxel.
        counts = np.bincount(np.asarray(array).ravel())
        return [int(v) for v in np.flatnonzero(counts) if v != 0]
    return [int(v) for v in np.unique(array) if v != 0]


def _dims(size: tuple[int, ...] | list[int]) -> str:
    return " x ".join(str(int(n)) for n in size)


def _vec(values: tuple[float, ...] | list[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"
