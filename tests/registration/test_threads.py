"""The engine's thread policy: passive OpenMP waiting and one BLAS thread inside register()."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from disa.registration import pipeline
from disa.registration.options import RegistrationOptions
from disa.registration.threads import POLICY_ENV, policy, serial_blas
from disa.training import phantom as ph


def _omp_policy_after_import(env_update: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", POLICY_ENV)}
    env.update(env_update)
    code = "import os, disa.registration; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_importing_the_engine_asks_openmp_for_passive_waiting() -> None:
    assert _omp_policy_after_import({}) == "PASSIVE"


def test_a_users_wait_policy_and_the_default_policy_are_respected() -> None:
    assert _omp_policy_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _omp_policy_after_import({POLICY_ENV: "default"}) == "<unset>"


def test_unknown_policy_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(POLICY_ENV, "turbo")
    with pytest.raises(ValueError, match=POLICY_ENV):
        policy()


def _blas_threads() -> list[int]:
    return [m["num_threads"] for m in threadpool_info() if m["user_api"] == "blas"]


@pytest.fixture
def blas() -> None:
    """BLAS loaded and visible to threadpoolctl, else skip."""
    import numpy as np

    np.dot(np.ones((4, 4)), np.ones((4, 4)))
    if not _blas_threads():
        pytest.skip("no BLAS library visible to threadpoolctl")


def test_register_runs_with_one_blas_thread_and_restores_it(monkeypatch, blas) -> None:
    seen: list[list[int]] = []
    real_prepare = pipeline.prepare

    def recording_prepare(*args, **kwargs):
        seen.append(_blas_threads())
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", recording_prepare)
    monkeypatch.delenv(POLICY_ENV, raising=False)
    truth = ph.rigid_truth((4.0, 0.0, 0.0), (5.0, 0.0, 0.0))
    pair = ph.make_pair(truth, fixed_grid=ph.make_grid((40, 40, 40), (3.0, 3.0, 3.0)), seed=3)
    with threadpool_limits(limits=2, user_api="blas"):
        pipeline.register(pair.fixed, pair.moving,
                          RegistrationOptions(similarity="mind", starts=8))
        after = _blas_threads()
    assert seen and all(threads == [1] * len(threads) for threads in seen)
    assert after == [2] * len(after)


def test_default_policy_leaves_blas_alone(monkeypatch, blas) -> None:
    monkeypatch.setenv(POLICY_ENV, "default")
    with threadpool_limits(limits=2, user_api="blas"), serial_blas():
        assert _blas_threads() == [2] * len(_blas_threads())
