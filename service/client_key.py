"""Where command-line clients (`disa submit`, `disa pacs`) take the API key from.

A key given as `--api-key KEY` is visible to every user of the machine in the
process list and stays in the shell history, so it still works but prints a
warning; the key is better read from a file (`--api-key-file`, or the file named
by DISA_API_KEY_FILE) or from DISA_API_KEY.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from disa.core.environment import Environment, variable
from disa.service.engine_surface import InputError

KEY_VARIABLE = variable("api_key")
KEY_FILE_VARIABLE = variable("api_key_file")
#: A key file is one line; anything longer is not one.
MAX_KEY_FILE_BYTES = 4096
FLAG_WARNING = ("disa: warning: --api-key shows the key to other users of this machine (process "
                f"list) and leaves it in the shell history; use {KEY_VARIABLE} or "
                "--api-key-file")


def add_api_key_arguments(parser: argparse.ArgumentParser) -> None:
    """`--api-key-file FILE` and the discouraged `--api-key KEY`."""
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help=f"file holding the API key on its first line (default: "
                             f"{KEY_FILE_VARIABLE}; else the key in {KEY_VARIABLE})")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"the API key itself (discouraged, warns: other users see it in "
                             f"the process list; prefer {KEY_VARIABLE} or --api-key-file)")


def api_key_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                 warnings: TextIO | None = None) -> str | None:
    """The API key: --api-key (with a warning), --api-key-file, DISA_API_KEY_FILE, then
    DISA_API_KEY; None when none is given. InputError for a key file that cannot be read
    or holds no key."""
    env = Environment.read(environ)
    if args.api_key:
        print(FLAG_WARNING, file=warnings or sys.stderr)
        return args.api_key
    key_file = args.api_key_file or env.api_key_file or None
    if key_file is not None:
        return read_key_file(Path(key_file))
    return env.api_key or None


def read_key_file(path: Path) -> str:
    """The key on the first line of `path` (surrounding white space removed)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"API key file {path}: {exc.strerror or type(exc).__name__}") from None
    lines = data.decode("utf-8", "replace").splitlines()
    key = lines[0].strip() if lines else ""
    if len(data) > MAX_KEY_FILE_BYTES or not key:
        raise InputError(f"API key file {path}: holds no key (one line, the key)")
    return key
