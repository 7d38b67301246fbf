"""What every benchmark script prints with its figures (imported as ``common`` from
the scripts' own folder, which Python puts on the path when a script runs)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """Processor, the CPU cores this process may use, and the OS, in one line."""
    cpus = len(os.sched_getaffinity(0))
    return f"{platform.processor() or platform.machine()}, {cpus} CPU cores, {platform.system()}"
