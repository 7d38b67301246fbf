"""DICOM series: finding one among a folder's files or a zip's members, and reading it.

Headers are read with pydicom (never the pixel data) and grouped by series;
one series is chosen, checked for consistency and given its grid
(`dicom_geometry`), and its header facts are validated like any other image's
(`limits._validate`) before GDCM decodes a single pixel (`_read_series`). The
public entry points that take a path are in `images` (`inspect_image`,
`read_image`, `read_dicom_headers`).
"""

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from disa.core.errors import InputError
from disa.core.io.dicom_geometry import (
    _frames_in,
    _functional_item,
    _int,
    _multiframe_frames,
    _numbers,
    _single_frame,
    _stack_geometry,
)
from disa.core.io.dicom_zip import DicomSource, _short, folder_sources, zip_sources
from disa.core.io.itk_calls import _execute
from disa.core.io.limits import ImageInfo, InputLimits, _dims, _validate
from disa.core.io.slice_stack import StackGrid

_DEFER_BYTES = 64 * 1024  # header values larger than this are never loaded (private blobs)

# Series-level DICOM tags kept on the image that `read_image` returns, for the
# DICOM outputs (Spatial Registration object) written later. Patient tags are
# deliberately not copied: writers such as NRRD would put them into headers.
_DICOM_TAGS_KEPT = {
    "0008|0060": "Modality",
    "0020|000d": "StudyInstanceUID",
    "0020|000e": "SeriesInstanceUID",
    "0020|0052": "FrameOfReferenceUID",
}


@contextlib.contextmanager
def _dicom_sources(path: Path, name: str, limits: InputLimits) -> Iterator[list[DicomSource]]:
    """The candidate DICOM files: those of a folder, or the members of a zip (checked,
    not unpacked; valid while the block runs)."""
    if path.is_dir():
        yield folder_sources(path, name, limits.max_zip_members)
        return
    with zip_sources(path, name, limits) as sources:
        yield sources


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
