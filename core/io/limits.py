"""What an accepted image is, and the checks every format's header goes through.

`InputLimits` caps one input before its pixels are read, `ImageInfo` holds the
header facts of one 3D image (ITK order, physical LPS millimetres), and
`_validate` checks those facts against the caps and against what a grid can
hold, the same way for NIfTI, NRRD, MetaImage and DICOM. The small formatting
helpers that the messages of every reader share live here too.
"""

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.dicom_zip import _gib

__all__ = [
    "DEFAULT_LIMITS",
    "ImageInfo",
    "InputLimits",
]


@dataclass(frozen=True)
class InputLimits:
    """Caps applied to one input before its pixels are read.

    `max_zip_members` also caps the number of files in a DICOM folder, because
    the series scan opens every file it finds.
    """

    # per image; run_registration also caps its working grids with it (the one voxel cap)
    max_voxels: int = 512**3
    max_bytes: int = 2 * 1024**3  # decoded pixel bytes per image (voxels x bytes of stored type)
    max_zip_members: int = 4096
    max_zip_bytes: int = 4 * 1024**3  # total uncompressed size of a DICOM zip
    max_compression_ratio: float = 200.0  # per member, zip-bomb guard


DEFAULT_LIMITS = InputLimits()


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of one 3D image, in ITK order and physical LPS millimetres.

    `size` is (x, y, z) in voxels, `spacing` the voxel size in mm along x, y, z,
    `origin` the LPS position in mm of the centre of voxel (0, 0, 0), and
    `direction` the 9 direction cosines, row-major (columns = axis directions).
    `modality` and `series_uid` come from DICOM tags (0008,0060) and
    (0020,000E); they are None for the other formats. `geometry_correction` is
    set when a DICOM series was resampled onto this grid (gantry tilt, variable
    slice spacing; `slice_stack.plan_stack_grid` gives its fields), else None.
    """

    path: str
    format: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    pixel_type: str
    components: int
    modality: str | None
    series_uid: str | None
    geometry_correction: dict | None = None

    def as_dict(self) -> dict:
        """JSON-ready copy (tuples become lists)."""
        return {
            "path": self.path,
            "format": self.format,
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "pixel_type": self.pixel_type,
            "components": self.components,
            "modality": self.modality,
            "series_uid": self.series_uid,
            "geometry_correction": self.geometry_correction,
        }


_FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage", "dicom": "DICOM"}

_MIN_AXIS_VOXELS = 4  # fewer voxels along an axis leave nothing to register
_ORTHONORMAL_TOL = 1e-3  # NIfTI stores the rotation as float32 quaternions

_COMPONENT_BYTES: dict[int, int] = {
    sitk.sitkUInt8: 1,
    sitk.sitkInt8: 1,
    sitk.sitkUInt16: 2,
    sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4,
    sitk.sitkUInt64: 8,
    sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4,
    sitk.sitkFloat64: 8,
}


def _validate(info: ImageInfo, pixel_id: int, limits: InputLimits) -> None:
    """Shape, size and geometry checks shared by all formats (header values only)."""
    name = info.path
    if info.components != 1:
        raise InputError(
            f"{name}: has {info.components} components per voxel ({info.pixel_type}); "
            "a scalar image is required"
        )
    for axis, n in zip("xyz", info.size, strict=True):
        if n < _MIN_AXIS_VOXELS:
            raise InputError(
                f"{name}: too thin to register: the {axis} axis has {n} voxel(s) "
                f"(at least {_MIN_AXIS_VOXELS} needed)"
            )
    voxels = math.prod(info.size)
    if voxels > limits.max_voxels:
        raise InputError(
            f"{name}: header claims {_dims(info.size)} voxels ({_count(voxels)}), "
            f"above the limit of {_count(limits.max_voxels)} voxels"
        )
    nbytes = voxels * _COMPONENT_BYTES.get(pixel_id, 8)
    if nbytes > limits.max_bytes:
        raise InputError(
            f"{name}: header claims {_gib(nbytes)} of pixel data ({info.pixel_type}), "
            f"above the limit of {_gib(limits.max_bytes)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in info.spacing):
        raise InputError(
            f"{name}: voxel spacing {_vec(info.spacing)} mm; spacing must be positive and finite"
        )
    if not all(math.isfinite(o) for o in info.origin):
        raise InputError(f"{name}: origin {_vec(info.origin)} is not a finite position")
    d = np.asarray(info.direction, dtype=float).reshape(3, 3)
    if not np.isfinite(d).all():
        raise InputError(f"{name}: direction cosines are not finite numbers")
    deviation = float(np.abs(d.T @ d - np.eye(3)).max())
    if deviation > _ORTHONORMAL_TOL:
        raise InputError(
            f"{name}: direction cosines are not orthonormal (off by {deviation:.3g}); the header "
            "encodes shear or scaling, which an image grid cannot hold"
        )


# ------------------------------------------------------------------ text


def _dims(size: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in size)


def _vec(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(int(n))
