"""Helpers shared by the test packages: free loopback ports, polling with a deadline, a
file-size limit standing in for full storage, and a tiny phantom pair on disk."""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """Files of this process cannot grow past `limit_bytes`: write() fails with EFBIG, a real
    OSError from the kernel standing in for a full or failing volume (ENOSPC)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else SIGXFSZ kills
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def write_pair(folder: Path, size: int = 24, spacing: float = 4.0) -> tuple[Path, Path]:
    """A phantom fixed/moving pair (known rigid motion: 8/-6/7 deg, 10/-8/9 mm, fixed ->
    moving) on a `size`^3 grid of `spacing` mm, as .nii.gz files in `folder`."""
    from disa.core.io.images import write_image
    from disa.training import phantom as ph

    folder.mkdir(parents=True, exist_ok=True)
    pair = ph.make_pair(ph.rigid_truth((8, -6, 7), (10, -8, 9)),
                        fixed_grid=ph.make_grid((size,) * 3, (spacing,) * 3))
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    write_image(pair.fixed, fixed)
    write_image(pair.moving, moving)
    return fixed, moving
