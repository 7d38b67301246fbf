"""Small synthetic images and hand-made headers for the image-input tests.

Geometry is ITK's: sizes and spacings in (x, y, z) order, origins in LPS mm,
directions row-major with the axis directions as columns. Numpy arrays are
(z, y, x).
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZE = (24, 20, 16)
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (-10.0, 20.0, 5.0)

STUDY_UID = "1.2.826.0.1.3680043.9.7777.1"
SERIES_UID = "1.2.826.0.1.3680043.9.7777.1.2"
OTHER_SERIES_UID = "1.2.826.0.1.3680043.9.7777.1.3"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def oblique_direction() -> tuple[float, ...]:
    """A proper rotation (0.3 rad about z, then 0.2 rad about x), row-major."""
    cz, sz = math.cos(0.3), math.sin(0.3)
    cx, sx = math.cos(0.2), math.sin(0.2)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return tuple((rz @ rx).ravel())


def phantom(size: tuple[int, int, int] = SIZE) -> sitk.Image:
    """Float32 ellipsoid on a ramp, anisotropic spacing, oblique, off-origin."""
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in size[::-1]), indexing="ij")
    array = 100.0 * ((x / 0.7) ** 2 + (y / 0.6) ** 2 + (z / 0.8) ** 2 < 1.0) + 20.0 * x + 5.0 * z
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(oblique_direction())
    return image


def write_dicom_series(
    image: sitk.Image,
    folder: Path,
    series_uid: str = SERIES_UID,
    modality: str = "CT",
    slope: float = 0.5,
    intercept: float = -100.0,
    prefix: str = "slice",
) -> np.ndarray:
    """Write `image` as one single-frame DICOM file per z slice into `folder`.

    Pixels are stored as int16 with the given rescale slope and intercept; the
    value a reader should return (stored * slope + intercept, numpy z, y, x) is
    returned. GDCM refuses a non-integer slope on integer input, so each slice
    is handed over as float already on the rescale grid and GDCM derives the
    stored integers itself.
    """
    folder.mkdir(parents=True, exist_ok=True)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    stored = np.clip(np.round((values - intercept) / slope), -32768, 32767)
    expected = stored * slope + intercept
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our SOP Instance UIDs, not fresh ones
    for k in range(expected.shape[0]):
        plane = sitk.GetImageFromArray(expected[k].astype(np.float32))
        plane.SetSpacing(spacing[:2])
        position = np.asarray(image.GetOrigin()) + d[:, 2] * spacing[2] * k
        tags = {
            "0008|0016": CT_IMAGE_STORAGE,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": modality,
            "0020|000d": STUDY_UID,
            "0020|000e": series_uid,
            "0020|0052": f"{STUDY_UID}.9",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # row, column spacing
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1053": repr(slope),
            "0028|1052": repr(intercept),
            "0028|0100": "16",
            "0028|0101": "16",
            "0028|0102": "15",
            "0028|0103": "1",  # signed
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(plane)
    return expected


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, f"series/{file.name}")
    return archive


def nifti1(
    dims: tuple[int, ...],
    pixdim: tuple[float, ...] = (1.0, 1.0, 1.0),
    magic: bytes = b"n+1\0",
    data: bool = True,
) -> bytes:
    """A little-endian single-file NIfTI-1 of float32 zeros, built with struct.

    The 348-byte header plus the 4-byte extension flag, then the pixel data
    (omitted with data=False, as for a header that lies about its size).
    """
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", header, 70, 16, 32)  # datatype FLOAT32, bitpix
    struct.pack_into("<8f", header, 76, 1.0, *pixdim, *([1.0] * (7 - len(pixdim))))
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", header, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<hh", header, 252, 1, 0)  # qform_code scanner, no sform
    header[344:348] = magic
    pixels = bytes(4 * math.prod(dims)) if data else b""
    return bytes(header) + bytes(4) + pixels


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def metaimage(
    fields: dict[str, str], data_file: str = "LOCAL", dims: tuple[int, int, int] = (8, 8, 8)
) -> bytes:
    """A MetaImage (.mha) of float32 zeros with extra header `fields`."""
    lines = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "ElementSpacing": "1 1 1",
        "DimSize": " ".join(str(n) for n in dims),
        "ElementType": "MET_FLOAT",
        **fields,
    }
    text = "".join(f"{k} = {v}\n" for k, v in lines.items()) + f"ElementDataFile = {data_file}\n"
    return text.encode() + bytes(4 * math.prod(dims))


def nrrd(fields: str, dims: tuple[int, int, int] = (8, 8, 8)) -> bytes:
    """An attached-data NRRD of float32 zeros with extra header lines `fields`."""
    header = (
        "NRRD0004\ntype: float\ndimension: 3\n"
        f"sizes: {' '.join(str(n) for n in dims)}\nendian: little\nencoding: raw\n{fields}\n"
    )
    return header.encode() + bytes(4 * math.prod(dims))


def patch_zip(archive: Path, *, file_size: int | None = None, flag_bits: int | None = None) -> None:
    """Rewrite the declared size or flag bits of every member, in both headers."""
    data = bytearray(archive.read_bytes())
    for signature, flags_at, size_at in ((b"PK\x03\x04", 6, 22), (b"PK\x01\x02", 8, 24)):
        start = data.find(signature)
        while start != -1:
            if file_size is not None:
                struct.pack_into("<I", data, start + size_at, file_size)
            if flag_bits is not None:
                struct.pack_into("<H", data, start + flags_at, flag_bits)
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))
