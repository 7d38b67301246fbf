"""Atomic file writes: a temp file in the target's folder, then one rename.

Readers (the API serving a result folder, a resumed training run, a PACS
script polling a folder) see either the old file or the complete new one,
never a torn write. The temp file lives in the same folder so that
``os.replace`` is a rename on one file system. Files get mode 0644 (mkstemp
makes 0600) because the API and the workers may run as different users.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (some file systems cannot fsync folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None],
                 durable: bool = True) -> None:
    """Call ``write`` on a binary temp file next to ``path``, then rename it to ``path``.

    ``durable``: fsync the file and the folder, so the new content survives a crash.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(data: Any, path: str | Path, indent: int = 2, durable: bool = True) -> None:
    """Write ``data`` as JSON (UTF-8, trailing newline) atomically."""
    text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), durable)
