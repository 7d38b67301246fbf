"""Uploads that stall are closed (408) and each key has a bound on uploads in progress (429).

A real uvicorn server on a socket: the stalled client is a raw socket that sends the
headers and a few bytes of the body, then nothing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..support import wait_until
from .helpers import (
    API_KEY,
    OTHER_KEY,
    TINY_OPTIONS,
    api_key_env,
    live_service,
    service_env,
)

IDLE_TIMEOUT_S = 1.5


@pytest.fixture
def server(tmp_path: Path, dispatcher) -> Iterator[tuple[str, Path]]:
    """The API (recording dispatcher) with a short idle timeout and one upload per key."""
    env = {**service_env(tmp_path / "jobs", broker_url="redis://unused:1/0",
                         upload_idle_timeout_s=IDLE_TIMEOUT_S, max_concurrent_uploads=1,
                         sweep_interval_s=3600),
           **api_key_env()}
    with live_service(env) as url:
        yield url, tmp_path / "jobs" / ".incoming"


def _stalled_upload(url: str, key: str) -> socket.socket:
    """Send the headers of a 100 kB multipart body and its first bytes, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    start = (b"--b\r\nContent-Disposition: form-data; name=\"fixed\"; "
             b"filename=\"f.nii.gz\"\r\n\r\n0123456789")
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\nX-API-Key: " + key.encode() + b"\r\n\r\n" + start)
    return sock


def _response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _submit(url: str, pair: tuple[Path, Path], key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", headers={"X-API-Key": key},
                      files={"fixed": ("f.nii.gz", pair[0].read_bytes()),
                             "moving": ("m.nii.gz", pair[1].read_bytes())},
                      data={"options": json.dumps(TINY_OPTIONS)}, timeout=30)


def test_a_stalled_upload_is_answered_408_and_its_staging_folder_removed(server):
    url, incoming = server
    sock = _stalled_upload(url, API_KEY)
    try:
        wait_until(lambda: any(incoming.iterdir()), 10, "the staging folder")
        started = time.monotonic()
        status, body = _response(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert status == 408, body
    assert body == {"detail": f"the upload sent nothing for {IDLE_TIMEOUT_S:g} s; send the "
                              "body without pauses"}
    assert waited < IDLE_TIMEOUT_S + 5
    assert list(incoming.iterdir()) == []


def test_each_key_has_a_bound_on_uploads_in_progress(server, pair_files):
    url, incoming = server
    sock = _stalled_upload(url, API_KEY)
    try:
        wait_until(lambda: any(incoming.iterdir()), 10, "the staging folder")
        r = _submit(url, pair_files, API_KEY)  # the key's one upload slot is taken
        assert r.status_code == 429, r.text
        assert r.json()["detail"] == ("this API key has 1 uploads in progress already; wait "
                                      "for one to finish")
        assert r.headers["retry-after"]
        assert len(list(incoming.iterdir())) == 1  # no staging folder for the refused one
        assert _submit(url, pair_files, OTHER_KEY).status_code == 202  # other keys go on
        assert _response(sock)[0] == 408
    finally:
        sock.close()
    assert _submit(url, pair_files, API_KEY).status_code == 202  # the slot is free again
    assert list(incoming.iterdir()) == []
