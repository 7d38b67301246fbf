"""Image input and output for the registration engine.

Reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and
DICOM series (a folder, or a .zip of one) into 3D scalar ``sitkFloat32``
SimpleITK images, and writes images back atomically.

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

import contextlib
import gzip
import math
import os
import re
import stat
import struct
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from disa.core.errors import InputError
from disa.core.io.dicom_zip import DicomSource, _gib, _short, folder_sources, unpacked, zip_sources
from disa.core.io.slice_stack import StackGrid, describe_correction, plan_stack_grid

__all__ = [
    "DEFAULT_LIMITS",
    "FORMATS",
    "ImageInfo",
    "InputLimits",
    "detect_format",
    "format_info",
    "inspect_image",
    "read_dicom_headers",
    "read_image",
    "write_image",
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
# The reader is fixed by the detected format, never guessed by SimpleITK from the
# content: a file then gets exactly the header checks of its own format.
_IMAGE_IO = {
    "nifti": "NiftiImageIO",
    "nrrd": "NrrdImageIO",
    "metaimage": "MetaImageIO",
    "dicom": "GDCMImageIO",
}
_FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage", "dicom": "DICOM"}
# Only single-file formats: a detached header would need a second, non-atomic write.
_WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")

_TEXT_HEADER_MAX = 64 * 1024  # bytes of NRRD/MetaImage text header we are willing to parse
_MIN_AXIS_VOXELS = 4  # fewer voxels along an axis leave nothing to register
_ORTHONORMAL_TOL = 1e-3  # NIfTI stores the rotation as float32 quaternions
_CHUNK = 1024**2

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

# Series-level DICOM tags kept on the image that `read_image` returns, for the
# DICOM outputs (Spatial Registration object) written later. Patient tags are
# deliberately not copied: writers such as NRRD would put them into headers.
_DICOM_TAGS_KEPT = {
    "0008|0060": "Modality",
    "0020|000d": "StudyInstanceUID",
    "0020|000e": "SeriesInstanceUID",
    "0020|0052": "FrameOfReferenceUID",
}


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
            _check_nifti_finite(path, name)
        image = sitk.Cast(_execute(reader, name), sitk.sitkFloat32)
    if image.GetDimension() != 3 or tuple(image.GetSize()) != info.size:
        raise InputError(
            f"{name}: decoded image size {_dims(image.GetSize())} differs from the header's "
            f"{_dims(info.size)}; the file is inconsistent"
        )
    _check_finite(image, name)
    return image


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
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.UseCompressionOn()
        try:
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


def _header_reader(path: str | Path, fmt: str, name: str) -> sitk.ImageFileReader:
    """ImageFileReader that has read the header only (ReadImageInformation is lazy)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IO[fmt])
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(
            f"{name}: not a readable {_FORMAT_NAMES[fmt]} image ({_itk_detail(err)})"
        ) from err
    return reader


def _info_from_reader(reader: sitk.ImageFileReader, name: str, fmt: str) -> ImageInfo:
    dim = reader.GetDimension()
    if dim != 3:
        raise InputError(
            f"{name}: is a {dim}D image ({_dims(reader.GetSize())} voxels); a 3D volume is required"
        )
    return ImageInfo(
        path=name,
        format=fmt,
        size=_triple(reader.GetSize(), int),
        spacing=_triple(reader.GetSpacing(), float),
        origin=_triple(reader.GetOrigin(), float),
        direction=tuple(float(v) for v in reader.GetDirection()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        components=int(reader.GetNumberOfComponents()),
        modality=None,
        series_uid=None,
    )


def _execute(reader: sitk.ImageFileReader | sitk.ImageSeriesReader, name: str) -> sitk.Image:
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as err:
        raise InputError(
            f"{name}: cannot read the pixel data; the file is truncated or corrupt "
            f"({_itk_detail(err)})"
        ) from err


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK warnings on stderr (e.g. 'No Series were found'); errors still raise."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


_ITK_PREFIX = re.compile(r"(?:ITK ERROR|itk::ERROR|ERROR):\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?")
_ABS_PATH = re.compile(r"/[^\s\"':]+")


def _itk_detail(err: Exception) -> str:
    """The useful words of a SimpleITK error: no C++ source paths, no folders."""
    text = str(err)
    found = list(_ITK_PREFIX.finditer(text))
    if found:
        text = text[found[-1].end() :]
    text = _ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")), text)
    lines = [ln.strip().removeprefix("[nrrd]").strip() for ln in text.splitlines()]
    # The SimpleITK wrapper line only names a C++ source file.
    lines = [ln for ln in lines if ln and not ln.startswith("Exception thrown in SimpleITK")]
    if not lines:
        return "reader failed"
    parts = [ln.rstrip(":") for ln in lines[:1] + lines[1:][-1:]]
    return _short("; ".join(parts), 200)


# ----------------------------------------------------------- single files


def _inspect_file(
    path: Path, name: str, fmt: str, limits: InputLimits
) -> tuple[ImageInfo, sitk.ImageFileReader]:
    layout = None
    if fmt == "nifti":
        layout = _nifti_layout(path, name)
    elif fmt == "nrrd":
        _check_nrrd_header(path, name)
    elif fmt == "metaimage":
        _check_metaimage_header(path, name)
    try:
        reader = _header_reader(path, fmt, name)
    except InputError:
        if layout is not None and _is_gzip(path, name):
            # The NIfTI reader says only "not recognized"; name the real cause
            # if it is broken gzip (bounded by the byte cap: caps are unchecked yet).
            _scan_gzip(path, name, min(layout.vox_offset + layout.data_bytes, limits.max_bytes))
        raise
    info = _info_from_reader(reader, name, fmt)
    _validate(info, reader.GetPixelID(), limits)
    return info, reader


def _read_prefix(path: Path, name: str, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as err:
        raise InputError(f"{name}: cannot be read ({err.strerror})") from err


def _is_gzip(path: Path, name: str) -> bool:
    # znzlib reads plain and gzip NIfTI alike, whatever the extension says.
    return _read_prefix(path, name, 2) == b"\x1f\x8b"


@dataclass(frozen=True)
class _NiftiLayout:
    vox_offset: int
    data_bytes: int


def _nifti_layout(path: Path, name: str) -> _NiftiLayout:
    """Parse the raw NIfTI-1/2 header: magic, dims, pixdim, data offset.

    The ITK reader quietly replaces a NaN or zero pixdim by 1 mm and accepts a
    header-only .hdr/.img pair under a .nii name, so these are checked here.
    """
    head = _nifti_head(path, name)
    if len(head) < 348:
        raise InputError(f"{name}: not a NIfTI file ({len(head)} bytes, shorter than a header)")
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack_from(endian + "i", head, 0)
        if sizeof_hdr in (348, 540):
            break
    else:
        raise InputError(f"{name}: not a NIfTI file (no NIfTI header size field)")
    if sizeof_hdr == 348:
        magic = head[344:348]
        pair, single = magic == b"ni1\0", magic == b"n+1\0"
        dims = struct.unpack_from(endian + "8h", head, 40)
        (bitpix,) = struct.unpack_from(endian + "h", head, 72)
        pixdim = struct.unpack_from(endian + "8f", head, 76)
        (vox_offset,) = struct.unpack_from(endian + "f", head, 108)
        qform, sform = struct.unpack_from(endian + "2h", head, 252)
        quatern = struct.unpack_from(endian + "6f", head, 256)
        srows = struct.unpack_from(endian + "12f", head, 280)
    else:
        if len(head) < 540:
            raise InputError(f"{name}: NIfTI-2 header is truncated")
        magic = head[4:12]
        pair, single = magic[:4] == b"ni2\0", magic[:4] == b"n+2\0"
        (bitpix,) = struct.unpack_from(endian + "h", head, 14)
        dims = struct.unpack_from(endian + "8q", head, 16)
        pixdim = struct.unpack_from(endian + "8d", head, 104)
        (vox_offset,) = struct.unpack_from(endian + "q", head, 168)
        qform, sform = struct.unpack_from(endian + "2i", head, 344)
        quatern = struct.unpack_from(endian + "6d", head, 352)
        srows = struct.unpack_from(endian + "12d", head, 400)
    if pair:
        raise InputError(
            f"{name}: is the header of a NIfTI pair (.hdr/.img) whose pixels are in a separate "
            "data file, which is not accepted; save it as a single .nii or .nii.gz"
        )
    if not single:
        raise InputError(f"{name}: not a NIfTI file (bad magic string)")
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(n < 1 for n in dims[1 : ndim + 1]):
        raise InputError(f"{name}: NIfTI header has invalid dimensions {list(dims[: ndim + 1])}")
    spatial = pixdim[1 : min(ndim, 3) + 1]
    if not all(math.isfinite(s) and s > 0 for s in spatial):
        raise InputError(
            f"{name}: NIfTI pixdim gives voxel spacing {_vec(spatial)} mm; "
            "spacing must be positive and finite"
        )
    used = (quatern if qform > 0 else ()) + (srows if sform > 0 else ())
    if not all(math.isfinite(v) for v in used):
        raise InputError(f"{name}: NIfTI orientation (qform/sform) holds non-finite numbers")
    if bitpix <= 0 or bitpix % 8 or not math.isfinite(vox_offset) or vox_offset < 0:
        raise InputError(f"{name}: NIfTI header is corrupt (bitpix {bitpix}, offset {vox_offset})")
    # Like the NIfTI library, read a too-small offset as "data right after the header".
    offset = max(int(vox_offset), sizeof_hdr)
    return _NiftiLayout(offset, math.prod(dims[1 : ndim + 1]) * bitpix // 8)


def _nifti_head(path: Path, name: str) -> bytes:
    """First 540 bytes (a NIfTI-2 header) of the file, decompressed if it is gzip."""
    if not _is_gzip(path, name):
        return _read_prefix(path, name, 540)
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read(540)
    except EOFError as err:
        raise InputError(
            f"{name}: gzip data is truncated (the stream ends inside the header)"
        ) from err
    except (OSError, zlib.error) as err:
        raise InputError(f"{name}: corrupt gzip data ({_short(str(err), 80)})") from err


def _check_nifti_data(path: Path, name: str) -> None:
    """Fail on truncated NIfTI pixel data, which ITK would silently pad with zeros.

    Runs after the size caps, so the bytes it reads are bounded by them.
    """
    layout = _nifti_layout(path, name)
    need = layout.vox_offset + layout.data_bytes
    if _is_gzip(path, name):
        got = _scan_gzip(path, name, need)
        what = f"decompresses to {got} bytes"
    else:
        got = path.stat().st_size
        what = f"{got} bytes"
    if got < need:
        raise InputError(f"{name}: file is truncated: {what}, its header needs {need}")


_FINITE_CHUNK_BYTES = 16 * 1024**2  # stored NIfTI data examined at a time


def _check_nifti_finite(path: Path, name: str) -> None:
    """Refuse NIfTI data holding NaN or infinite voxels, read as stored.

    Why here and not on the decoded image: ITK's NIfTI reader turns NaN and Inf
    into 0, so the same image that is refused as NRRD or MetaImage would register
    quietly as NIfTI. nibabel's array proxy reads the stored values (scaled by
    scl_slope/scl_inter, as ITK does) slab by slab along the slowest axis, so at
    most about `_FINITE_CHUNK_BYTES` of them are in memory at once. Integer data
    cannot hold NaN; it is passed over. Runs after the size and truncation checks.
    """
    import nibabel

    try:
        proxy = nibabel.load(str(path)).dataobj
        stored = np.dtype(proxy.dtype)
    except Exception as err:  # nibabel raises many kinds on what ITK accepted
        raise InputError(f"{name}: NIfTI data cannot be read ({_short(str(err), 80)})") from err
    if stored.kind not in "fc":
        return
    shape = tuple(int(n) for n in proxy.shape)
    plane = max(1, math.prod(shape[:-1]) * stored.itemsize)
    step = max(1, _FINITE_CHUNK_BYTES // plane)
    nan = infinite = 0
    for start in range(0, shape[-1], step):
        slab = np.asarray(proxy[..., start:start + step])
        with np.errstate(invalid="ignore"):
            if np.isfinite(slab.sum(dtype=np.float64)):
                continue
        nan += int(np.count_nonzero(np.isnan(slab)))
        infinite += int(np.count_nonzero(np.isinf(slab)))
    if nan or infinite:
        raise InputError(
            f"{name}: {nan + infinite} of {math.prod(shape)} voxels are not finite ({nan} NaN, "
            f"{infinite} infinite); replace them (e.g. with the background value) before "
            "registering"
        )


def _scan_gzip(path: Path, name: str, limit: int) -> int:
    """Decompress up to `limit` bytes; return how many there were.

    Raises InputError for a stream cut short or corrupt. When the stream ends
    within the limit, Python also checks the gzip CRC.
    """
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            while got < limit and (chunk := fh.read(min(_CHUNK, limit - got))):
                got += len(chunk)
            if got == limit:
                fh.read(64 * 1024)  # reach the end of the stream, if it is there
    except EOFError as err:
        raise InputError(
            f"{name}: gzip data is truncated (the stream ends early); the file is incomplete"
        ) from err
    except (OSError, zlib.error) as err:
        raise InputError(f"{name}: corrupt gzip data ({_short(str(err), 80)})") from err
    return got


def _text_header_lines(path: Path, name: str) -> tuple[list[str], bool]:
    """Lines of a text header (latin-1) and whether the whole file fit in the cap."""
    head = _read_prefix(path, name, _TEXT_HEADER_MAX + 1)
    whole = len(head) <= _TEXT_HEADER_MAX
    return [raw.decode("latin-1").rstrip("\r") for raw in head.split(b"\n")], whole


def _detached(name: str, field: str, value: str, single: str) -> InputError:
    return InputError(
        f"{name}: header points to a separate data file ({field} {_short(value, 60)}); only "
        f"inline pixel data is accepted, so that no other file is ever read. Save it as a "
        f"single {single} file"
    )


def _check_numbers(name: str, key: str, value: str, spacing: bool) -> None:
    """Reject NaN/inf (and, for spacing, non-positive values) in a geometry field.

    MetaIO reads 'nan' as 0 and the NIfTI library replaces a NaN pixdim by 1, so
    the header text is checked before either gets to it. Words that are not
    numbers (NRRD's 'none') are left to the reader.
    """
    numbers = []
    for token in re.split(r"[\s,()]+", value):
        with contextlib.suppress(ValueError):
            numbers.append(float(token))
    if spacing and not (numbers and all(math.isfinite(v) and v > 0 for v in numbers)):
        raise InputError(
            f"{name}: header gives voxel spacing '{_short(value, 60)}' ({key}); "
            "spacing must be positive and finite"
        )
    if not all(math.isfinite(v) for v in numbers):
        raise InputError(
            f"{name}: header field {key} = '{_short(value, 60)}' holds a value that is not a "
            "finite number"
        )


_META_SPACING = {"elementspacing"}
_META_GEOMETRY = {
    "elementsize",
    "offset",
    "origin",
    "position",
    "transformmatrix",
    "rotation",
    "orientation",
}


def _check_metaimage_header(path: Path, name: str) -> None:
    """Accept only ``ElementDataFile = LOCAL`` (pixels inline after the header).

    Any other value names a file (or a list or pattern of files) that MetaIO
    would open: a way to read arbitrary local files through an upload.
    """
    lines, whole = _text_header_lines(path, name)
    if not whole:
        lines = lines[:-1]  # cut at the cap: the last line may be partial
    for line in lines:
        text = line.strip()
        if not text:
            continue
        key, sep, value = text.partition("=")
        if not sep:
            raise InputError(f"{name}: not a MetaImage header (a line without 'key = value')")
        key, value = key.strip(), value.strip()
        low = key.lower()
        if low == "elementdatafile":
            if value.lower() != "local":
                raise _detached(name, "ElementDataFile =", value, ".mha")
            return
        if low in _META_SPACING or low in _META_GEOMETRY:
            _check_numbers(name, key, value, spacing=low in _META_SPACING)
    raise InputError(
        f"{name}: not a MetaImage file (no ElementDataFile line in the first "
        f"{_TEXT_HEADER_MAX // 1024} KiB)"
    )


# Fields ITK turns into geometry. NRRD writes NaN in 'spacings' of axes that a
# 'space directions' vector describes, so spacings count only without one.
_NRRD_GEOMETRY = ("spacedirections", "spaceorigin", "spacings")


def _check_nrrd_header(path: Path, name: str) -> None:
    """Reject NRRD headers with a 'data file' field (detached pixel data).

    The header ends at the first blank line; .nhdr files may end without one.
    """
    lines, whole = _text_header_lines(path, name)
    if not lines[0].startswith("NRRD000"):
        raise InputError(f"{name}: not a NRRD file (no NRRD magic line)")
    if not whole:
        lines = lines[:-1]  # cut at the cap: the last line may be partial
    ended = False
    fields: dict[str, tuple[str, str]] = {}
    for line in lines[1:]:
        if not line.strip():
            ended = True
            break
        if line.startswith("#"):
            continue
        key, _sep, value = line.partition(":")
        norm = key.strip().lower().replace(" ", "")
        # Checked before the ':=' key/value test: no spelling of it may slip through.
        if norm == "datafile":
            raise _detached(name, "data file:", value.strip(), ".nrrd")
        if value.startswith("="):
            continue  # 'key:=value' pair: free text, never read as a field
        if norm in _NRRD_GEOMETRY:
            fields[norm] = (key.strip(), value.strip())
    for norm in _NRRD_GEOMETRY:
        if norm in fields and not (norm == "spacings" and "spacedirections" in fields):
            _check_numbers(name, *fields[norm], spacing=norm == "spacings")
    if not ended and not whole:
        raise InputError(
            f"{name}: NRRD header is longer than {_TEXT_HEADER_MAX // 1024} KiB; not accepted"
        )


# ----------------------------------------------------------------- DICOM


@contextlib.contextmanager
def _dicom_sources(path: Path, name: str, limits: InputLimits) -> Iterator[list[DicomSource]]:
    """The candidate DICOM files: those of a folder, or the members of a zip (checked,
    not unpacked; valid while the block runs)."""
    if path.is_dir():
        yield folder_sources(path, name, limits.max_zip_members)
        return
    with zip_sources(path, name, limits) as sources:
        yield sources


# Tolerances of the series consistency checks. Scanners write positions and
# cosines as decimal strings of about six digits, so exact equality is too strict.
_IOP_TOL = 1e-3  # direction cosines of two slices: about 0.06 degrees apart at most
_SPACING_REL_TOL = 1e-3  # pixel spacing of two slices
_DEFER_BYTES = 64 * 1024  # header values larger than this are never loaded (private blobs)


@dataclass(frozen=True)
class _DicomSeries:
    """One DICOM series as a regular grid: files, slice order and geometry (LPS mm, ITK order).

    Single-frame series: `sources` are in slice order and `frame_order` is None.
    Multi-frame (enhanced) series: one file, and `frame_order[k]` is the
    stored frame that is slice k. Slice order is ascending position along the
    normal, row x column direction cosines, so the direction is a proper rotation.
    """

    uid: str
    sources: tuple[DicomSource, ...]
    frame_order: tuple[int, ...] | None
    headers: tuple[Dataset, ...]
    grid: StackGrid  # the image's grid; a plan to resample onto it when tilted or uneven
    tags: dict[str, str]

    @property
    def stored_size(self) -> tuple[int, int, int]:
        """(columns, rows, slices) as stored, before any resampling."""
        return self.grid.stored_size or self.grid.size


@dataclass(frozen=True)
class _Frame:
    """Geometry of one slice as its header states it (LPS mm)."""

    orientation: np.ndarray  # 6 cosines: row direction, then column direction
    position: np.ndarray  # centre of the first pixel
    pixel_spacing: np.ndarray  # (between rows, between columns), as DICOM orders it


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
    with _dicom_sources(path, name, limits) as sources:
        _info, series = _inspect_dicom(sources, name, limits, series_uid)
    return list(series.headers)


def _inspect_dicom(
    sources: list[DicomSource], name: str, limits: InputLimits, series_uid: str | None
) -> tuple[ImageInfo, _DicomSeries]:
    """Header facts of one DICOM series among `sources`, with the series in slice order.

    Headers are read with pydicom (no pixel data). The geometry comes from the
    slice positions, never from SliceThickness or SpacingBetweenSlices:
    slices are sorted by their position along the normal and the slice spacing
    is the mean step. A gantry tilt (positions drifting sideways along a
    straight line) or a spacing that varies along the series gives a grid to
    resample onto (`slice_stack`); a gap of missing slices, sideways drift that
    is no tilt, mixed orientations, sizes or spacings and duplicate positions
    are refused, because no grid describes them.
    """
    found, skipped = _scan_dicom(sources, name)
    if not found:
        detail = ""
        if skipped:
            detail = (f" (skipped {len(skipped)} file(s) that are not DICOM images: "
                      f"{_listed(sorted(s.file for s in skipped))})")
        raise InputError(f"{name}: no DICOM series found{detail}")
    uid = _choose_series(name, found, series_uid)
    # A file without the preamble that names this series but is no complete image would
    # otherwise be a silently missing slice (the first or last escapes the gap check).
    partial = sorted(s.file for s in skipped if s.series_uid == uid)
    if partial:
        raise InputError(
            f"{name}: {len(partial)} file(s) of DICOM series {_short(uid, 70)} lack the DICM "
            f"preamble and SOPClassUID, Rows or Columns: {_listed(partial)}; cannot read "
            "them as slices"
        )
    series = _series_geometry(name, uid, found[uid])
    pixel_id, components = _dicom_pixel_type(series.headers[0])
    info = ImageInfo(
        path=name,
        format="dicom",
        size=series.grid.size,
        spacing=series.grid.spacing,
        origin=series.grid.origin,
        direction=series.grid.direction,
        pixel_type=sitk.GetPixelIDValueAsString(pixel_id),
        components=components,
        modality=series.tags.get("0008|0060") or None,
        series_uid=uid,
        geometry_correction=series.grid.correction,
    )
    _validate(info, pixel_id, limits)
    return info, series


_STORED_TYPES = {(8, 0): sitk.sitkUInt8, (8, 1): sitk.sitkInt8, (16, 0): sitk.sitkUInt16,
                 (16, 1): sitk.sitkInt16, (32, 0): sitk.sitkUInt32, (32, 1): sitk.sitkInt32}
_INTEGER_RANGES = ((sitk.sitkUInt8, 0, 255), (sitk.sitkInt8, -128, 127),
                   (sitk.sitkUInt16, 0, 65535), (sitk.sitkInt16, -32768, 32767),
                   (sitk.sitkUInt32, 0, 2**32 - 1), (sitk.sitkInt32, -(2**31), 2**31 - 1))


def _dicom_pixel_type(ds: Dataset) -> tuple[int, int]:
    """SimpleITK pixel type and components of the decoded pixels, from the header alone.

    As GDCM decides it: the stored type (BitsAllocated, PixelRepresentation), or,
    with a rescale, the smallest integer type that holds the rescaled range when
    slope and intercept are whole numbers, else 64-bit float. Unknown -> 64-bit float
    (the largest, for the byte cap).
    """
    components = max(1, _int(ds, "SamplesPerPixel"))
    stored = _STORED_TYPES.get((_int(ds, "BitsAllocated"), _int(ds, "PixelRepresentation")))
    rescale = ds
    if "RescaleSlope" not in ds:
        item = _functional_item(ds, 0, "PixelValueTransformationSequence") \
            if _frames_in(ds) > 1 else None
        rescale = item if item is not None else ds
    slope = _numbers(rescale, "RescaleSlope", 1)
    intercept = _numbers(rescale, "RescaleIntercept", 1)
    a = float(slope[0]) if slope is not None else 1.0
    b = float(intercept[0]) if intercept is not None else 0.0
    if stored is None:
        return sitk.sitkFloat64, components
    if a == 1.0 and b == 0.0:
        return stored, components
    if not (a.is_integer() and b.is_integer()):
        return sitk.sitkFloat64, components
    low, high = next((lo, hi) for pid, lo, hi in _INTEGER_RANGES if pid == stored)
    ends = (a * low + b, a * high + b)
    for pid, lo, hi in _INTEGER_RANGES:
        if lo <= min(ends) and max(ends) <= hi:
            return pid, components
    return sitk.sitkFloat64, components


@dataclass(frozen=True)
class _Skipped:
    """A file of a DICOM folder that is not used: its basename, and the series it names
    (SeriesInstanceUID, empty when none) if it parsed as a DICOM dataset."""

    file: str
    series_uid: str


def _scan_dicom(
    sources: list[DicomSource], name: str
) -> tuple[dict[str, list[tuple[DicomSource, Dataset]]], list[_Skipped]]:
    """Image headers of `sources` (a folder's files or a zip's members), grouped by series.

    Files with the 'DICM' preamble are DICOM; DICOM objects without pixels
    among them (DICOMDIR, registrations, reports) are passed over, and one
    that breaks while parsing is an error: skipping it would hide a slice.
    Files without the preamble (a raw dataset, as some PACS exports write) are
    read again with pydicom's force=True when they start like a dataset, and
    used when they hold SOPClassUID, Rows, Columns and SeriesInstanceUID; the
    force is needed only there, so the checks stay header-first either way
    (no pixel data, large values deferred). Files passed over without the
    preamble are returned as well, for the callers' messages.
    """
    series: dict[str, list[tuple[DicomSource, Dataset]]] = {}
    skipped: list[_Skipped] = []
    for source in sources:
        try:
            with source.open() as fh, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every odd value
                ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=_DEFER_BYTES)
        except InvalidDicomError:
            if _has_dicom_preamble(source):
                raise InputError(f"{name}: holds a DICOM file that cannot be parsed") from None
            raw = _read_raw_dataset(source)
            uid = str(raw.get("SeriesInstanceUID", "") or "").strip() if raw is not None else ""
            if raw is None or "SOPClassUID" not in raw or "Rows" not in raw \
                    or "Columns" not in raw or not uid:
                skipped.append(_Skipped(source.label, uid))
                continue
            ds = raw
        except InputError:
            raise
        except Exception as err:  # pydicom raises many kinds on hostile input
            raise InputError(
                f"{name}: holds a DICOM file that cannot be parsed ({_short(str(err), 80)})"
            ) from err
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if uid and "Rows" in ds and "Columns" in ds:
            series.setdefault(uid, []).append((source, ds))
    return series, skipped


# First tag groups a raw (preamble-less) little-endian dataset starts with: the file meta
# group, or the identifying group every image has (SOPClassUID is (0008,0016)).
_RAW_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00")


def _read_raw_dataset(source: DicomSource) -> Dataset | None:
    """A preamble-less file read with force=True; None when it does not parse as one.

    Only files whose first tag is in group 0002 or 0008 are tried: force=True
    makes pydicom read any bytes as elements, and text or image files beside a
    series should stay what they are, skipped.
    """
    try:
        with source.open() as fh:
            if fh.read(2) not in _RAW_DICOM_GROUPS:
                return None
            fh.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pydicom.dcmread(
                    fh, stop_before_pixels=True, defer_size=_DEFER_BYTES, force=True)
    except InputError:
        raise
    except Exception:  # anything pydicom raises on bytes that are no dataset after all
        return None


def _listed(files: list[str], shown: int = 3) -> str:
    """Up to `shown` basenames, then how many more."""
    text = ", ".join(_short(f, 40) for f in files[:shown])
    return text + (f" and {len(files) - shown} more" if len(files) > shown else "")


def _has_dicom_preamble(source: DicomSource) -> bool:
    try:
        with source.open() as fh:
            return fh.read(132)[128:] == b"DICM"
    except InputError:
        raise
    except Exception:  # OSError, or a zip member that breaks on reading
        return False


def _frames_in(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _choose_series(
    name: str, found: dict[str, list[tuple[str, Dataset]]], series_uid: str | None
) -> str:
    ids = list(found)
    if series_uid is not None and series_uid in found:
        return series_uid
    if series_uid is None and len(ids) == 1:
        return ids[0]
    listed = [f"{uid} ({sum(_frames_in(ds) for _f, ds in found[uid])} slices)" for uid in ids[:20]]
    if len(ids) > 20:
        listed.append(f"and {len(ids) - 20} more")
    if series_uid is None:
        raise InputError(
            f"{name}: holds {len(ids)} DICOM series; choose one with series_uid: "
            + ", ".join(listed)
        )
    raise InputError(
        f"{name}: DICOM series {_short(series_uid, 70)} is not in it; its series: "
        + ", ".join(listed)
    )


def _series_geometry(
    name: str, uid: str, items: list[tuple[DicomSource, Dataset]]
) -> _DicomSeries:
    """Check one series for consistency and derive its grid (see `_inspect_dicom`)."""
    label = f"DICOM series {_short(uid, 70)}"
    headers = [ds for _f, ds in items]
    multi = [ds for ds in headers if _frames_in(ds) > 1]
    if multi and len(headers) > 1:
        raise InputError(
            f"{name}: {label} mixes multi-frame files with others; give one file per series"
        )
    sizes = sorted({(_int(ds, "Rows"), _int(ds, "Columns")) for ds in headers})
    if len(sizes) > 1:
        shown = " and ".join(f"{c}x{r}" for r, c in sizes[:2])
        raise InputError(f"{name}: {label} mixes image sizes ({shown} pixels)")
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in headers}
    if len(frames_of_reference) > 1:
        raise InputError(f"{name}: {label} mixes frames of reference (FrameOfReferenceUID)")
    if multi:
        frames = _multiframe_frames(name, label, headers[0])
    else:
        frames = [_single_frame(name, label, ds) for ds in headers]
    rows, cols = sizes[0]
    order, grid = _stack_geometry(name, label, frames, (cols, rows))
    if multi:
        sources: tuple[DicomSource, ...] = (items[0][0],)
        frame_order: tuple[int, ...] | None = tuple(order)
        kept: tuple[Dataset, ...] = (headers[0],)
    else:
        sources = tuple(items[i][0] for i in order)
        frame_order = None
        kept = tuple(headers[i] for i in order)
    first = kept[0]
    tags = {}
    for key, keyword in _DICOM_TAGS_KEPT.items():
        value = str(first.get(keyword, "") or "").strip()
        if value:
            tags[key] = value
    return _DicomSeries(
        uid=uid,
        sources=sources,
        frame_order=frame_order,
        headers=kept,
        grid=grid,
        tags=tags,
    )


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return -1


def _numbers(source: Dataset | None, keyword: str, count: int) -> np.ndarray | None:
    """`count` finite floats from a multi-valued decimal string, or None."""
    if source is None or keyword not in source:
        return None
    value = source.get(keyword)
    try:
        items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        numbers = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        return None
    return numbers


def _single_frame(name: str, label: str, ds: Dataset) -> _Frame:
    return _frame(name, label, ds, ds, ds)


def _frame(
    name: str,
    label: str,
    orientation_item: Dataset | None,
    position_item: Dataset | None,
    measures_item: Dataset | None,
) -> _Frame:
    orientation = _numbers(orientation_item, "ImageOrientationPatient", 6)
    position = _numbers(position_item, "ImagePositionPatient", 3)
    pixel_spacing = _numbers(measures_item, "PixelSpacing", 2)
    missing = [
        keyword
        for keyword, value in (
            ("ImageOrientationPatient", orientation),
            ("ImagePositionPatient", position),
            ("PixelSpacing", pixel_spacing),
        )
        if value is None
    ]
    if missing:
        raise InputError(
            f"{name}: {label} lacks a valid {' and '.join(missing)}; a volume needs the "
            "patient geometry of every slice"
        )
    assert orientation is not None and position is not None and pixel_spacing is not None
    return _Frame(orientation, position, pixel_spacing)


def _functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """First item of functional group `keyword` for frame `index`: per-frame, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in (per_frame[index] if per_frame else None, shared[0] if shared else None):
        if groups is not None and keyword in groups and len(groups.get(keyword)) > 0:
            return groups.get(keyword)[0]
    return None


def _multiframe_frames(name: str, label: str, ds: Dataset) -> list[_Frame]:
    """Per-frame geometry of a multi-frame file.

    Enhanced objects (CT, MR, PET...) state each frame's position in the
    functional groups. A legacy multi-frame file states one position and
    orientation plus SpacingBetweenSlices: frame k lies k steps along the
    normal (how GDCM and the NM IOD read it).
    """
    count = _frames_in(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None or "SharedFunctionalGroupsSequence" in ds:
        if per_frame is None or len(per_frame) != count:
            raise InputError(
                f"{name}: {label} has {count} frames but "
                f"{len(per_frame) if per_frame is not None else 'no'} per-frame functional "
                "groups; the file is inconsistent"
            )
        rescales = set()
        for k in range(count):
            item = _functional_item(ds, k, "PixelValueTransformationSequence")
            if item is not None:
                rescales.add(
                    (
                        str(item.get("RescaleSlope", "1")).strip(),
                        str(item.get("RescaleIntercept", "0")).strip(),
                    )
                )
        if len(rescales) > 1:
            raise InputError(
                f"{name}: {label} rescales pixel values differently frame by frame; not supported"
            )
        return [
            _frame(
                name,
                label,
                _functional_item(ds, k, "PlaneOrientationSequence"),
                _functional_item(ds, k, "PlanePositionSequence"),
                _functional_item(ds, k, "PixelMeasuresSequence"),
            )
            for k in range(count)
        ]
    first = _single_frame(name, label, ds)
    step = _numbers(ds, "SpacingBetweenSlices", 1)
    if step is None or not step[0] > 0:
        raise InputError(
            f"{name}: {label} is a multi-frame file without per-frame positions or "
            "SpacingBetweenSlices; its slice geometry is unknown"
        )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    return [
        _Frame(first.orientation, first.position + k * float(step[0]) * normal, first.pixel_spacing)
        for k in range(count)
    ]


def _stack_geometry(
    name: str, label: str, frames: list[_Frame], matrix: tuple[int, int]
) -> tuple[list[int], StackGrid]:
    """Slice order and grid of a stack of slices (`slice_stack.plan_stack_grid`).

    Slices are ordered by their position along the normal n = row x column
    direction, so the third axis is +n and the direction matrix [r c n] is a
    rotation. A gantry tilt or a slice spacing that varies gives a grid to
    resample onto; what cannot be corrected (mixed orientations, a gap of
    missing slices, ...) raises InputError. `matrix` is (columns, rows).
    """
    orientations = np.stack([f.orientation for f in frames])
    if float(np.abs(orientations - orientations[0]).max()) > _IOP_TOL:
        raise InputError(
            f"{name}: {label} mixes slice orientations (ImageOrientationPatient differs "
            "between slices); give one stack per series"
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if abs(norms[0] - 1.0) > 1e-2 or abs(norms[1] - 1.0) > 1e-2 or abs(float(row @ col)) > 1e-2:
        raise InputError(
            f"{name}: {label} has ImageOrientationPatient cosines that are not orthonormal"
        )
    row, col = row / norms[0], col / norms[1]
    col = col - (col @ row) * row  # remove the rounding residue of the stored decimals
    col /= np.linalg.norm(col)
    spacings = np.stack([f.pixel_spacing for f in frames])
    if not (spacings > 0).all():
        raise InputError(f"{name}: {label} has a pixel spacing that is not positive")
    if float(np.abs(spacings / spacings[0] - 1.0).max()) > _SPACING_REL_TOL:
        other = spacings[int(np.abs(spacings / spacings[0] - 1.0).max(axis=1).argmax())]
        raise InputError(
            f"{name}: {label} mixes pixel spacings ({_pair(spacings[0])} and {_pair(other)} mm)"
        )
    positions = np.stack([f.position for f in frames])
    # DICOM's PixelSpacing is (between rows, between columns): x spacing second.
    return plan_stack_grid(name, label, row, col, positions,
                           (float(spacings[0][1]), float(spacings[0][0])), matrix)


def _pair(values: np.ndarray) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _read_series(series: _DicomSeries, name: str, files: dict[str, str]) -> sitk.Image:
    """Decode the pixels (GDCM: all transfer syntaxes, rescale applied) onto the checked grid.

    The geometry GDCM derives itself is replaced by ours: it takes the slice
    spacing of a multi-frame file from SliceThickness and keeps frames in
    stored order. `files` maps each source's key to the file GDCM reads.
    """
    paths = [files[source.key] for source in series.sources]
    if series.frame_order is None:
        reader: sitk.ImageSeriesReader | sitk.ImageFileReader = sitk.ImageSeriesReader()
        reader.SetFileNames(paths)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(paths[0])
    reader.SetImageIO("GDCMImageIO")
    # Float output per file: each slice then keeps its own rescale slope and intercept.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = _execute(reader, name)
    if image.GetDimension() != 3 or tuple(image.GetSize()) != series.stored_size:
        raise InputError(
            f"{name}: decoded image size {_dims(image.GetSize())} differs from the headers' "
            f"{_dims(series.stored_size)}; the series is inconsistent"
        )
    order = series.frame_order
    if order is not None and order != tuple(range(len(order))):
        array = sitk.GetArrayFromImage(image)[list(order)]
        image = sitk.GetImageFromArray(array)
    if series.grid.resampled:
        # Gantry tilt or uneven steps: the stored slices onto the orthogonal grid.
        image = sitk.GetImageFromArray(series.grid.resample(sitk.GetArrayViewFromImage(image)))
    grid = series.grid
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    for key, value in series.tags.items():
        image.SetMetaData(key, value)
    return image


# ------------------------------------------------------------------ text


def _triple(values: tuple, kind: type) -> tuple:
    a, b, c = (kind(v) for v in values)
    return (a, b, c)


def _dims(size: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in size)


def _vec(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(int(n))
