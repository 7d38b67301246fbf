"""gzip through ISA-L (the ``isal`` package): NIfTI written and scanned several times faster.

Why not ITK's own compression or Python's zlib: a deformable run on a clinical CT writes
the dense field u(x) on the fixed grid, 594 x 371 x 320 voxels x 3 float32 (840 MB), whose
low mantissa bits do not compress (ratio 0.93 at any level). ITK's NIfTI writer took 26 s
for it (SetCompressionLevel changed neither time nor size), Python's zlib 33 MB/s at level
1; ISA-L's level 1 compresses the same bytes at 500 MB/s to the same size, and
decompresses 2-3x faster than zlib. On very compressible images (a phantom CT in int16)
its files are larger (9 against 5 MB), still written 5x faster. Measured on this project's
2-core machine (benchmarks/README.md, "Writing and reading compressed NIfTI"). The
streams are plain gzip: ITK, nibabel and ``gzip -d`` read them.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
import zlib
from pathlib import Path

import SimpleITK as sitk
from isal import igzip, isal_zlib

#: ISA-L's fastest level: the same ratio as its levels 2-3 on image data, at 2x the speed.
COMPRESS_LEVEL = 1

_COPY_BYTES = 16 * 1024**2  # bytes moved through the compressor at a time

#: What reading a damaged stream raises besides EOFError (a stream cut short): OSError
#: (not gzip, CRC or length wrong) and a corrupt deflate block's error, ISA-L's or (where
#: Python's gzip reads, file_formats._nifti_head) zlib's.
CORRUPT_GZIP_ERRORS: tuple[type[Exception], ...] = (OSError, isal_zlib.error, zlib.error)


def open_gzip(path: Path):  # -> igzip.IGzipFile, a file object like gzip.GzipFile
    """``path`` opened for reading its decompressed bytes: EOFError for a stream cut short,
    one of CORRUPT_GZIP_ERRORS for a damaged one."""
    return igzip.open(path, "rb")


def write_gzip_nifti(image: sitk.Image, path: Path) -> None:
    """``image`` as a gzip-compressed NIfTI file at ``path`` (a name ending in .nii.gz).

    ITK writes the uncompressed file beside ``path`` first (a temporary, removed whatever
    happens), which is then compressed into ``path``. RuntimeError from ITK's writer as
    from ``sitk.ImageFileWriter``.
    """
    plain = path.parent / f".{path.name}.{uuid.uuid4().hex}.plain.nii"
    try:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(plain))
        writer.UseCompressionOff()
        writer.Execute(image)
        with open(plain, "rb") as source, igzip.open(path, "wb",
                                                     compresslevel=COMPRESS_LEVEL) as target:
            shutil.copyfileobj(source, target, _COPY_BYTES)
    finally:
        with contextlib.suppress(FileNotFoundError):
            plain.unlink()
