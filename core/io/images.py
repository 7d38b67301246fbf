"""Image input and output for the registration engine.

Reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and
DICOM series (a folder, or a .zip of one) into 3D scalar ``sitkFloat32``
SimpleITK images, and writes images back atomically. This module holds the
entry points that take a path; the work is done by `limits` (caps, header
facts and the checks they share), `file_formats` (NIfTI, NRRD, MetaImage),
`dicom_series` and `dicom_geometry` (DICOM folders and zips) and `itk_calls`.

Coordinates are those of ITK/SimpleITK: physical LPS millimetres. Sizes,
spacings and indices are in ITK order (x, y, z = columns, rows, slices); a
numpy array from ``sitk.GetArrayFromImage`` is indexed the other way round
(z, y, x). A direction is the 3x3 matrix of direction cosines, row-major, whose
columns are the physical directions of the x, y and z axes.

Every input is checked from its header before a single pixel is decoded: a
68-byte .nii.gz can claim a 32 GiB image, and NRRD/MetaImage headers can point
the reader at any local file (docs/DESIGN.md, "Input safety"). Every rejection is an
`InputError` whose message starts with the file's basename and says what is
wrong in words a user can act on; no SimpleITK/C++ text leaks into it.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.dicom_zip import unpacked
from disa.core.io.fast_gzip import write_gzip_nifti
from disa.core.io.file_formats import _check_nifti_data, _inspect_file
from disa.core.io.itk_calls import _execute, _itk_detail
from disa.core.io.limits import _FORMAT_NAMES, DEFAULT_LIMITS, ImageInfo, InputLimits, _dims
from disa.core.io.slice_stack import describe_correction

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# dicom_series (and pydicom with it, ~0.15 s) is imported by the DICOM branches only: a
# NIfTI or MetaImage registration never needs it at process start.

__all__ = [
    "FORMATS",
    "check_regular_file",
    "detect_format",
    "format_info",
    "inspect_image",
    "read_dicom_headers",
    "read_image",
    "write_image",
]


FORMATS = ("nifti", "nrrd", "metaimage", "dicom")

_EXTENSIONS: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".zip": "dicom",
}
_ACCEPTED = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd; .nhdr only with inline data), "
    "MetaImage (.mha; .mhd only with inline data), DICOM series (a folder or a .zip)"
)
# Only single-file formats: a detached header would need a second, non-atomic write.
_WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")


# --------------------------------------------------------------------- public


def detect_format(path: str | Path) -> str:
    """Format of `path`: "nifti", "nrrd", "metaimage" or "dicom".

    Decided by the extension (case-insensitive); a folder is a DICOM series and
    so is a .zip. Raises InputError for anything else.
    """
    path = Path(path)
    name = _name(path)
    ext = _extension(path)
    if path.is_dir():
        if _EXTENSIONS.get(ext, "dicom") != "dicom":
            raise InputError(
                f"{name}: is a folder, but its name says {_FORMAT_NAMES[_EXTENSIONS[ext]]}; "
                "give the image file itself"
            )
        return "dicom"
    fmt = _EXTENSIONS.get(ext)
    if fmt is None:
        shown = f"'{ext}'" if ext else "no extension"
        raise InputError(f"{name}: unknown image format ({shown}); accepted: {_ACCEPTED}")
    return fmt


def inspect_image(
    path: str | Path, limits: InputLimits = DEFAULT_LIMITS, series_uid: str | None = None
) -> ImageInfo:
    """Header facts of an image, after all the checks, without decoding pixels.

    A DICOM zip's headers are read from its members (stopping at the pixel
    data); nothing is unpacked (`dicom_zip`). A file whose pixel data is
    truncated passes here and is caught by `read_image`.
    """
    path = Path(path)
    name = _name(path)
    fmt = _existing_format(path, name, series_uid)
    if fmt == "dicom":
        from disa.core.io.dicom_series import _dicom_sources, _inspect_dicom

        with _dicom_sources(path, name, limits) as sources:
            info, _series = _inspect_dicom(sources, name, limits, series_uid)
        return info
    info, _reader = _inspect_file(path, name, fmt, limits)
    return info


def read_image(
    path: str | Path, limits: InputLimits = DEFAULT_LIMITS, series_uid: str | None = None
) -> sitk.Image:
    """Read a 3D scalar image as ``sitkFloat32`` with its geometry intact.

    Origin, spacing and direction are kept as stored (LPS mm). DICOM pixel
    values have rescale slope and intercept applied (e.g. Hounsfield units),
    and the image carries the series-level tags Modality, Study, Series and
    Frame of Reference UIDs as metadata. `series_uid` picks one series of a
    DICOM folder or zip holding several. Raises InputError for any input that
    fails the checks of `inspect_image` or whose pixel data cannot be decoded.
    """
    path = Path(path)
    name = _name(path)
    fmt = _existing_format(path, name, series_uid)
    if fmt == "dicom":
        from disa.core.io.dicom_series import _dicom_sources, _inspect_dicom, _read_series

        with _dicom_sources(path, name, limits) as sources:
            info, series = _inspect_dicom(sources, name, limits, series_uid)
            if path.is_dir():
                image = _read_series(series, name, {s.key: s.key for s in series.sources})
            else:
                # GDCM decodes files: the series' members only, beside the zip.
                with unpacked(path, list(series.sources), name) as files:
                    image = _read_series(series, name, files)
    else:
        info, reader = _inspect_file(path, name, fmt, limits)
        if fmt == "nifti":
            # The NIfTI reader fills missing data with zeros instead of failing, and
            # turns NaN and Inf voxels into 0: both are checked on the stored data.
            _check_nifti_data(path, name)
        image = sitk.Cast(_execute(reader, name), sitk.sitkFloat32)
    if image.GetDimension() != 3 or tuple(image.GetSize()) != info.size:
        raise InputError(
            f"{name}: decoded image size {_dims(image.GetSize())} differs from the header's "
            f"{_dims(info.size)}; the file is inconsistent"
        )
    _check_finite(image, name)
    return image


def read_dicom_headers(
    path: str | Path, limits: InputLimits = DEFAULT_LIMITS, series_uid: str | None = None
) -> list[Dataset]:
    """Headers (no pixel data) of one DICOM series, in slice order, after all checks.

    For writers of derived objects (Spatial Registration, registered series),
    which need the patient, study and instance identifiers that `read_image`
    deliberately leaves off the image. A multi-frame series gives one header.
    """
    path = Path(path)
    name = _name(path)
    fmt = _existing_format(path, name, series_uid)
    if fmt != "dicom":
        raise InputError(f"{name}: is {_FORMAT_NAMES[fmt]}, not a DICOM series")
    from disa.core.io.dicom_series import _dicom_sources, _inspect_dicom

    with _dicom_sources(path, name, limits) as sources:
        _info, series = _inspect_dicom(sources, name, limits, series_uid)
    return list(series.headers)


def _check_finite(image: sitk.Image, name: str) -> None:
    """Refuse an image holding NaN or infinite voxels (InputError naming the file and counts).

    Why: the percentiles, z-score and descriptors downstream turn one NaN into a
    silently wrong transform. The test is one pass over the decoded float32
    voxels: their float64 sum is finite exactly when every voxel is (NaN and Inf
    propagate, and no sum of float32 values can overflow float64), so no mask
    array is allocated; the counts are taken only for the message.
    """
    values = sitk.GetArrayViewFromImage(image)
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, and that is the answer wanted
        total = values.sum(dtype=np.float64)
    if np.isfinite(total):
        return
    nan = int(np.count_nonzero(np.isnan(values)))
    infinite = int(np.count_nonzero(np.isinf(values)))
    raise InputError(
        f"{name}: {nan + infinite} of {values.size} voxels are not finite ({nan} NaN, "
        f"{infinite} infinite); replace them (e.g. with the background value) before "
        "registering"
    )


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write `image` to `path` atomically, compressed, geometry as stored.

    The image goes to a temporary file in the same folder, is flushed to disk
    and then renamed over `path`, so readers never see a half-written file.
    Accepted: .nii, .nii.gz, .nrrd, .mha (single-file formats).
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in _WRITE_EXTENSIONS:
        raise InputError(
            f"{path.name}: cannot write '{ext or 'no extension'}'; "
            f"output formats: {', '.join(_WRITE_EXTENSIONS)}"
        )
    if not path.parent.is_dir():
        raise InputError(f"{path.name}: output folder {path.parent.name or '.'} does not exist")
    # The temporary name keeps the extension, which is how SimpleITK picks the writer.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp{ext}"
    try:
        try:
            if ext == ".nii.gz":
                write_gzip_nifti(image, tmp)  # (ISA-L: fast_gzip.py says why)
            else:
                writer = sitk.ImageFileWriter()
                writer.SetFileName(str(tmp))
                writer.UseCompressionOn()
                writer.Execute(image)
        except RuntimeError as err:
            raise OSError(f"{path.name}: cannot write image: {_itk_detail(err)}") from err
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def format_info(info: ImageInfo) -> str:
    """Multi-line human-readable description of `info` (for ``disa info FILE``)."""
    d = np.asarray(info.direction, dtype=float).reshape(3, 3)
    extent = tuple(n * s for n, s in zip(info.size, info.spacing, strict=True))
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(info.direction)
    # Largest angle between an image axis and the nearest patient axis.
    obliquity = math.degrees(math.acos(min(1.0, float(np.abs(d).max(axis=0).min()))))
    orient = f"{code} (axes x, y, z point towards {code[0]}, {code[1]}, {code[2]})"
    if obliquity > 0.5:
        orient += f"; oblique by up to {obliquity:.1f} deg, code is the nearest"
    rows = [
        ("file", f"{info.path} ({_FORMAT_NAMES.get(info.format, info.format)})"),
        ("size", f"{_dims(info.size)} voxels (x, y, z)"),
        ("spacing", " x ".join(f"{s:.4g}" for s in info.spacing) + " mm"),
        ("extent", " x ".join(f"{e:.1f}" for e in extent) + " mm"),
        ("origin", "(" + ", ".join(f"{o:.3f}" for o in info.origin) + ") mm, LPS"),
        ("direction", f"{_row(d[0])}  (3x3 matrix; columns = x, y, z axis directions)"),
        ("", _row(d[1])),
        ("", _row(d[2])),
        ("orientation", orient),
        ("pixel type", f"{info.pixel_type}, {info.components} component(s)"),
        ("modality", info.modality or "-"),
    ]
    if info.series_uid is not None:
        rows.append(("series UID", info.series_uid))
    if info.geometry_correction:
        stored = _dims(tuple(info.geometry_correction.get("stored_size", ())))
        rows.append(("correction", f"{describe_correction(info.geometry_correction)} onto "
                                   f"this grid (stored as {stored} voxels)"))
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':' if k else '':<{width}} {v}" for k, v in rows)


def _row(values: np.ndarray) -> str:
    # Adding 0.0 after rounding prints -0.0 as +0.0000.
    return " ".join(f"{round(float(v), 4) + 0.0:+.4f}" for v in values)


# ------------------------------------------------------------- common checks


def _name(path: Path) -> str:
    """Basename used in messages: never the folder a user or server chose."""
    return path.name or path.resolve().name or str(path)


def _extension(path: Path) -> str:
    lower = path.name.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else Path(lower).suffix


def _existing_format(path: Path, name: str, series_uid: str | None) -> str:
    """Format of an input that must exist; file-level checks for single files."""
    if not path.exists():
        raise InputError(f"{name}: file not found")
    fmt = detect_format(path)
    if series_uid is not None and fmt != "dicom":
        raise InputError(f"{name}: series_uid applies only to DICOM input, this is {fmt}")
    if not path.is_dir():
        check_regular_file(path, name)
    return fmt


def check_regular_file(path: Path, name: str) -> None:
    try:
        st = path.stat()
    except OSError as err:
        raise InputError(f"{name}: cannot be accessed ({err.strerror})") from err
    # A FIFO or device named .nii would block or never end.
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{name}: not a regular file")
    if st.st_size == 0:
        raise InputError(f"{name}: file is empty (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise InputError(f"{name}: cannot be read ({err.strerror})") from err
