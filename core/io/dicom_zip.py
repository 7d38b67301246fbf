"""DICOM series in a zip: headers read from the members, unpacking counted and bounded.

A zip's DICOM headers are read straight from its members (pydicom stops at the
pixel data), so checking an upload decompresses only the headers and writes
nothing. Pixels are decoded by GDCM from files, so `read_image` unpacks the
chosen series' members, and only those, into a folder beside the zip (for the
service: the job's own folder, on the jobs volume and its storage handling),
removed when the read ends.

Every byte decompressed is counted three ways:

- per zip: the members' declared sizes against `InputLimits.max_zip_bytes`
  (the decompressor never yields more than a member declares);
- per request: `unpack_budget(nbytes)` around several reads (a job's inputs)
  counts what they decompress together;
- across concurrent requests: a process-wide pool (`unpack_pool()`, sized by
  `configure_unpack_pool`) in which each member being read, and each unpacked
  series until its folder is gone, holds its declared size. A read waits up to
  `UnpackPool.wait_s` for room, then fails with `UnpackBusy` (the server is
  busy, not the input bad).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from disa.core.errors import InputError

if TYPE_CHECKING:
    from disa.core.io.limits import InputLimits

__all__ = [
    "DicomSource",
    "UnpackBusy",
    "UnpackPool",
    "configure_unpack_pool",
    "unpack_budget",
    "unpack_pool",
]

#: Blank DICOM slices (a 512x512 int16 slice is 512 KiB) legitimately compress about
#: 1000:1, so the ratio guard looks only at members large enough to matter.
RATIO_CHECK_MIN_BYTES = 1024**2
_CHUNK = 1024**2
#: Default size of the process-wide pool: two zips at the default per-zip cap.
DEFAULT_POOL_BYTES = 8 * 1024**3


class UnpackBusy(InputError):
    """The process is unpacking too much at once; try again later (not the input's fault).

    A subclass of InputError so that every caller that answers a bad input still
    answers it with one line; callers that can say "busy" (HTTP 503) catch it first.
    """


class UnpackPool:
    """Bytes being decompressed or lying unpacked, across all threads of the process."""

    def __init__(self, capacity: int, wait_s: float = 30.0,
                 temp_fallback: bool = True) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        #: whether a zip whose own folder cannot take the unpacked series (read-only) is
        #: unpacked into the system's temporary folder instead (the CLI), or the OSError
        #: stands (the service: a job's folder that refuses writes is a storage failure)
        self.temp_fallback = temp_fallback
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, name: str) -> Iterator[None]:
        """Hold `nbytes` of the pool while the block runs (waits for room, then UnpackBusy)."""
        if nbytes <= 0:
            yield
            return
        if nbytes > self.capacity:
            raise InputError(
                f"{name}: unpacking needs {_gib(nbytes)}, more than this server unpacks at "
                f"once ({_gib(self.capacity)})"
            )
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.in_use + nbytes > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self.in_use + nbytes <= self.capacity:
                        break
                    raise UnpackBusy(
                        f"{name}: the server is unpacking other DICOM zips "
                        f"({_gib(self.in_use)} of {_gib(self.capacity)}); try again shortly"
                    )
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


_POOL = UnpackPool(DEFAULT_POOL_BYTES)


def unpack_pool() -> UnpackPool:
    """The process-wide pool (sized at start-up by `configure_unpack_pool`)."""
    return _POOL


def configure_unpack_pool(capacity: int, wait_s: float | None = None,
                          temp_fallback: bool | None = None) -> None:
    """Size the process-wide pool (bytes) and, if given, how long a read waits for room and
    whether the system's temporary folder may stand in for a read-only zip folder; for a
    process's start-up (the service's DISA_UNPACK_POOL_BYTES), not while reads run."""
    if capacity < 1:
        raise ValueError("the unpack pool needs a positive capacity")
    with _POOL._cond:
        _POOL.capacity = capacity
        if wait_s is not None:
            _POOL.wait_s = wait_s
        if temp_fallback is not None:
            _POOL.temp_fallback = temp_fallback
        _POOL._cond.notify_all()


@dataclass
class _Budget:
    limit: int
    used: int = 0


_REQUEST: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "disa_unpack_budget", default=None)


@contextlib.contextmanager
def unpack_budget(nbytes: int) -> Iterator[None]:
    """Count the bytes that the zip reads inside the block decompress together (one
    request's inputs) against `nbytes`; InputError when they exceed it."""
    token = _REQUEST.set(_Budget(nbytes))
    try:
        yield
    finally:
        _REQUEST.reset(token)


def _count(name: str, nbytes: int) -> None:
    budget = _REQUEST.get()
    if budget is None:
        return
    budget.used += nbytes
    if budget.used > budget.limit:
        raise InputError(
            f"{name}: the DICOM zips of this request decompress to more than "
            f"{_gib(budget.limit)}, the limit"
        )


@dataclass(frozen=True)
class DicomSource:
    """One candidate DICOM file: a file of a folder or a member of a zip.

    `label` is what messages show (a basename or a counter name, never a
    client's member path); `key` identifies it for unpacking.
    """

    label: str
    key: str
    path: Path | None = None  # a file of a folder
    archive: zipfile.ZipFile | None = None  # or a member of this zip
    member: zipfile.ZipInfo | None = None
    zip_name: str = ""

    @contextlib.contextmanager
    def open(self, pooled: bool = True) -> Iterator[IO[bytes]]:
        """The bytes (seekable); a member holds its declared size in the pool while open
        (unless `pooled` is False: its caller holds it already) and counts what was
        decompressed against the request's budget."""
        if self.path is not None:
            with open(self.path, "rb") as fh:
                yield fh
            return
        assert self.archive is not None and self.member is not None
        held = self.member.file_size if pooled else 0
        with unpack_pool().hold(held, self.zip_name):
            try:
                fh = self.archive.open(self.member)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                    RuntimeError) as err:
                raise InputError(f"{self.zip_name}: corrupt zip archive "
                                 f"({_short(str(err), 80)})") from err
            with fh:
                try:
                    yield fh
                finally:
                    _count(self.zip_name, fh.tell())


def folder_sources(folder: Path, name: str, max_files: int) -> list[DicomSource]:
    """The files of `folder` (not its subfolders), sorted; InputError beyond `max_files`."""
    try:
        paths = sorted(e.path for e in os.scandir(folder) if e.is_file())
    except OSError as err:
        raise InputError(f"{name}: folder cannot be read ({err.strerror})") from err
    if len(paths) > max_files:
        raise InputError(
            f"{name}: folder holds {len(paths)} files, above the limit of {max_files}"
        )
    return [DicomSource(os.path.basename(p), p, path=Path(p)) for p in paths]


@contextlib.contextmanager
def zip_sources(path: Path, name: str, limits: InputLimits) -> Iterator[list[DicomSource]]:
    """The members of a zip as sources, after the directory checks (member count, unsafe
    names, links, encryption, compression ratio, declared total); nothing is unpacked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise InputError(f"{name}: not a valid zip archive") from err
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_zip_members:
            raise InputError(
                f"{name}: zip holds {len(members)} members, above the limit of "
                f"{limits.max_zip_members}"
            )
        for member in members:
            _check_member(name, member, limits)
        declared = sum(m.file_size for m in members)
        if declared > limits.max_zip_bytes:
            raise InputError(
                f"{name}: zip expands to {_gib(declared)}, above the limit of "
                f"{_gib(limits.max_zip_bytes)}"
            )
        files = [m for m in members if not m.is_dir()]
        yield [DicomSource(f"{index:05d}.dcm", f"{index:05d}.dcm", archive=archive,
                           member=member, zip_name=name)
               for index, member in enumerate(files)]


@contextlib.contextmanager
def unpacked(zip_path: Path, sources: list[DicomSource], name: str
             ) -> Iterator[dict[str, str]]:
    """Unpack `sources` (members of one zip) into a fresh folder beside the zip, under
    their counter names; yields key -> file path. The folder is removed afterwards; the
    declared sizes are held in the pool meanwhile. Only where the zip's own folder
    cannot take it (a read-only CLI input) does the system's temporary folder serve, and
    only where the pool allows it (`temp_fallback`; the service's processes do not: there
    the job's folder is the only place, and its OSError a storage failure)."""
    declared = sum(s.member.file_size for s in sources if s.member is not None)
    with unpack_pool().hold(declared, name), _unpack_dir(zip_path) as folder:
        paths: dict[str, str] = {}
        for source in sources:
            target = folder / source.key
            # The series' declared size is held above: holding each member again
            # would count it twice (and a series near the pool's size would wait on itself).
            with source.open(pooled=False) as src, open(target, "xb") as dst:
                _copy_member(src, dst, source, name)
            paths[source.key] = str(target)
        yield paths


@contextlib.contextmanager
def _unpack_dir(zip_path: Path) -> Iterator[Path]:
    try:
        folder = Path(tempfile.mkdtemp(prefix=".unpack-", dir=zip_path.parent))
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) \
                or not unpack_pool().temp_fallback:
            raise
        folder = Path(tempfile.mkdtemp(prefix="disa-dicom-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_member(src: IO[bytes], dst: IO[bytes], source: DicomSource, name: str) -> None:
    member = source.member
    assert member is not None
    written = 0
    try:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > member.file_size:
                raise InputError(f"{name}: zip member '{source.label}' expands beyond its "
                                 "declared size; corrupt zip archive")
            dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise InputError(f"{name}: corrupt zip archive ({_short(str(err), 80)})") from err


def _check_member(name: str, member: zipfile.ZipInfo, limits: InputLimits) -> None:
    shown = _short(member.filename, 60)
    parts = member.filename.replace("\\", "/").split("/")
    if member.filename.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.filename):
        raise InputError(f"{name}: zip member '{shown}' has an unsafe absolute path")
    if ".." in parts:
        raise InputError(f"{name}: zip member '{shown}' has an unsafe path with '..'")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise InputError(f"{name}: zip member '{shown}' is a symbolic link; not accepted")
    if member.flag_bits & 0x1:
        raise InputError(f"{name}: zip member '{shown}' is encrypted; not accepted")
    if member.compress_type == zipfile.ZIP_STORED and member.compress_size != member.file_size:
        # Headers are read without reaching the end (and its CRC): catch this lie here.
        raise InputError(
            f"{name}: zip member '{shown}' declares {member.file_size} bytes but stores "
            f"{member.compress_size}; corrupt zip archive"
        )
    if (
        member.file_size > RATIO_CHECK_MIN_BYTES
        and member.file_size > limits.max_compression_ratio * max(member.compress_size, 1)
    ):
        ratio = member.file_size / max(member.compress_size, 1)
        raise InputError(
            f"{name}: zip member '{shown}' has compression ratio {ratio:.0f}:1, above the limit "
            f"of {limits.max_compression_ratio:.0f}:1 (zip bomb)"
        )


def _gib(nbytes: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def _short(text: str, limit: int) -> str:
    """Printable ASCII, cut to `limit` characters: client text goes into messages."""
    safe = text.encode("ascii", "backslashreplace").decode("ascii").replace("\n", "\\n")
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."
