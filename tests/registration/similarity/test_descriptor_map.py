"""DescriptorMap: smoothing for the final refinement; pooled weights."""

from __future__ import annotations

import numpy as np

from disa.core.grid import Grid
from disa.registration.similarity.descriptor_map import DescriptorMap, pool_weights


def _map(int8: bool) -> DescriptorMap:
    rng = np.random.default_rng(3)
    data = rng.uniform(0.0, 1.0, size=(12, 10, 9, 4)).astype(np.float32)
    valid = np.ones((12, 10, 9), np.float32)
    valid[:, :, :2] = 0.0
    grid = Grid((12, 10, 9), np.zeros(3), np.full(3, 2.0), np.eye(3))
    out = DescriptorMap(data, grid, valid=valid)
    return out.quantised() if int8 else out


def test_smoothing_keeps_grid_validity_and_codes_and_lowers_voxel_noise() -> None:
    for int8 in (False, True):
        raw = _map(int8)
        smooth = raw.smoothed(1.0)
        assert smooth.grid is raw.grid and smooth.valid is raw.valid
        assert smooth.is_int8 == int8
        before, after = raw.as_float(), smooth.as_float()
        # Each channel's mean stays (mode "nearest" keeps the level), its noise drops.
        assert np.allclose(before.mean((0, 1, 2)), after.mean((0, 1, 2)), atol=0.02)
        assert after.std() < 0.5 * before.std()
        # Neighbouring voxels now agree: trilinear interpolation between them blurs little.
        assert np.abs(np.diff(after, axis=0)).mean() < 0.3 * np.abs(np.diff(before, axis=0)).mean()


def test_zero_sigma_is_the_map_itself() -> None:
    raw = _map(False)
    assert raw.smoothed(0.0) is raw


def test_pooled_weights_are_each_cells_maximum_on_odd_shapes() -> None:
    """pool_weights: each node of the 2x pooled grid holds the maximum of its 2x2x2 cell;
    the last cell of an odd axis has one plane of data (the rest padded with 0)."""
    rng = np.random.default_rng(3)
    weights = rng.random((7, 6, 9)).astype(np.float32)
    shape = (4, 3, 5)
    pooled = pool_weights(weights, shape)
    assert pooled.shape == shape and pooled.dtype == np.float32
    assert pooled.flags.c_contiguous
    for z, y, x in np.ndindex(shape):
        cell = weights[2 * z: 2 * z + 2, 2 * y: 2 * y + 2, 2 * x: 2 * x + 2]
        assert pooled[z, y, x] == cell.max()


def test_open_faces_travel_with_the_map_and_pooling_reads_the_face_beyond_them() -> None:
    """Every derived map keeps its open faces; pooled with one, a border node is the
    [1, 2, 1] filter of the face carried on (the edge value), not a quarter short."""
    faces = (True, False, False, False, False, True)
    raw = DescriptorMap(np.ones((12, 10, 9, 4), np.float32),
                        Grid((12, 10, 9), np.zeros(3), np.full(3, 2.0), np.eye(3)),
                        open_faces=faces)
    for derived in (raw.quantised(), raw.pooled(), raw.smoothed(1.0), raw.grid_only(),
                    raw.with_validity(np.ones((12, 10, 9))), raw.masked(np.ones((12, 10, 9)))):
        assert derived.open_faces == faces
    np.testing.assert_allclose(raw.pooled().as_float(), 1.0, rtol=1e-6)
    closed = DescriptorMap(raw.data, raw.grid)
    assert closed.faces.tolist() == [0] * 6 and raw.faces.tolist() == [1, 0, 0, 0, 0, 1]
    assert closed.pooled().as_float()[0, 0, 0, 0] < 0.6  # zeros beyond its ends
