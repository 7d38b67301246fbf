"""LC2 of arbitrary patch pairs (the cross-pair training targets)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from disa.registration.similarity import lc2
from disa.training.pair_lc2 import pair_lc2

RADII = (3, 5, 7)


def _pair(seed: int, shape: tuple[int, int, int] = (36, 36, 36)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    a = a / a.std()
    # Noise that grows along x: LC2 spans most of [0, 1] over the volume.
    strength = np.linspace(0.0, 2.0, shape[2])[None, None, :]
    b = np.cos(1.5 * a) + a + strength * rng.normal(size=shape)
    return a.astype(np.float32), b.astype(np.float32)


def test_equal_centres_reproduce_the_box_filter_lc2_for_both_roles() -> None:
    fixed, moving = _pair(0)
    pts = np.argwhere(np.ones((4, 4, 4))) * 5 + 9
    values = pair_lc2(fixed, moving, pts, pts, RADII)
    assert values.shape == (len(pts), 2)
    # Column 0: fixed in the MR role (source), moving explained (target).
    np.testing.assert_allclose(
        values[:, 0], lc2.local_lc2_multi(moving, fixed, RADII, points=pts), atol=1e-9
    )
    np.testing.assert_allclose(
        values[:, 1], lc2.local_lc2_multi(fixed, moving, RADII, points=pts), atol=1e-9
    )
    assert values.std() > 0.05  # the check is not between constants


def test_distant_centres_match_the_naive_least_squares() -> None:
    fixed, moving = _pair(1)
    rng = np.random.default_rng(2)
    fp = rng.integers(8, 28, size=(12, 3))
    mp = rng.integers(8, 28, size=(12, 3))
    values = pair_lc2(fixed, moving, fp, mp, RADII)
    for k in range(len(fp)):
        for role, (mr, c_mr, us, c_us) in enumerate(
            ((fixed, fp[k], moving, mp[k]), (moving, mp[k], fixed, fp[k]))
        ):
            ref = np.mean(
                [
                    lc2.lc2_patch_naive(
                        us[tuple(slice(x - r, x + r + 1) for x in c_us)],
                        mr[tuple(slice(x - r - 1, x + r + 2) for x in c_mr)],
                    )
                    for r in RADII
                ]
            )
            assert values[k, role] == pytest.approx(ref, abs=1e-6)


def test_centres_whose_cube_leaves_the_array_are_refused() -> None:
    fixed, moving = _pair(3, (20, 20, 20))
    ok = np.array([[10, 10, 10]])
    with pytest.raises(ValueError, match="moving centre"):
        pair_lc2(fixed, moving, ok, np.array([[10, 10, 13]]), RADII)
    with pytest.raises(ValueError, match="fixed centre"):
        pair_lc2(fixed, moving, np.array([[6, 10, 10]]), ok, RADII)
    with pytest.raises(ValueError, match="pair up"):
        pair_lc2(fixed, moving, ok, np.zeros((2, 3), int), RADII)
