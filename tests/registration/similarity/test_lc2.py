"""LC2: fast box-sum and FFT paths against the direct least-squares reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from disa.registration.similarity import lc2 as L


def _pair(seed: int = 0, shape: tuple[int, int, int] = (28, 30, 32)) -> tuple[np.ndarray, ...]:
    """A smooth random 'MR' volume and a non-monotonic, noisy function of it ('US')."""
    rng = np.random.default_rng(seed)
    mr = gaussian_filter(rng.normal(size=shape), 1.5)
    mr /= mr.std()
    us = np.sin(2.0 * mr) + 0.5 * L.gradient_magnitude(mr) + 0.2 * rng.normal(size=shape)
    us = (us - us.mean()) / us.std()
    return mr, us


def _cube(c: tuple[int, int, int], r: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Cube of radius r at c, clipped to the volume (the module's border rule)."""
    return tuple(slice(max(ci - r, 0), min(ci + r + 1, s)) for ci, s in zip(c, shape, strict=True))


def test_gradient_magnitude_of_a_ramp() -> None:
    z, _y, x = np.meshgrid(np.arange(6.0), np.arange(7.0), np.arange(8.0), indexing="ij")
    g = L.gradient_magnitude(2.0 * z - 1.0 * x)
    np.testing.assert_allclose(g[1:-1, 1:-1, 1:-1], np.sqrt(5.0))
    # Edge replication halves the difference on the outer slices.
    assert g[0, 3, 3] == pytest.approx(np.sqrt(1.0 + 1.0))


@pytest.mark.parametrize("radius", [3, 5, 7])
def test_box_sum_lc2_matches_naive_least_squares(radius: int) -> None:
    mr, us = _pair()
    fast = L.local_lc2(us, mr, radius)
    g = L.gradient_magnitude(mr)
    rng = np.random.default_rng(1)
    centres = [tuple(int(rng.integers(0, s)) for s in mr.shape) for _ in range(25)]
    centres += [(0, 0, 0), (27, 29, 31), (radius, 15, 31)]  # clipped cubes too
    for c in centres:
        sl = _cube(c, radius, mr.shape)
        ref = L.lc2_patch_naive(us[sl], mr[sl], gradient_patch=g[sl])
        assert fast[c] == pytest.approx(ref, abs=1e-6)


def test_naive_with_margin_equals_naive_with_gradient() -> None:
    mr, us = _pair(2)
    c, r = (12, 14, 15), 5
    sl = _cube(c, r, mr.shape)
    margin = _cube(c, r + 1, mr.shape)
    a = L.lc2_patch_naive(us[sl], mr[margin])
    b = L.lc2_patch_naive(us[sl], mr[sl], gradient_patch=L.gradient_magnitude(mr)[sl])
    assert a == pytest.approx(b, abs=1e-12)


def test_points_and_grid_agree_and_multi_is_mean() -> None:
    mr, us = _pair(3)
    pts = np.array([[0, 0, 0], [4, 8, 12], [27, 29, 31], [13, 2, 30]])
    grid = L.local_lc2_multi(us, mr)
    at = L.local_lc2_multi(us, mr, points=pts)
    np.testing.assert_allclose(at, grid[tuple(pts.T)], atol=1e-9)
    mean = np.mean([L.local_lc2(us, mr, r) for r in (3, 5, 7)], axis=0)
    np.testing.assert_allclose(grid, mean, atol=1e-12)


def test_mask_matches_naive_on_selected_voxels() -> None:
    mr, us = _pair(4)
    zz = np.arange(mr.shape[0])[:, None, None]
    mask = np.broadcast_to(zz < 16, mr.shape) & (np.random.default_rng(0).random(mr.shape) > 0.2)
    fast = L.local_lc2(us, mr, 5, mask=mask)
    g = L.gradient_magnitude(mr)
    for c in [(10, 10, 10), (15, 20, 3), (20, 5, 5)]:
        sl = _cube(c, 5, mr.shape)
        ref = L.lc2_patch_naive(us[sl], mr[sl], gradient_patch=g[sl], mask_patch=mask[sl])
        assert fast[c] == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("role", ["source", "target"])
def test_against_all_matches_naive(role: str) -> None:
    mr, us = _pair(5, shape=(26, 27, 28))
    radii, rm = (3, 5, 7), 7
    c0 = (12, 13, 14)
    if role == "source":
        # The MR-role patch of `mr` slides over the US-role volume `us`.
        patch = mr[_cube(c0, rm + 1, mr.shape)]
        scores = L.lc2_against_all(patch, us, radii, "source")
    else:
        patch = us[_cube(c0, rm, us.shape)]
        scores = L.lc2_against_all(patch, mr, radii, "target")
    g = L.gradient_magnitude(mr)
    rng = np.random.default_rng(6)
    for _ in range(12):
        c = tuple(int(rng.integers(rm, s - rm)) for s in mr.shape)
        refs = []
        for r in radii:
            if role == "source":
                mr_patch = mr[_cube(c0, r + 1, mr.shape)]  # with its gradient margin
                refs.append(L.lc2_patch_naive(us[_cube(c, r, us.shape)], mr_patch))
            else:
                sl = _cube(c, r, mr.shape)
                us_patch = us[_cube(c0, r, us.shape)]
                refs.append(L.lc2_patch_naive(us_patch, mr[sl], gradient_patch=g[sl]))
        assert scores[c] == pytest.approx(np.mean(refs), abs=1e-6)
    # Border positions whose largest cube leaves the volume are not scored.
    assert np.isnan(scores[0, 0, 0]) and np.isnan(scores[-1, 13, 13])
    assert np.isfinite(scores[rm:-rm, rm:-rm, rm:-rm]).all()


def test_invariant_to_affine_intensity_change_and_sign_flip() -> None:
    mr, us = _pair(7)
    base = L.local_lc2_multi(us, mr)
    for a_mr, b_mr, a_us, b_us in [
        (-1.0, 0.0, 1.0, 0.0),
        (1.0, 0.0, -1.0, 3.0),
        (2.5, -4.0, 0.8, 1.0),
        (-1.7, 10.0, -3.0, -2.0),
    ]:
        other = L.local_lc2_multi(a_us * us + b_us, a_mr * mr + b_mr)
        # Exact for sign flips and shifts; scale changes move only the ridge term.
        np.testing.assert_allclose(other, base, atol=5e-3)


def test_self_similarity_is_one_where_textured() -> None:
    mr, _ = _pair(8)
    self_lc2 = L.local_lc2_multi(mr, mr)
    textured = L.local_std(mr, 3) > 0.3
    assert textured.mean() > 0.5
    assert self_lc2[textured].min() > 0.99


def test_flat_target_gives_zero() -> None:
    mr, _ = _pair(9)
    flat = np.full(mr.shape, 4.2)
    assert np.abs(L.local_lc2_multi(flat, mr)).max() < 1e-12
    assert L.global_lc2(flat, mr) == 0.0  # every cube is below min_std: all skipped
    # An almost flat target is damped by the variance floor, not amplified.
    rng = np.random.default_rng(0)
    weak = 1e-3 * mr + 1e-4 * rng.normal(size=mr.shape)
    assert L.local_lc2_multi(weak, mr).max() < 1e-3


def test_local_std_matches_numpy() -> None:
    mr, _ = _pair(10)
    s = L.local_std(mr, 2)
    for c in [(5, 5, 5), (0, 29, 31), (27, 0, 16)]:
        assert s[c] == pytest.approx(mr[_cube(c, 2, mr.shape)].std(), abs=1e-9)


def test_global_lc2_ranks_alignment() -> None:
    mr, us = _pair(11)
    aligned = L.global_lc2(us, mr)
    shifted = L.global_lc2(us, np.roll(mr, 4, axis=2))
    assert 0.0 <= 5.0 * shifted < aligned <= 1.0
    assert L.global_lc2(mr, mr) > 0.99


@pytest.mark.parametrize("role", ["source", "target"])
def test_against_points_matches_against_all(role: str) -> None:
    mr, us = _pair(12, shape=(30, 31, 29))
    c0, rm = (14, 15, 13), 7
    if role == "source":
        patch, volume = mr[_cube(c0, rm + 1, mr.shape)], us
    else:
        patch, volume = us[_cube(c0, rm, us.shape)], mr
    every = L.lc2_against_all(patch, volume, (3, 5, 7), role)
    rng = np.random.default_rng(13)
    centres = np.stack([rng.integers(rm, s - rm, 40) for s in volume.shape], axis=1)
    at = L.lc2_against_points(patch, volume, centres, (3, 5, 7), role)
    np.testing.assert_allclose(at, every[tuple(centres.T)], atol=1e-8)
    with pytest.raises(ValueError):
        L.lc2_against_points(patch, volume, np.array([[0, 10, 10]]), (3, 5, 7), role)
