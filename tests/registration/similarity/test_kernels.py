"""The compiled descriptor kernels: serial and parallel variants agree and stay distinct."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from disa.registration.similarity import kernels

PAIRS = [
    (kernels._cost_serial, kernels._cost_parallel),
    (kernels._point_serial, kernels._point_parallel),
]


def _problem(n_batch: int, n_points: int, seed: int = 0) -> tuple:
    """A random int8 moving map (Z, Y, X, C), its validity (a corner without data), its
    open faces (x low and y high), fixed descriptors and near-identity transforms."""
    rng = np.random.default_rng(seed)
    moving = rng.integers(-127, 128, size=(10, 12, 11, 16)).astype(np.int8)
    valid = np.ones(moving.shape[:3], np.float32)
    valid[:4, :5, :3] = 0.0
    fixed = rng.integers(-127, 128, size=(n_points, 16)).astype(np.int8)
    weights = np.full(n_points, 1.0 / n_points, np.float32)
    points = (rng.random((n_points, 3)) * [10, 11, 9]).astype(np.float32)
    mats = np.tile(np.hstack([np.eye(3), np.full((3, 1), 0.3)])[None], (n_batch, 1, 1))
    mats = mats + rng.normal(scale=0.05, size=mats.shape)
    faces = np.array([1, 0, 0, 1, 0, 0], np.uint8)
    return fixed, weights, points, moving, valid, faces, mats


@pytest.mark.parametrize(("serial", "parallel"), PAIRS)
def test_serial_and_parallel_variants_have_their_own_cache(serial, parallel) -> None:
    """numba keys its cache by function name, not by compile options: one Python
    function compiled twice shared a cache, and the parallel kernel ran serially."""
    assert serial.targetoptions["parallel"] is False
    assert parallel.targetoptions["parallel"] is True
    assert serial.py_func.__qualname__ != parallel.py_func.__qualname__
    assert serial._cache._cache_file._index_name != parallel._cache._cache_file._index_name


@pytest.mark.parametrize("ssd", [False, True])
def test_parallel_kernel_equals_serial(ssd: bool) -> None:
    fixed, weights, points, moving, valid, faces, mats = _problem(5, 700)
    args = (fixed, weights, points, moving, valid, faces, mats, 1 / 127, 1 / 127, ssd, True)
    serial = kernels._cost_serial(*args, 1)
    for n_chunks in (1, 3, 8):
        parallel = kernels._cost_parallel(*args, n_chunks)
        for a, b in zip(parallel, serial, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    overlap = serial[1]
    assert 0.0 < overlap.min() < 1.0  # some points fall outside: the border path runs


@pytest.mark.parametrize("ssd", [False, True])
def test_kernel_sums_count_only_points_on_valid_data(ssd: bool) -> None:
    """s = sum w v c and w = sum w v: a point whose moving partner lies where the map is
    invalid adds nothing to either (the overlap-normalised objective's two sums)."""
    fixed, weights, points, moving, valid, faces, mats = _problem(1, 400)
    mats = np.hstack([np.eye(3), np.zeros((3, 1))])[None]
    points = np.floor(points).astype(np.float32)  # on nodes: v is exactly 0 or 1
    node = points.astype(int)
    v = valid[node[:, 2], node[:, 1], node[:, 0]]
    m = moving[node[:, 2], node[:, 1], node[:, 0]].astype(np.float64) / 127
    f = fixed.astype(np.float64) / 127
    c = np.sum((f - m) ** 2, axis=1) if ssd else -np.sum(f * m, axis=1)
    s, w, _, _ = kernels._cost_serial(fixed, weights, points, moving, valid, faces, mats, 1 / 127,
                                      1 / 127, ssd, False, 1)
    np.testing.assert_allclose(w[0], np.sum(weights * v), rtol=1e-6)
    np.testing.assert_allclose(s[0], np.sum(weights * v * c), rtol=1e-5, atol=1e-9)
    assert 0 < v.sum() < len(v)


def _record_dispatch(monkeypatch, family: str) -> list[str]:
    """Replace ``_<family>_serial`` / ``_<family>_parallel`` by recorders on 2 threads."""
    calls: list[str] = []
    for variant in ("serial", "parallel"):
        monkeypatch.setattr(kernels, f"_{family}_{variant}",
                            lambda *a, v=variant: calls.append(v) or (None,) * 4)
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 2)
    return calls


def test_dispatch_picks_the_parallel_kernel_for_large_batches(monkeypatch) -> None:
    calls = _record_dispatch(monkeypatch, "cost")
    small = _problem(1, 4096)
    large = _problem(8, 4096)
    kernels.descriptor_cost(*small, 1 / 127, 1 / 127, False, True)
    kernels.descriptor_cost(*large, 1 / 127, 1 / 127, False, True)
    assert calls == ["serial", "parallel"]


_FRESH_PROCESS = """
import numba, numpy as np, sys
sys.path.insert(0, {tests!r})
from test_kernels import _problem
from disa.registration.similarity import kernels
variant = getattr(kernels, {name!r})
args = _problem(4, 300)
variant(*args, 1 / 127, 1 / 127, False, True, 4)
try:
    numba.threading_layer()
    print("pool")
except ValueError:
    print("no pool")
"""


@pytest.mark.parametrize(("name", "expected"), [("_cost_serial", "no pool"),
                                                ("_cost_parallel", "pool")])
def test_each_variant_runs_as_compiled_in_a_fresh_process(name: str, expected: str) -> None:
    """Loaded from the on-disk cache (as every worker process loads it), the parallel
    kernel starts numba's thread pool and the serial one does not."""
    tests = os.path.dirname(__file__)
    for _ in range(2):  # the first run may compile and fill the cache; the second loads it
        out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS.format(tests=tests,
                                                                         name=name)],
                             capture_output=True, text=True, timeout=300, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected


def test_point_kernel_parallel_equals_serial_and_dispatches_batches(monkeypatch) -> None:
    fixed, weights, points, moving, valid, faces, mats = _problem(4, 600)
    homogeneous = np.hstack([points.astype(np.float64), np.ones((len(points), 1))])
    coords = np.einsum("bij,nj->bni", mats, homogeneous)  # (B, N, 3) moving indices
    args = (fixed, weights, coords, moving, valid, faces, 1 / 127, 1 / 127, False, True)
    serial = kernels._point_serial(*args, 1)
    parallel = kernels._point_parallel(*args, 3)
    for a, b in zip(parallel, serial, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Same sums as the matrix kernel for the same transforms.
    s_m, w_m, _, _ = kernels._cost_serial(fixed, weights, points, moving, valid, faces, mats,
                                          1 / 127, 1 / 127, False, True, 1)
    np.testing.assert_allclose(serial[0], s_m, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(serial[1], w_m, rtol=1e-6, atol=1e-9)

    calls = _record_dispatch(monkeypatch, "point")
    one_mapping = np.zeros((1, 100_000, 3))  # a deformable field: parallel only from 400k
    batch = np.zeros((8, 4096, 3))  # probe-model starts: parallel like the matrix kernel
    for c in (one_mapping, batch):
        kernels.point_descriptor_cost(fixed[:1].repeat(c.shape[1], 0), np.ones(c.shape[1],
                                      np.float32), c, moving, valid, faces, 1 / 127, 1 / 127, False,
                                      True)
    assert calls == ["serial", "parallel"]


@pytest.mark.parametrize("ssd", [False, True])
def test_a_point_beyond_an_open_face_reads_that_face(ssd: bool) -> None:
    """Beyond an open face (the image meets air there) the map carries on as the face: the
    same term and validity as the point moved onto the face, and no gradient along that
    axis; beyond a closed face a point counts for nothing."""
    fixed, _, _, moving, valid, faces, _ = _problem(1, 1)  # x low and y high open
    valid[:] = 1.0
    weights = np.ones(1, np.float32)
    identity = np.hstack([np.eye(3), np.zeros((3, 1))])[None]
    nz, ny, nx = moving.shape[:3]

    def cost(point: list[float]) -> tuple:
        return kernels._cost_serial(fixed, weights, np.array([point], np.float32), moving,
                                    valid, faces, identity, 1 / 127, 1 / 127, ssd, True, 1)

    on_face, beyond = cost([0.0, 4.3, 5.6]), cost([-3.7, 4.3, 5.6])  # x low: open
    np.testing.assert_allclose(beyond[0], on_face[0], rtol=1e-6)
    assert beyond[1][0] == pytest.approx(1.0)
    assert np.all(beyond[2][0, 0] == 0.0) and np.any(beyond[2][0, 1:] != 0.0)
    np.testing.assert_allclose(cost([2.2, ny + 4.0, 5.6])[0], cost([2.2, ny - 1.0, 5.6])[0],
                               rtol=1e-6)  # y high: open
    for closed in ([nx + 1.5, 4.3, 5.6], [2.2, -2.0, 5.6], [2.2, 4.3, nz + 0.5]):
        s, w, gs, gw = cost(closed)
        assert s[0] == 0.0 and w[0] == 0.0 and not gs.any() and not gw.any()
    # Past an open and a closed face at once: the closed one decides.
    assert cost([-3.0, -2.0, 5.6])[1][0] == 0.0
