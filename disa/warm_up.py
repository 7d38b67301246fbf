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
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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
