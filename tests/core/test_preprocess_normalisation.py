"""The fast automatic foreground and z-score give the same bits as the plain scipy/numpy
forms they replaced (issue 24: normalising a 256^3 volume took 1.1 s of a cold
``disa descriptors``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from disa.core import preprocess as pp
from disa.core.preprocess import (
    CLIP_PERCENTILES,
    Z_CLIP,
    foreground_mask,
    intensity_normalisation,
    normalise_intensities,
)


def _previous_foreground_mask(volume: np.ndarray) -> np.ndarray:
    """foreground_mask as it was before (commit 98a6b6d): the reference."""
    smooth = ndimage.uniform_filter(volume.astype(np.float32), size=3)
    finite = smooth[np.isfinite(smooth)]
    if finite.size == 0 or finite.max() <= finite.min():
        return np.zeros(volume.shape, dtype=bool)
    # Otsu on one plain np.histogram (no value_range: the unthreaded path, as before).
    threshold = pp.otsu_threshold(finite)
    mask = smooth > threshold
    if mask.sum() < 0.01 * mask.size:
        mask = smooth > finite.min() + 1e-3 * (finite.max() - finite.min())
    mask = ndimage.binary_dilation(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)


def _previous_normalise(volume: np.ndarray) -> np.ndarray:
    """normalise_intensities as it was before (commit 98a6b6d): the reference."""
    volume = np.asarray(volume, dtype=np.float32)
    mask = _previous_foreground_mask(volume)
    values = volume[mask] if mask.any() else volume.ravel()
    lo, hi = np.percentile(values, CLIP_PERCENTILES)
    clipped = np.clip(values, lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std())
    out = (np.clip(volume, np.float64(lo), np.float64(hi)) - mean) / std
    return np.clip(out, -Z_CLIP, Z_CLIP).astype(np.float32)


def _head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A noisy ellipsoid 'head' with a dark cavity (a hole for fill_holes), skull-bright
    rim and air around it, float32."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.75) ** 2)
    volume = np.where(r < 1.0, 40.0, -1000.0) + np.where((r > 0.85) & (r < 1.0), 900.0, 0.0)
    volume = np.where(r < 0.25, -1000.0, volume)  # an enclosed air cavity
    volume += rng.normal(0.0, 15.0, shape)
    return volume.astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 56, 48), (2, 9, 7), (3, 1, 8), (5, 6, 2), (40, 33, 1)])
def test_foreground_mask_equals_the_previous_method(shape: tuple[int, int, int]) -> None:
    volume = _head(shape)
    np.testing.assert_array_equal(foreground_mask(volume), _previous_foreground_mask(volume))


def test_foreground_mask_on_sparse_nonfinite_and_constant_volumes() -> None:
    rng = np.random.default_rng(3)
    sparse = np.full((30, 31, 32), -1000.0, dtype=np.float32)  # mostly air: the fallback
    sparse[rng.integers(0, 30, 12), rng.integers(0, 31, 12), rng.integers(0, 32, 12)] = 2000.0
    nonfinite = _head((24, 20, 22), seed=4)
    nonfinite[3, 4, 5], nonfinite[10, 10, 10], nonfinite[20, 2, 7] = np.nan, np.inf, -np.inf
    for volume in (sparse, nonfinite, np.zeros((8, 9, 10), np.float32),
                   np.full((6, 5, 4), np.nan, np.float32), _head((20, 22, 18)).astype(np.int16)):
        np.testing.assert_array_equal(foreground_mask(volume), _previous_foreground_mask(volume))


def test_mask_steps_equal_scipy_on_random_masks() -> None:
    rng = np.random.default_rng(7)
    for density in (0.0, 0.05, 0.4, 0.7, 1.0):
        mask = rng.random((23, 19, 17)) < density
        np.testing.assert_array_equal(pp._dilate_cross(mask, 2),
                                      ndimage.binary_dilation(mask, iterations=2))
        np.testing.assert_array_equal(pp._fill_holes(mask), ndimage.binary_fill_holes(mask))
    shell = np.zeros((15, 16, 17), dtype=bool)  # a closed box with a hole, off-centre
    shell[2:12, 3:14, 5:16] = True
    shell[4:10, 5:12, 7:14] = False
    np.testing.assert_array_equal(pp._fill_holes(shell), ndimage.binary_fill_holes(shell))


def test_box_mean_and_threshold_equal_scipy_and_numpy() -> None:
    volume = _head((37, 29, 31), seed=9)
    np.testing.assert_array_equal(pp._box_mean3(volume), ndimage.uniform_filter(volume, 3))
    values = volume.reshape(-1)
    # Counted in halves over the known range, or by np.histogram alone: one threshold.
    assert pp.otsu_threshold(values, value_range=(values.min(), values.max())) == \
        pp.otsu_threshold(values)


def test_normalised_volume_equals_the_previous_method() -> None:
    # Large enough (> 2 blocks) for the blocked, threaded z-score.
    volume = _head((96, 90, 84), seed=1)
    assert volume.size > 2 * pp._APPLY_BLOCK
    expected = _previous_normalise(volume)
    result = normalise_intensities(volume)
    assert result.dtype == np.float32 and result.flags.c_contiguous
    np.testing.assert_array_equal(result, expected)
    # Not C-ordered (a transposed view): the one-block path, same values.
    np.testing.assert_array_equal(intensity_normalisation(volume).apply(volume.T), expected.T)
