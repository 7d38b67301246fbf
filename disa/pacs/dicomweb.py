"""A small DICOMweb client (httpx): find a series (QIDO-RS), fetch it (WADO-RS), store
instances (STOW-RS). Transient failures (connection errors, timeouts, HTTP 408,
429, 5xx) are retried with bounded exponential back-off; everything is
streamed, never held whole in memory.

Files fetched are written under counter names (000001.dcm, ...): names built
from UIDs or headers could carry identifiers and would be the PACS's choice,
not ours. Caps on instance count and bytes keep a misbehaving server from
filling the disk. A fetch goes into a new or empty folder only, and removes
nothing but the files it wrote itself (those of a failed attempt).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from disa.core.io.limits import DEFAULT_LIMITS
from disa.pacs.retry import PacsError, RetryPolicy, SeriesNotFound, call_with_retries

DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 1024**2
_MAX_PART_HEADERS = 16 * 1024
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Tags in DICOM JSON (PS3.18 F.2): group and element, upper-case hex.
_STUDY_UID, _SERIES_UID, _MODALITY = "0020000D", "0020000E", "00080060"
_INSTANCES = "00201209"  # Number of Series Related Instances
_FAILED_SOP, _REFERENCED_SOP = "00081198", "00081199"


@dataclass(frozen=True)
class SeriesRef:
    """Where a series lives: its study and series UIDs, and what QIDO said about it."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    instances: int | None = None


class HttpStatusError(PacsError):
    """An HTTP error status from the PACS."""

    def __init__(self, status_code: int, what: str) -> None:
        super().__init__(f"{what}: HTTP {status_code}")
        self.status_code = status_code


def check_uid(uid: str) -> str:
    """`uid` if it is a well-formed DICOM UID (digits and dots, <= 64 chars), else ValueError.

    UIDs are put into URL paths: this keeps anything else out of them.
    """
    if len(uid) > 64 or not UID_PATTERN.match(uid):
        raise ValueError(f"not a DICOM UID: {uid[:70]!r}")
    return uid


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the server may do better next time."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, HttpStatusError) and exc.status_code in _TRANSIENT_STATUS


class DicomWebClient:
    """QIDO-RS, WADO-RS and STOW-RS against one DICOMweb root URL (e.g. .../dicom-web)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        max_instances: int = DEFAULT_LIMITS.max_zip_members,
        max_bytes: int = DEFAULT_LIMITS.max_zip_bytes,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
        self.retry = retry or RetryPolicy()
        self.max_instances = max_instances
        self.max_bytes = max_bytes

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _retrying(self, call: Callable[[], Any], what: str) -> Any:
        return call_with_retries(call, self.retry, is_transient, what)

    # ---------------------------------------------------------------- QIDO

    def find_series(self, series_uid: str, study_uid: str | None = None) -> SeriesRef:
        """Look a series up by UID (QIDO-RS); SeriesNotFound if the PACS lacks it."""
        check_uid(series_uid)
        path = f"/studies/{check_uid(study_uid)}/series" if study_uid else "/series"
        params = [("SeriesInstanceUID", series_uid), ("includefield", _STUDY_UID),
                  ("includefield", _MODALITY), ("includefield", _INSTANCES)]

        def query() -> list[dict[str, Any]]:
            response = self._http.get(path, params=params, headers={"Accept": DICOM_JSON})
            if response.status_code == 204:
                return []
            _raise_for_status(response, "QIDO-RS series query")
            found = response.json()
            return found if isinstance(found, list) else []

        matches = self._retrying(query, "QIDO-RS series query")
        for item in matches:
            if _first(item, _SERIES_UID) == series_uid:
                study = _first(item, _STUDY_UID) or study_uid
                if not study:
                    raise PacsError("QIDO-RS answer names no study for the series")
                count = _first(item, _INSTANCES)
                return SeriesRef(check_uid(str(study)), series_uid, _first(item, _MODALITY),
                                 int(count) if count is not None else None)
        raise SeriesNotFound("the PACS has no series with that SeriesInstanceUID")

    # ---------------------------------------------------------------- WADO

    def retrieve_series(self, ref: SeriesRef, folder: Path) -> list[Path]:
        """Fetch every instance of a series (WADO-RS) into `folder`, as 000001.dcm, ...

        `folder` must be new or empty (FileExistsError otherwise, before any
        request): the call then knows every file in it is its own. A failed
        attempt is retried from the start after removing the files it wrote;
        when the call fails for good, those are removed as well.
        """
        path = f"/studies/{check_uid(ref.study_uid)}/series/{check_uid(ref.series_uid)}"
        prepare_target(folder)
        written: list[Path] = []

        def fetch() -> list[Path]:
            remove_files(written)  # a failed attempt's files, nothing else
            with self._http.stream("GET", path, headers={"Accept": MULTIPART_DICOM}) as r:
                if r.status_code == 404:
                    raise SeriesNotFound("the PACS has no series with that SeriesInstanceUID")
                _raise_for_status(r, "WADO-RS retrieve")
                boundary = _boundary(r.headers.get("content-type", ""))
                return split_multipart(r.iter_bytes(), boundary, folder, self.max_instances,
                                       self.max_bytes, written=written)

        try:
            files = self._retrying(fetch, "WADO-RS retrieve")
        except BaseException:
            remove_files(written)
            raise
        if not files:
            raise SeriesNotFound("the PACS returned no instances for the series")
        return files

    fetch = retrieve_series  # the name the workflow uses for every transport

    # ---------------------------------------------------------------- STOW

    def store(self, files: Sequence[Path], study_uid: str | None = None) -> int:
        """Send DICOM files with STOW-RS; return how many the PACS accepted.

        Raises PacsError naming how many instances the PACS refused.
        """
        if not files:
            return 0
        path = f"/studies/{check_uid(study_uid)}" if study_uid else "/studies"
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(head) + Path(f).stat().st_size + 2 for f in files) + len(tail)
        headers = {
            "Content-Type": f'{MULTIPART_DICOM}; boundary="{boundary}"',
            "Accept": DICOM_JSON,
            "Content-Length": str(length),  # not chunked: some servers refuse chunked bodies
        }

        def body() -> Iterator[bytes]:
            for file in files:
                yield head
                with open(file, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        yield chunk
                yield b"\r\n"
            yield tail

        def send() -> dict[str, Any]:
            response = self._http.post(path, content=body(), headers=headers)
            if response.status_code not in (200, 202, 409):
                _raise_for_status(response, "STOW-RS store")
            try:
                answer = response.json()
            except ValueError:
                answer = {}
            if response.status_code == 409 and not answer:
                raise PacsError("STOW-RS store: the PACS refused every instance (HTTP 409)")
            return answer if isinstance(answer, dict) else {}

        answer = self._retrying(send, "STOW-RS store")
        failed = len(answer.get(_FAILED_SOP, {}).get("Value", []))
        stored = len(answer.get(_REFERENCED_SOP, {}).get("Value", []))
        if failed:
            raise PacsError(f"STOW-RS store: the PACS refused {failed} of {len(files)} instances")
        return stored or len(files)


# ------------------------------------------------------------------ helpers


def prepare_target(folder: Path) -> None:
    """Create `folder` for a fetch, or accept it when it exists and is empty.

    A folder with anything in it is refused (FileExistsError) rather than
    emptied: it is the caller's, and may hold files that have nothing to do
    with the series. Fetches write only counter-named files into it and, on
    retries, remove only those.
    """
    if folder.is_dir():
        with os.scandir(folder) as entries:
            if next(entries, None) is not None:
                raise FileExistsError(
                    errno.ENOTEMPTY,
                    "the target folder of a fetch must be new or empty; nothing in it was "
                    "touched",
                    str(folder))
        return
    folder.mkdir(parents=True)  # FileExistsError if it is a file


def remove_files(files: list[Path]) -> None:
    """Remove `files` (those a fetch wrote) and empty the list; missing ones are fine."""
    for file in files:
        file.unlink(missing_ok=True)
    files.clear()


def _raise_for_status(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        with contextlib.suppress(httpx.ResponseNotRead, httpx.StreamError):
            response.close()
        raise HttpStatusError(response.status_code, what)


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _boundary(content_type: str) -> bytes:
    """The boundary parameter of a multipart/related Content-Type."""
    kind, _sep, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        raise PacsError(f"WADO-RS answer is {kind.strip()[:40] or 'untyped'}, "
                        "not multipart/related")
    match = re.search(r'boundary\s*=\s*"?([^";]+)"?', params, flags=re.IGNORECASE)
    if not match:
        raise PacsError("WADO-RS answer has no multipart boundary")
    return match.group(1).strip().encode("latin-1")


def split_multipart(
    chunks: Iterable[bytes],
    boundary: bytes,
    folder: Path,
    max_parts: int,
    max_bytes: int,
    written: list[Path] | None = None,
) -> list[Path]:
    """Write each application/dicom part of a multipart/related stream to its own file.

    Parsed by python-multipart's push parser (the one the service's uploads use),
    byte-exact at any chunk size; only a bounded preamble before the first
    boundary is skipped here (RFC 2046 allows one; the parser does not).
    Files are folder/000001.dcm, ... in the order received. Raises PacsError
    for a stream that is cut short or malformed, a part of another type, or caps
    exceeded (instances, bytes, part headers); the files of a failed call are
    removed again. Each file is appended to `written` (when given) as it is
    opened, so a caller also knows what a call left behind if it is killed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sink = _DicomParts(folder, max_parts, max_bytes,
                       [] if written is None else written)
    parser = MultipartParser(boundary, sink.callbacks())
    preamble = _Preamble(boundary)
    try:
        try:
            for chunk in chunks:
                data = preamble.feed(chunk)
                if data:
                    parser.write(data)
                if sink.finished:
                    break
            if not preamble.done:
                raise PacsError("WADO-RS answer holds no multipart part (no boundary found)")
            parser.finalize()
        except MultipartParseError as exc:
            raise PacsError("WADO-RS answer is not valid multipart data") from exc
        finally:
            sink.close()
        if not sink.finished:
            raise PacsError("WADO-RS answer ended early (truncated multipart data)")
    except BaseException:
        remove_files(sink.written)
        raise
    return sink.written


class _Preamble:
    """Drops what precedes the first boundary line (at most `_MAX_PART_HEADERS` bytes)."""

    def __init__(self, boundary: bytes) -> None:
        self._first = b"--" + boundary
        self._held = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return chunk
        self._held += chunk
        if self._held.startswith(self._first):
            at = 0
        else:
            at = self._held.find(b"\r\n" + self._first)
            at = at + 2 if at >= 0 else -1
        if at < 0:
            if len(self._held) > _MAX_PART_HEADERS:
                raise PacsError("WADO-RS answer is not valid multipart data (no boundary)")
            return b""  # wait for more
        self.done = True
        data, self._held = self._held[at:], b""
        return data


class _DicomParts:
    """Callbacks of the push parser: one counter-named file per part, caps enforced."""

    def __init__(self, folder: Path, max_parts: int, max_bytes: int,
                 written: list[Path]) -> None:
        self.folder = folder
        self.max_parts = max_parts
        self.max_bytes = max_bytes
        self.written = written
        self.total = 0
        self.finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._headers: dict[str, str] = {}
        self._out: BinaryIO | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._header(self._field, d[s:e]),
            "on_header_value": lambda d, s, e: self._header(self._value, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._open,
            "on_part_data": self._data,
            "on_part_end": self.close,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}
        self._header_bytes = 0

    def _header(self, buffer: bytearray, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > _MAX_PART_HEADERS:
            raise PacsError("WADO-RS part headers are too long")
        buffer.extend(data)

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _open(self) -> None:
        _check_part_type(self._headers.get("content-type"))
        if len(self.written) >= self.max_parts:
            raise PacsError(f"the series has more than {self.max_parts} instances, the limit")
        path = self.folder / f"{len(self.written) + 1:06d}.dcm"
        self._out = open(path, "wb")  # noqa: SIM115 - closed when the part ends
        self.written.append(path)

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.total += end - start
        if self.total > self.max_bytes:
            raise PacsError(f"the series is larger than {self.max_bytes} bytes, the limit")
        assert self._out is not None
        self._out.write(data[start:end])

    def _end(self) -> None:
        self.finished = True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _check_part_type(content_type: str | None) -> None:
    """A part without a Content-Type takes the multipart/related type (application/dicom)."""
    if content_type is None:
        return
    kind = content_type.split(";")[0].strip().lower()
    if kind != "application/dicom":
        raise PacsError(f"WADO-RS part is {kind[:40]}, not application/dicom")
