"""Tests of the MIND-SSC baseline descriptors (numpy (z, y, x) voxel arrays)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from disa.registration.similarity.mind import MIND_CHANNELS, mind_pairs, mind_ssc


def _smooth_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32)


def _label_phantom(shape: tuple[int, int, int], n_labels: int = 5, seed: int = 1) -> np.ndarray:
    """Random smooth blobs: integer labels 0..n_labels-1 with region sizes of ~10 voxels."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    edges = np.quantile(field, np.linspace(0, 1, n_labels + 1)[1:-1])
    return np.digitize(field, edges)


def _naive_mind(volume: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """Loop-by-loop reference of the definition: the image is read with its border voxels
    replicated (clamped indices), for the pair's shifts and the box cube alike."""
    nz, ny, nx = volume.shape
    v = volume.astype(np.float64)

    def at(z: int, y: int, x: int) -> float:
        return v[min(max(z, 0), nz - 1), min(max(y, 0), ny - 1), min(max(x, 0), nx - 1)]

    pairs = mind_pairs(dilation)
    dist = np.zeros((nz, ny, nx, len(pairs)))
    for z, y, x in itertools.product(range(nz), range(ny), range(nx)):
        for c, (a, b) in enumerate(pairs):
            total = 0.0
            for dz, dy, dx in itertools.product(range(-radius, radius + 1), repeat=3):
                qz, qy, qx = z + dz, y + dy, x + dx
                diff = at(qz + a[0], qy + a[1], qx + a[2]) - at(qz + b[0], qy + b[1], qx + b[2])
                total += diff * diff
            dist[z, y, x, c] = total / (2 * radius + 1) ** 3
    dist -= dist.min(axis=-1, keepdims=True)
    var = dist.mean(axis=-1, keepdims=True)
    var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean())
    return np.exp(-dist / var)


def test_pairs_are_the_octahedron_edges() -> None:
    d = 2
    pairs = mind_pairs(d)
    assert len(pairs) == MIND_CHANNELS == 12
    six = [tuple(s * d * (i == ax) for i in range(3)) for ax in range(3) for s in (1, -1)]
    edges = {
        frozenset((p, q))
        for p, q in itertools.combinations(six, 2)
        if sum((pi - qi) ** 2 for pi, qi in zip(p, q, strict=True)) == 2 * d * d
    }
    assert {frozenset(pair) for pair in pairs} == edges


def test_shape_dtype_range_layout() -> None:
    vol = _smooth_volume((20, 24, 28))
    mind = mind_ssc(vol, radius=1, dilation=2)
    assert mind.shape == (20, 24, 28, MIND_CHANNELS)
    assert mind.dtype == np.float32
    assert mind.flags.c_contiguous
    assert np.all(np.isfinite(mind))
    assert mind.min() >= 0.0 and mind.max() <= 1.0
    # The most self-similar pair of each voxel has distance 0 after the
    # minimum is subtracted, hence exp(0) = 1.
    np.testing.assert_allclose(mind.max(axis=-1), 1.0, atol=1e-6)
    assert mind.std() > 0.05


@pytest.mark.parametrize(("scale", "offset"), [(3.5, 200.0), (0.01, -7.0), (1.0, 1000.0)])
def test_invariant_to_affine_intensity_change(scale: float, offset: float) -> None:
    # float64 so that the changed input itself is exact enough (a float32
    # offset of 1000 would round away the fine structure before MIND sees it).
    vol = _smooth_volume((16, 18, 20), seed=3).astype(np.float64)
    np.testing.assert_allclose(mind_ssc(scale * vol + offset), mind_ssc(vol), atol=2e-4)


def test_constant_volume_gives_equal_channels() -> None:
    mind = mind_ssc(np.full((10, 11, 12), 42.0))
    np.testing.assert_array_equal(mind, 1.0)


def test_translation_gives_translated_descriptors() -> None:
    vol = np.zeros((32, 34, 36), np.float32)
    # Structure only in the interior: the rolled copy wraps nothing but the
    # flat margin around, so the roll acts as a plain translation.
    vol[10:-10, 10:-10, 10:-10] = _smooth_volume((12, 14, 16), seed=5)
    shift = (2, -3, 1)
    moved = mind_ssc(np.roll(vol, shift, axis=(0, 1, 2)))
    expected = np.roll(mind_ssc(vol), shift, axis=(0, 1, 2))
    interior = (slice(5, -5),) * 3
    np.testing.assert_allclose(moved[interior], expected[interior], atol=1e-5)


def test_two_contrasts_match_best_when_aligned() -> None:
    labels = _label_phantom((40, 40, 40))
    rng = np.random.default_rng(7)
    # Two unrelated (non-monotonic) label-to-intensity maps: two "modalities".
    lut_a, lut_b = rng.uniform(0, 1000, size=(2, labels.max() + 1))
    image_a = lut_a[labels] + rng.normal(0, 5, labels.shape)
    image_b = lut_b[labels] + rng.normal(0, 5, labels.shape)
    mind_a = mind_ssc(image_a)
    interior = (slice(6, -6),) * 3

    def ssd(b: np.ndarray) -> float:
        return float(np.mean((mind_a[interior] - mind_ssc(b)[interior]) ** 2))

    aligned = ssd(image_b)
    for axis in range(3):
        shifted = ssd(np.roll(image_b, 3, axis=axis))
        assert aligned < 0.7 * shifted, (axis, aligned, shifted)


@pytest.mark.parametrize(("radius", "dilation"), [(1, 2), (2, 1), (0, 1), (3, 2)])
def test_matches_naive_reference(radius: int, dilation: int) -> None:
    vol = _smooth_volume((6, 7, 8), seed=11)
    expected = _naive_mind(vol, radius, dilation)
    got = mind_ssc(vol, radius=radius, dilation=dilation)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # A few voxels spelled out (corner, edge, centre) for a readable failure.
    for p in [(0, 0, 0), (5, 0, 3), (3, 3, 4)]:
        np.testing.assert_allclose(got[p], expected[p], rtol=1e-4, atol=1e-5)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="3D"):
        mind_ssc(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="radius"):
        mind_ssc(np.zeros((4, 4, 4)), radius=-1)
    with pytest.raises(ValueError, match="dilation"):
        mind_ssc(np.zeros((4, 4, 4)), dilation=0)
