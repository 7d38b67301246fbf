"""DescriptorMap's compiled smoothing and int8 encoding give the numbers of the scipy /
numpy code they replaced, the smoothing up to float32 rounding (issue 24: the
re-orientation stage's speed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from disa.core.grid import Grid
from disa.model.codes import INT8_SCALE, encode_int8
from disa.registration.similarity.descriptor_map import DescriptorMap


def _map(shape: tuple[int, int, int, int], int8: bool, seed: int = 0) -> DescriptorMap:
    """MIND-like values in [0, 1] (exp of minus a positive field), smooth-ish and noisy."""
    rng = np.random.default_rng(seed)
    noise = rng.exponential(1.0, size=shape)
    data = np.exp(-ndimage.uniform_filter(noise, 3)).astype(np.float32)
    grid = Grid(shape[:3], np.zeros(3), np.full(3, 2.0), np.eye(3))
    out = DescriptorMap(data, grid)
    return out.quantised() if int8 else out


def _scipy_smoothed(m: DescriptorMap, sigma: float) -> DescriptorMap:
    """What DescriptorMap.smoothed computed before it was compiled (scipy, 2026-12-05)."""
    values = ndimage.gaussian_filter(m.as_float(), (sigma,) * 3 + (0.0,),
                                     mode="nearest").astype(np.float32)
    smooth = DescriptorMap(np.ascontiguousarray(values), m.grid, 1.0, m.valid)
    if not m.is_int8:
        return smooth
    return DescriptorMap(encode_int8(smooth.as_float()), m.grid, INT8_SCALE, m.valid)


@pytest.mark.parametrize("shape", [(23, 17, 29, 12), (5, 3, 2, 12), (9, 11, 8, 70),
                                   (1, 12, 40, 4)])
@pytest.mark.parametrize("sigma", [1.0, 0.6, 2.3])
def test_smoothing_equals_scipy(shape: tuple[int, int, int, int], sigma: float) -> None:
    for int8 in (False, True):
        m = _map(shape, int8)
        fast, slow = m.smoothed(sigma), _scipy_smoothed(m, sigma)
        assert fast.data.dtype == slow.data.dtype and fast.scale == slow.scale
        assert fast.data.flags.c_contiguous
        if int8:
            # scipy's order in float32 rather than float64: a code one off where a value
            # sat on a rounding boundary is float noise, more is a wrong filter.
            assert np.abs(fast.data.astype(int) - slow.data.astype(int)).max() <= 1
            assert np.mean(fast.data != slow.data) < 1e-4
        else:
            np.testing.assert_allclose(fast.data, slow.data, rtol=1e-5, atol=1e-6)


def test_smoothing_matches_scipy_on_a_map_of_the_engines_size() -> None:
    # Interior runs longer than one thread block (16,384 values), ends clamped.
    m = _map((40, 36, 45, 12), True, seed=5)
    fast, slow = m.smoothed(1.0).data, _scipy_smoothed(m, 1.0).data
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 1
    assert np.mean(fast != slow) < 1e-4
    f = _map((40, 36, 45, 12), False, seed=6)
    np.testing.assert_allclose(f.smoothed(1.0).data, _scipy_smoothed(f, 1.0).data,
                               rtol=1e-5, atol=1e-6)


def test_smoothing_is_cached_per_sigma() -> None:
    m = _map((8, 8, 8, 12), True)
    assert m.smoothed(1.0) is m.smoothed(1.0)
    assert m.smoothed(0.5) is not m.smoothed(1.0)


def test_quantised_equals_encode_int8() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(-1.2, 1.2, size=(7, 6, 5, 12)).astype(np.float32)
    # Exact rounding boundaries (x.5 codes, half to even) and the clip.
    values.reshape(-1)[:6] = np.array([0.5, 1.5, -0.5, -2.5, 200.0, -200.0]) / 127.0
    grid = Grid((7, 6, 5), np.zeros(3), np.ones(3), np.eye(3))
    codes = DescriptorMap(values, grid).quantised()
    assert codes.is_int8 and codes.scale == INT8_SCALE
    assert np.array_equal(codes.data, encode_int8(values))


def _numpy_halved(values: np.ndarray, axis: int, edge: bool) -> np.ndarray:
    """[1, 2, 1]/4 along ``axis`` evaluated at every second voxel only (voxel i of the result
    on voxel 2i), zeros beyond the ends, or the edge value with ``edge``.

    What DescriptorMap.pooled computed in numpy until 2026-12-06, one axis at a time.
    """
    n = values.shape[axis]
    m = (n + 1) // 2  # output voxels: inputs 0, 2, ...

    def take(part: slice) -> np.ndarray:
        index = [slice(None)] * values.ndim
        index[axis] = part
        return values[tuple(index)]

    def into(part: slice) -> tuple[slice, ...]:
        index = [slice(None)] * values.ndim
        index[axis] = part
        return tuple(index)

    quarter = np.float32(0.25)
    out = take(slice(0, None, 2)) * np.float32(0.5)
    odd = take(slice(1, None, 2)) * quarter  # right neighbours of 0, 2, ...; left of 2, 4, ...
    out[into(slice(0, n // 2))] += odd
    out[into(slice(1, m))] += odd[into(slice(0, m - 1))]
    if edge:  # beyond the ends, the edge voxel's value
        out[into(slice(0, 1))] += take(slice(0, 1)) * quarter
        if n % 2:
            out[into(slice(m - 1, m))] += take(slice(n - 1, n)) * quarter
    return out


@pytest.mark.parametrize("shape", [(7, 8, 9, 12), (40, 36, 45, 12), (1, 2, 3, 4), (2, 1, 5, 16)])
def test_pooling_equals_numpy(shape: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(3)
    for int8 in (False, True):
        m = _map(shape, int8, seed=4).with_validity(rng.random(shape[:3]) > 0.3)
        pooled = m.pooled()
        values, valid = m.as_float(), m.validity
        for axis in range(3):
            values = _numpy_halved(values, axis, edge=False)
            valid = _numpy_halved(valid, axis, edge=True)
        expected = DescriptorMap(np.ascontiguousarray(values), m.grid.strided(2))
        expected = expected.quantised() if int8 else expected
        assert pooled.data.dtype == expected.data.dtype
        assert np.array_equal(pooled.data, expected.data)
        assert np.array_equal(pooled.validity, valid)


@pytest.mark.parametrize("shape", [(9, 10, 11, 12), (80, 60, 50, 12)])
def test_valid_moments_equal_numpy(shape: tuple[int, int, int, int]) -> None:
    """The compiled moments give what numpy's weighted means gave, subsample included (the
    larger map is subsampled: over 200,000 voxels)."""
    rng = np.random.default_rng(9)
    for int8 in (False, True):
        validity = rng.random(shape[:3]) * (rng.random(shape[:3]) > 0.4)
        m = _map(shape, int8, seed=2).with_validity(validity)
        values = m.data.reshape(-1, shape[3])
        stride = max(1, len(values) // 200_000)
        values = values[::stride].astype(np.float64) * float(m.scale)
        weights = m.validity.ravel()[::stride].astype(np.float64)
        mean, square = m.valid_moments
        np.testing.assert_allclose(mean, (weights @ values) / weights.sum(), rtol=1e-10)
        expected = weights @ np.sum(values * values, axis=1) / weights.sum()
        np.testing.assert_allclose(square, expected, rtol=1e-10)
    # No valid voxel: the plain mean.
    none = _map((6, 5, 4, 12), False).with_validity(np.zeros((6, 5, 4)))
    np.testing.assert_allclose(none.valid_moments[0], none.data.reshape(-1, 12).mean(axis=0),
                               rtol=1e-6)
