"""WADO-RS multipart/related bodies split into files by python-multipart's parser.

Byte-exact at every chunk size from 1 byte to 1 MiB; a body that is cut short or
malformed, or that breaks a cap, raises PacsError and leaves nothing written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from disa.pacs.dicomweb import split_multipart
from disa.pacs.retry import PacsError

BOUNDARY = b"DISA-7f3a"
PARTS = [
    b"\x00DICM" * 50,
    b"--not-a-boundary\r\n" * 3 + b"\r\n--" + BOUNDARY[:-1],  # near-boundaries inside data
    b"",
    os.urandom(3 * 1024**2 + 17),  # spans several 1 MiB chunks
    b"\r\n\r\n",
]


def _body(parts: list[bytes], preamble: bytes = b"", epilogue: bytes = b"\r\nbye",
          content_type: bytes = b"application/dicom") -> bytes:
    return preamble + b"".join(
        b"--" + BOUNDARY + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(p)).encode() + b"\r\n\r\n" + p + b"\r\n"
        for p in parts
    ) + b"--" + BOUNDARY + b"--" + epilogue


def _chunks(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 4096, 65536, 1024**2])
def test_parts_are_written_byte_exact_at_every_chunk_size(tmp_path: Path, size: int) -> None:
    parts = PARTS if size > 2 else PARTS[:3] + PARTS[4:]  # 3 MiB byte by byte is slow
    body = _body(parts, preamble=b"a preamble\r\n")
    written: list[Path] = []
    files = split_multipart(_chunks(body, size), BOUNDARY, tmp_path, 10, 10 * 1024**2,
                            written=written)
    assert [f.read_bytes() for f in files] == parts
    assert [f.name for f in files] == [f"{k:06d}.dcm" for k in range(1, len(parts) + 1)]
    assert written == files


def test_a_body_without_preamble_or_epilogue(tmp_path: Path) -> None:
    body = _body(PARTS[:2], epilogue=b"")
    files = split_multipart([body], BOUNDARY, tmp_path, 10, 10_000)
    assert [f.read_bytes() for f in files] == PARTS[:2]


@pytest.mark.parametrize("cut", [0.02, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("size", [1, 4096, 1024**2])
def test_a_truncated_body_is_an_error_and_leaves_nothing(tmp_path: Path, cut: float,
                                                          size: int) -> None:
    body = _body(PARTS[:3] if size == 1 else PARTS, epilogue=b"")
    truncated = body[:int(len(body) * cut)]
    written: list[Path] = []
    with pytest.raises(PacsError, match=r"ended early|no multipart part"):
        split_multipart(_chunks(truncated, size), BOUNDARY, tmp_path / "t", 10, 10 * 1024**2,
                        written=written)
    assert list((tmp_path / "t").iterdir()) == [] and written == []


@pytest.mark.parametrize("body, phrase", [
    (b"<html>502 Bad Gateway</html>", "no multipart part"),
    (b"x" * 20_000, "no boundary"),
    (b"--" + BOUNDARY + b"\r\nContent-Type application/dicom\r\n\r\ndata\r\n--" + BOUNDARY
     + b"--", "not valid multipart data"),
    (_body([b"data"], content_type=b"text/html"), "part is text/html, not application/dicom"),
    # The parser's own header limit may answer first: either way a clear refusal.
    (b"--" + BOUNDARY + b"\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
     r"headers are too long|not valid multipart data"),
])
def test_a_malformed_body_is_an_error_and_leaves_nothing(tmp_path: Path, body: bytes,
                                                         phrase: str) -> None:
    for size in (1, 4096):
        folder = tmp_path / str(size)
        with pytest.raises(PacsError, match=phrase):
            split_multipart(_chunks(body, size), BOUNDARY, folder, 10, 10_000)
        assert list(folder.iterdir()) == []


def test_caps_on_instances_and_bytes(tmp_path: Path) -> None:
    body = _body(PARTS[:3])
    with pytest.raises(PacsError, match="more than 2 instances"):
        split_multipart(_chunks(body, 64), BOUNDARY, tmp_path / "n", 2, 10_000)
    assert list((tmp_path / "n").iterdir()) == []
    with pytest.raises(PacsError, match="larger than 300 bytes"):
        split_multipart(_chunks(body, 64), BOUNDARY, tmp_path / "b", 10, 300)
    assert list((tmp_path / "b").iterdir()) == []
