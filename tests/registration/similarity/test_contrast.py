"""The compiled local standard deviation gives scipy's numbers (core.preprocess.local_std)."""

from __future__ import annotations

import numpy as np
import pytest

from disa.core.preprocess import local_std as scipy_local_std
from disa.registration.similarity.contrast import local_std


@pytest.mark.parametrize("shape", [(17, 23, 29), (1, 5, 40), (3, 2, 1), (40, 36, 45)])
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_matches_scipy(shape: tuple[int, int, int], radius: int, dtype: type) -> None:
    rng = np.random.default_rng(radius)
    volume = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    got = local_std(volume, radius)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, scipy_local_std(volume, radius), rtol=1e-5, atol=1e-6)


def test_constant_and_step() -> None:
    flat = np.full((6, 7, 8), 4.0, np.float32)
    np.testing.assert_array_equal(local_std(flat, 1), 0.0)
    step = np.zeros((6, 7, 8), np.float32)
    step[:, :, 4:] = 2.0
    std = local_std(step, 1)
    assert np.all(std[:, :, :3] == 0) and np.all(std[:, :, 6:] == 0)
    # At the step 9 of 27 voxels hold 2 (x = 4) or 18 of 27 (x = 3)... in either case
    # the standard deviation of a two-valued cube, sqrt(p (1 - p)) x 2.
    np.testing.assert_allclose(std[3, 3, 3], 2 * np.sqrt(1 / 3 * 2 / 3), rtol=1e-6)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3D"):
        local_std(np.zeros((4, 4)), 1)
    with pytest.raises(ValueError, match="radius"):
        local_std(np.zeros((4, 4, 4)), -1)
