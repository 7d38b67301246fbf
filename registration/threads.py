"""Thread-pool policy of the engine on a shared (busy) machine.

Why: the search alternates short parallel numba regions (the coarse stage's
batched objective) with long single-threaded stretches (L-BFGS refinement,
one transform at a time). After a parallel region the OpenMP workers of
numba's ``omp`` threading layer, and OpenBLAS's workers after any BLAS call,
spin-wait for more work. On an idle machine they spin on idle cores and cost
nothing; when other processes hold the cores (a Celery worker with
concurrency > 1, a training run, a second registration) the spinners steal
the core the serial refinement needs. Measured here (2 cores, one training
process running, CT-MR case of benchmarks/capture_range.py): refinement 23 s
with the libraries' default wait policies, 0.4 s with passive waiting and
one BLAS thread; benchmarks/busy_machine.py repeats the measurement.

The engine's BLAS calls are tiny (3x3/4x4 matrices, L-BFGS vectors), so one
BLAS thread loses nothing; passive OpenMP waiting costs a thread wake-up
(tens of microseconds) per parallel region.

``DISA_THREAD_POLICY=default`` leaves both libraries at their defaults (the
benchmark's baseline).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from disa.core.environment import Environment

POLICY_ENV = "DISA_THREAD_POLICY"
POLICIES = ("passive", "default")


def policy() -> str:
    """The configured policy: ``passive`` (default) or ``default``."""
    value = (Environment.read().thread_policy or "passive").strip().lower()
    if value not in POLICIES:
        raise ValueError(f"{POLICY_ENV}={value!r} is not one of {', '.join(POLICIES)}")
    return value


def apply_wait_policy() -> None:
    """Ask OpenMP for passive waiting unless the user chose a wait policy.

    Must run before the OpenMP runtime starts (numba loads it at its first
    parallel region), hence at import of ``disa.registration``. A runtime that
    another library (torch) already started keeps its policy.
    """
    if policy() == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def serial_blas() -> Iterator[None]:
    """One BLAS thread inside the block (restored after), under the passive policy."""
    if policy() != "passive":
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
