"""NIfTI, NRRD and MetaImage files: header-only inspection and the checks ITK skips.

Before SimpleITK reads a header, the raw header is checked here: a NIfTI pair
or a NaN/zero pixdim (which ITK would quietly accept), NRRD/MetaImage headers
that point at a separate data file (a way to read any local file through an
upload) and geometry fields holding NaN or infinity. After the size caps,
`_check_nifti_data` looks at the stored NIfTI data,
which ITK pads with zeros when truncated and cleans of NaN when read. Every
rejection is an `InputError` naming the file's basename.
"""

import contextlib
import gzip
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.dicom_zip import _short
from disa.core.io.fast_gzip import CORRUPT_GZIP_ERRORS, open_gzip
from disa.core.io.itk_calls import _itk_detail, _quiet_itk
from disa.core.io.limits import _FORMAT_NAMES, ImageInfo, InputLimits, _dims, _validate, _vec

# The reader is fixed by the detected format, never guessed by SimpleITK from the
# content: a file then gets exactly the header checks of its own format.
_IMAGE_IO = {
    "nifti": "NiftiImageIO",
    "nrrd": "NrrdImageIO",
    "metaimage": "MetaImageIO",
    "dicom": "GDCMImageIO",
}

_TEXT_HEADER_MAX = 64 * 1024  # bytes of NRRD/MetaImage text header we are willing to parse
_CHUNK = 1024**2


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
    voxels: int = 0
    #: The stored values' type when they can hold NaN or Inf (floating or complex), else None.
    float_dtype: np.dtype | None = None


#: NIfTI datatype codes of the stored types that can hold NaN or Inf, as numpy types
#: (float128 and complex256 have no portable numpy type; ITK does not read them either).
_NIFTI_FLOAT_TYPES = {16: "f4", 32: "c8", 64: "f8", 1792: "c16"}


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
        (datatype, bitpix) = struct.unpack_from(endian + "2h", head, 70)
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
        (datatype, bitpix) = struct.unpack_from(endian + "2h", head, 12)
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
    voxels = math.prod(dims[1 : ndim + 1])
    code = _NIFTI_FLOAT_TYPES.get(datatype)
    return _NiftiLayout(offset, voxels * bitpix // 8, voxels,
                        None if code is None else np.dtype(endian + code))


def _nifti_head(path: Path, name: str) -> bytes:
    """First 540 bytes (a NIfTI-2 header) of the file, decompressed if it is gzip.

    Python's zlib, not ISA-L: ISA-L's reader raises EOFError on a stream cut short even
    when the bytes asked for lie before the cut, and a file truncated in its pixel data
    must get the header's own check ("file is truncated: decompresses to N bytes, its
    header needs M"), not "truncated inside the header". 540 bytes take no time."""
    if not _is_gzip(path, name):
        return _read_prefix(path, name, 540)
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read(540)
    except EOFError as err:
        raise InputError(
            f"{name}: gzip data is truncated (the stream ends inside the header)"
        ) from err
    except CORRUPT_GZIP_ERRORS as err:
        raise InputError(f"{name}: corrupt gzip data ({_short(str(err), 80)})") from err


def _check_nifti_data(path: Path, name: str) -> None:
    """Fail on truncated NIfTI pixel data or on NaN and infinite stored voxels.

    Why: ITK's NIfTI reader pads missing data with zeros instead of failing, and
    turns NaN and Inf into 0, so the same image that is refused as NRRD or
    MetaImage would register quietly as NIfTI. One pass over the stored bytes
    (decompressed once if gzip; at most `_FINITE_CHUNK_BYTES` of them in memory)
    does both checks; integer data cannot hold NaN and is only counted. Values are
    checked as stored: scl_slope/scl_inter scale finite values to finite values
    (ITK and nibabel alike). Runs after the size caps, so the bytes it reads are
    bounded by them. Replaces a nibabel array proxy, whose import alone took
    0.22-0.27 s of every cold `disa register` on a float NIfTI (2 cores).
    """
    layout = _nifti_layout(path, name)
    need = layout.vox_offset + layout.data_bytes
    scan = _StoredScan(layout)
    if _is_gzip(path, name):
        got = _scan_gzip(path, name, need, scan.feed)
        what = f"decompresses to {got} bytes"
    else:
        got = path.stat().st_size
        what = f"{got} bytes"
        if got >= need and scan.dtype is not None:
            try:
                with open(path, "rb") as fh:
                    while chunk := fh.read(min(_FINITE_CHUNK_BYTES, need - scan.seen)):
                        scan.feed(chunk)
            except OSError as err:
                raise InputError(f"{name}: cannot be read ({err.strerror})") from err
    if got < need:
        raise InputError(f"{name}: file is truncated: {what}, its header needs {need}")
    if scan.nan or scan.infinite:
        raise InputError(
            f"{name}: {scan.nan + scan.infinite} of {layout.voxels} voxels are not finite "
            f"({scan.nan} NaN, {scan.infinite} infinite); replace them (e.g. with the "
            "background value) before registering"
        )


_FINITE_CHUNK_BYTES = 16 * 1024**2  # stored NIfTI data examined at a time


class _StoredScan:
    """Counts NaN and infinite values in a stream of NIfTI file bytes fed in order
    (header first); does nothing for integer data (``dtype`` None)."""

    def __init__(self, layout: _NiftiLayout) -> None:
        self.dtype = layout.float_dtype
        self.start, self.end = layout.vox_offset, layout.vox_offset + layout.data_bytes
        self.seen = 0  # file bytes fed so far
        self.carry = b""  # the start of a value split between two chunks
        self.nan = self.infinite = 0

    def feed(self, chunk: bytes) -> None:
        begin, self.seen = self.seen, self.seen + len(chunk)
        if self.dtype is None:
            return
        lo, hi = max(self.start - begin, 0), min(self.end - begin, len(chunk))
        if lo >= hi:
            return
        data = self.carry + chunk[lo:hi]
        whole = len(data) - len(data) % self.dtype.itemsize
        self.carry = data[whole:]
        size = self.dtype.itemsize
        step = max(size, _FINITE_CHUNK_BYTES - _FINITE_CHUNK_BYTES % size)
        for at in range(0, whole, step):
            values = np.frombuffer(data, self.dtype, (min(whole, at + step) - at) // size, at)
            with np.errstate(invalid="ignore", over="ignore"):
                if np.isfinite(values.sum(dtype=np.complex128 if self.dtype.kind == "c"
                                          else np.float64)):
                    continue
            self.nan += int(np.count_nonzero(np.isnan(values)))
            self.infinite += int(np.count_nonzero(np.isinf(values)))


def _scan_gzip(path: Path, name: str, limit: int,
               feed: Callable[[bytes], None] | None = None) -> int:
    """Decompress up to `limit` bytes, handing each chunk to `feed`; return how many
    there were.

    Raises InputError for a stream cut short or corrupt. When the stream ends
    within the limit, Python also checks the gzip CRC.
    """
    got = 0
    try:
        with open_gzip(path) as fh:
            while got < limit and (chunk := fh.read(min(_CHUNK, limit - got))):
                got += len(chunk)
                if feed is not None:
                    feed(chunk)
            if got == limit:
                fh.read(64 * 1024)  # reach the end of the stream, if it is there
    except EOFError as err:
        raise InputError(
            f"{name}: gzip data is truncated (the stream ends early); the file is incomplete"
        ) from err
    except CORRUPT_GZIP_ERRORS as err:
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


def _triple(values: tuple, kind: type) -> tuple:
    a, b, c = (kind(v) for v in values)
    return (a, b, c)
