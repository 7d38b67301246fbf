"""Streaming multipart upload straight into a job's staging folder.

The body is parsed as it arrives (python-multipart's push parser) and written
to server-chosen names: `inputs/<role><ext>`, where the extension comes from
the client's file name and nothing else of that name is kept. The size limit is
enforced on the bytes received, before they are written; every file is
fsynced before it is closed. The caller removes the staging folder on any
error. A body the parser refuses, or one that sends nothing for the idle
timeout (408), is an UploadError; a write the jobs folder refuses (full,
quota, I/O error) stays an OSError, for the caller to answer as a storage
problem rather than blame the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from disa.core.errors import DisaError
from disa.service.engine_surface import MAX_TRANSFORM_BYTES, TEXT_SUFFIXES

#: File fields of POST /v1/jobs (roles of the engine's inputs).
FILE_FIELDS = ("fixed", "moving", "fixed_mask", "moving_mask", "initial_transform")
REQUIRED_FILES = ("fixed", "moving")
#: The file field that holds an ITK transform rather than an image.
TRANSFORM_FIELD = "initial_transform"
#: Text fields and their size caps in characters (the schema's maxLength: the same numbers).
TEXT_FIELDS = {"options": 64 * 1024, "fixed_series_uid": 64, "moving_series_uid": 64}
#: Most bytes one character takes in UTF-8: a text part is cut off past this many times its
#: cap while it streams, and its characters are counted once it is whole.
_UTF8_MAX_BYTES = 4
#: Extensions accepted, longest first so .nii.gz wins over .gz. Detached-header
#: formats (.nhdr, .mhd) are left out: an upload is one file.
INPUT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
#: Extensions of an initial transform: ITK text only. HDF5 is refused on uploads: a
#: dataset may keep its data in another file of the server (external storage).
TRANSFORM_EXTENSIONS = TEXT_SUFFIXES
#: The engine reader's size cap applies to the transform part while it streams, so a
#: big one is never stored.
_FLUSH_BYTES = 1024 * 1024  # write to disk (in a thread) once this much is pending


class UploadError(DisaError):
    """The request body cannot be accepted; `status` is the HTTP status to answer, with
    `headers` (e.g. Retry-After) if any."""

    def __init__(self, status: int, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def input_extension(filename: str, role: str = "fixed") -> str | None:
    """The accepted extension of a client file name for file field ``role``
    (case-insensitive), or None."""
    lower = filename.strip().lower()
    for ext in TRANSFORM_EXTENSIONS if role == TRANSFORM_FIELD else INPUT_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    return None


@dataclass
class Upload:
    """What a request carried: role -> file written, field -> text."""

    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


class _Sink:
    """Callbacks of the push parser. Parsing happens on the event loop; data is
    queued and written by `flush` in a worker thread, so big uploads never
    block other requests."""

    def __init__(self, inputs_dir: Path) -> None:
        self.inputs_dir = inputs_dir
        self.upload = Upload()
        self.pending: list[tuple[str, bytes | None]] = []  # (role, data) or (role, None) = end
        self.pending_bytes = 0
        self.part_bytes = 0  # bytes of the current file part so far
        self.finished = False
        self._seen: set[str] = set()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._part: str | None = None  # role or text field of the current part
        self._text: dict[str, bytearray] = {}
        self._open: dict[str, io.BufferedWriter] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _header_end(self) -> None:
        name = self._header_name.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1").strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise UploadError(400, "malformed multipart part: no form-data name")
        name = params[b"name"].decode("latin-1")
        if name not in FILE_FIELDS and name not in TEXT_FIELDS:
            expected = ", ".join((*FILE_FIELDS, *TEXT_FIELDS))
            raise UploadError(400, f"unknown form field '{_clip(name)}'; expected: {expected}")
        if name in self._seen:
            raise UploadError(400, f"form field '{name}' given twice")
        self._seen.add(name)
        self._part = name
        if name in TEXT_FIELDS:
            self._text[name] = bytearray()
            return
        filename = params.get(b"filename")
        if filename is None:
            raise UploadError(400, f"'{name}' must be a file part (with a filename)")
        ext = input_extension(filename.decode("utf-8", "replace"), name)
        if ext is None and name == TRANSFORM_FIELD:
            raise UploadError(422, f"{name}: unsupported file type; accepted: ITK text "
                                   f"transforms ({', '.join(TRANSFORM_EXTENSIONS)})")
        if ext is None:
            raise UploadError(422, f"{name}: unsupported file type; accepted: "
                                   f"{', '.join(INPUT_EXTENSIONS)} (DICOM series as .zip)")
        self.upload.files[name] = self.inputs_dir / f"{name}{ext}"
        self.part_bytes = 0

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part is None or end <= start:
            return
        if self._part in TEXT_FIELDS:
            buf = self._text[self._part]
            if len(buf) + end - start > _UTF8_MAX_BYTES * TEXT_FIELDS[self._part]:
                raise _text_too_long(self._part)
            buf.extend(data[start:end])
            return
        self.part_bytes += end - start
        if self._part == TRANSFORM_FIELD and self.part_bytes > MAX_TRANSFORM_BYTES:
            raise UploadError(413, f"{self._part}: file is longer than "
                                   f"{MAX_TRANSFORM_BYTES} bytes (a transform is far smaller)")
        self.pending.append((self._part, bytes(data[start:end])))
        self.pending_bytes += end - start

    def _part_end(self) -> None:
        if self._part in TEXT_FIELDS:
            try:
                text = self._text.pop(self._part).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UploadError(422, f"form field '{self._part}' is not UTF-8 text") from exc
            if len(text) > TEXT_FIELDS[self._part]:
                raise _text_too_long(self._part)
            self.upload.fields[self._part] = text
        elif self._part is not None:
            self.pending.append((self._part, None))
        self._part = None

    def _end(self) -> None:
        self.finished = True

    def flush(self) -> None:
        """Write pending data to the role files (in a worker thread); OSError as raised."""
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        for role, data in pending:
            f = self._open.get(role)
            if f is None:
                # 'x': a fresh staging folder; a second file for a role is refused above.
                f = self._open[role] = open(self.upload.files[role], "xb")  # noqa: SIM115
            if data is None:
                # On disk before the 202: publishing fsyncs only the folders, and a
                # job whose inputs a power cut truncated would fail as bad input.
                f.flush()
                os.fsync(f.fileno())
                f.close()
            else:
                f.write(data)

    def close(self) -> None:
        """Close every file (those still open belong to an upload that failed: their
        errors, a full disk again, would only hide the first one)."""
        for f in self._open.values():
            with contextlib.suppress(OSError):
                f.close()


def _text_too_long(name: str) -> UploadError:
    return UploadError(413, f"form field '{name}' is longer than {TEXT_FIELDS[name]} "
                            "characters")


async def receive_upload(request: Request, inputs_dir: Path, max_bytes: int,
                         idle_timeout_s: float | None = None) -> Upload:
    """Parse a multipart/form-data body into `inputs_dir`; raise UploadError on any problem,
    408 when the client sends nothing for `idle_timeout_s` seconds (None: wait forever)."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadError(415, "send the job as multipart/form-data")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise UploadError(413, f"upload of {length} bytes exceeds the limit of {max_bytes}")
    sink = _Sink(inputs_dir)
    try:
        parser = MultipartParser(boundary, sink.callbacks())
        received = 0
        try:
            async for chunk in _chunks(request, idle_timeout_s):
                received += len(chunk)
                if received > max_bytes:
                    raise UploadError(413, f"upload exceeds the limit of {max_bytes} bytes")
                _parse(parser.write, chunk)
                if sink.pending_bytes >= _FLUSH_BYTES:
                    await run_in_threadpool(sink.flush)  # OSError: storage, not the body
            _parse(parser.finalize)
        except ClientDisconnect as exc:
            raise UploadError(400, "the client went away during the upload") from exc
        await run_in_threadpool(sink.flush)
    finally:
        sink.close()
    if not sink.finished:
        raise UploadError(400, "incomplete multipart body")
    missing = [role for role in REQUIRED_FILES if role not in sink.upload.files]
    if missing:
        raise UploadError(422, f"missing file field(s): {', '.join(missing)}")
    return sink.upload


async def _chunks(request: Request, idle_timeout_s: float | None) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; UploadError 408 when the next one takes longer than
    `idle_timeout_s` (a stalled client would otherwise hold its connection and staging folder
    for as long as it likes)."""
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadError(408, f"the upload sent nothing for {idle_timeout_s:g} s; "
                                   "send the body without pauses") from None
        yield chunk


def _parse(step: Callable[..., object], *args: bytes) -> None:
    """One step of the push parser (write a chunk, or finalize). The parser's own errors
    mean a malformed body (400); the callbacks raise UploadError and never touch disk."""
    try:
        step(*args)
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(400, "malformed multipart body") from exc


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
