"""Warm-up: compile the engine's numba kernels into the on-disk cache before the first job.

The engine's kernels are compiled by numba on first use and cached on disk
(``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the sources). After an install the
cache is empty, and the first registration pays the whole compile (about 10 s on a
fast core, 47 s on the slow 2-core Xeon of benchmarks/README.md) on top of its own
run time. ``disa warm-up`` pays it once, on purpose: the Docker images run it at build
time, and ``disa worker`` runs it before it takes jobs, so that a fresh worker's first
job costs what every later job costs.

What is compiled is whatever the registrations below reach: a default rigid
registration of the bundled sample pair (MIND-SSC, re-orientation, verdict), a
deformable one (affine stage, discrete search, regularisation) and, when the model
ships, a rigid one with DISA's int8 descriptor maps. numba specialises a kernel on
its argument types, not on sizes, so a small search (few starts) compiles what a
full one runs; tests/test_warm_up.py checks that a default and a deformable
registration of the sample compile nothing more afterwards.

A warm-up that finished leaves a stamp (``disa-warm-up.json``) in the cache folder:
what the cache was compiled for (disa, numba, llvmlite and Python versions, the host
CPU and its features, the NUMBA_* settings, the size and modification time of every
engine source, which numba keys its index on too) and which index files it wrote.
A later ``disa warm-up`` whose stamp still matches and whose index files are all
there does nothing (``--force`` runs it anyway): a worker restarting on a warm cache
used to spend 24 s re-running registrations that compiled nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from disa.core.atomic import write_json

#: Random starts of each warm-up registration: enough to reach every stage.
WARM_UP_STARTS = 24


def warm_up_runs() -> list[tuple[str, dict[str, object]]]:
    """(name, RegistrationOptions fields) of each warm-up registration."""
    from disa.model.card import default_card_path

    runs: list[tuple[str, dict[str, object]]] = [
        ("rigid", {"starts": WARM_UP_STARTS}),
        ("deformable", {"starts": WARM_UP_STARTS, "mode": "deformable"}),
    ]
    if default_card_path() is not None:
        runs.append(("disa", {"starts": WARM_UP_STARTS, "similarity": "disa"}))
    return runs


def warm_up() -> dict[str, float]:
    """Run the warm-up registrations on the bundled sample pair; seconds per run.

    The result folders go to a temporary folder that is removed afterwards.
    """
    from disa.registration.options import RegistrationOptions
    from disa.registration.runner import run_registration
    from disa.sample import sample_paths

    fixed, moving, _ = sample_paths()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="disa-warm-up-") as tmp:
        for name, fields in warm_up_runs():
            t0 = time.perf_counter()
            run_registration(fixed, moving, Path(tmp) / name, RegistrationOptions(**fields))
            seconds[name] = time.perf_counter() - t0
    return seconds


#: The stamp a finished warm-up leaves in the cache folder.
STAMP_NAME = "disa-warm-up.json"


def _engine_folder() -> Path:
    import disa.registration

    return Path(disa.registration.__file__).parent


def cache_folder() -> Path:
    """Where numba caches the engine's kernels: NUMBA_CACHE_DIR, else the ``__pycache__``
    folders beside the sources (the stamp then goes in the engine package's)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    return Path(configured) if configured else _engine_folder() / "__pycache__"


def _index_root() -> Path:
    """The folder that holds all of the engine's numba index files: NUMBA_CACHE_DIR, else
    the engine package (one ``__pycache__`` per source folder)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    return Path(configured) if configured else _engine_folder()


def _index_files() -> list[str]:
    """numba's cache index files of the engine, relative to ``_index_root()``."""
    root = _index_root()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.nbi")) if root.is_dir() else []


def cache_key() -> dict[str, Any]:
    """What a compiled cache depends on; a warm cache is valid only for the same key."""
    import llvmlite
    import llvmlite.binding as llvm
    import numba

    from disa import __version__

    sources = hashlib.sha256()
    for path in sorted(_engine_folder().rglob("*.py")):
        stat = path.stat()
        sources.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    features = llvm.get_host_cpu_features()
    return {
        "disa": __version__, "numba": numba.__version__, "llvmlite": llvmlite.__version__,
        "python": platform.python_version(), "cpu": llvm.get_host_cpu_name(),
        "cpu_features": features.flatten() if hasattr(features, "flatten") else str(features),
        "numba_settings": sorted((k, v) for k, v in os.environ.items()
                                 if k.startswith("NUMBA_") and k != "NUMBA_CACHE_DIR"),
        "engine_sources": sources.hexdigest(),
        "runs": [name for name, _ in warm_up_runs()],
    }


def write_stamp() -> Path | None:
    """Record that the cache is warm for this key (after a finished warm-up); None when
    its folder cannot be written (a read-only install: the next warm-up runs again)."""
    folder = cache_folder()
    stamp = {"key": cache_key(), "index_files": _index_files(),
             "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(stamp, folder / STAMP_NAME, indent=1)
    except OSError:
        return None
    return folder / STAMP_NAME


def is_warm() -> bool:
    """Whether the cache holds a finished warm-up for this key, its index files intact."""
    try:
        stamp = json.loads((cache_folder() / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("key") != json.loads(json.dumps(cache_key())):
        return False
    index = stamp.get("index_files")
    root = _index_root()
    return isinstance(index, list) and bool(index) and all((root / n).is_file() for n in index)
