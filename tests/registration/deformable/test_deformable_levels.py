"""Deformable stage, coarse-to-fine: the field carried onto a finer control grid, and the
fine level's Adam recovering detail that the first level's 8 mm grid cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from disa.core.grid import Grid
from disa.registration.deformable.stage import DeformableSettings, deformable_stage, upsample_field
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.training import phantom as ph


def _trilinear(v: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """v (Z, Y, X, 3) on ``grid`` at physical points (N, 3), trilinear."""
    at = grid.to_index(points)[:, ::-1].T
    return np.stack([ndimage.map_coordinates(v[..., k], at, order=1) for k in range(3)], 1)


def test_upsampled_field_is_the_same_mapping() -> None:
    """Refined 2x on the same origin (and a padded, larger target), the field agrees with
    the coarse one everywhere inside the coarse grid: the level change moves nothing."""
    direction = np.asarray(ph.rigid_truth((10.0, -5.0, 20.0), (0.0, 0.0, 0.0)).GetMatrix())
    coarse = Grid((6, 7, 8), np.array([-20.0, -30.0, 5.0]), np.array([8.0, 8.0, 8.0]),
                  direction.reshape(3, 3))
    v = np.random.default_rng(3).normal(size=(*coarse.shape, 3)) * 2.0
    # Refined 2x with one fine node of padding on every side (as covering_grid pads).
    fine = Grid(tuple(2 * (n - 1) + 3 for n in coarse.shape),
                coarse.to_physical(np.full((1, 3), -0.5))[0], coarse.spacing / 2.0,
                coarse.direction)
    up = upsample_field(v, coarse, fine)
    rng = np.random.default_rng(4)
    index = rng.uniform(0.0, 1.0, (500, 3)) * (np.array(coarse.size_xyz) - 1)
    points = coarse.to_physical(index)
    np.testing.assert_allclose(_trilinear(up, fine, points), _trilinear(v, coarse, points),
                               atol=1e-9)
    # Nodes of the fine grid that are coarse nodes keep their values exactly.
    np.testing.assert_allclose(up[1:-1:2, 1:-1:2, 1:-1:2], v, atol=1e-12)


def _content(points: np.ndarray) -> np.ndarray:
    """12 channels of sinusoids (wavelengths 10-20 mm) of physical points (N, 3)."""
    rng = np.random.default_rng(11)
    k = rng.normal(size=(12, 3))
    k *= (2 * np.pi / rng.uniform(10.0, 20.0, 12) / np.linalg.norm(k, axis=1))[:, None]
    phase = rng.uniform(0, 2 * np.pi, 12)
    return 0.25 * np.cos(points @ k.T + phase)


def _wave(points: np.ndarray) -> np.ndarray:
    """w(y) (N, 3) mm: 2.5 mm along x, varying with z over a 32 mm period."""
    out = np.zeros_like(points)
    out[:, 0] = 2.5 * np.sin(2 * np.pi * points[:, 2] / 32.0)
    return out


@pytest.fixture(scope="module")
def wave_pair():
    """MIND-like maps at 2 mm (48^3 voxels): moving(y) = fixed content at y - w(y), so the
    true field v solves v(x) = w(x + v(x)) (T(x) = x + v(x), identity linear part)."""
    image = ph.make_grid((48, 48, 48), (2.0, 2.0, 2.0)).reference_image()
    grid = Grid.from_image(image)
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    points = grid.to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(float))
    fixed = DescriptorMap(np.ascontiguousarray(
        _content(points).reshape(*grid.shape, 12), np.float32), grid)
    moving = DescriptorMap(np.ascontiguousarray(
        _content(points - _wave(points)).reshape(*grid.shape, 12), np.float32), grid)
    weights = np.zeros(grid.shape, dtype=np.float32)
    weights[6:-6, 6:-6, 6:-6] = 1.0
    return image, grid, fixed, moving, weights


def _field_error(stage, grid: Grid) -> float:
    """Mean |v_est - v_true| (mm) over the working voxels of the inner region."""
    z, y, x = np.meshgrid(*(np.arange(12, n - 12) for n in grid.shape), indexing="ij")
    points = grid.to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(float))
    truth = np.zeros_like(points)
    for _ in range(30):  # fixed point of v = w(x + v): a contraction (|w'| < 0.5)
        truth = _wave(points + truth)
    return float(np.mean(np.linalg.norm(_trilinear(stage.field, stage.grid, points) - truth,
                                        axis=1)))


def test_fine_level_recovers_what_the_coarse_grid_cannot(wave_pair) -> None:
    """A 32 mm-period wave: the 8 mm control grid (4 nodes a period) leaves an error that a
    fine level at stride 2 (4 mm) cuts by 40 % or more, without folding (measured: 0.40 ->
    0.16 mm, mean |v| 1.6 mm); with the fine level off the output is the coarse level's.
    The diffusion weight is 0.03: the sinusoids' SSD is so shallow that at 1 the
    regulariser shrinks the wave to a third at either level (corr(v, truth) 0.99)."""
    image, grid, fixed, moving, weights = wave_pair
    linear = np.hstack([np.eye(3), np.zeros((3, 1))])
    errors, stages = {}, {}
    for fine_stride in (0, 2):
        stage = deformable_stage(fixed, moving, weights, linear, "ssd", image, 2.0,
                                 DeformableSettings(fine_stride=fine_stride,
                                                    regularisation=0.03))
        errors[fine_stride], stages[fine_stride] = _field_error(stage, grid), stage
    assert stages[0].grid.spacing[0] == pytest.approx(8.0)
    assert stages[2].grid.spacing[0] == pytest.approx(4.0)
    assert "deformable_fine" in stages[2].timings and "deformable_fine" not in stages[0].timings
    assert errors[2] < 0.6 * errors[0]
    assert stages[2].min_corner_jacobian > 0


def test_fine_level_is_skipped_where_the_map_is_no_finer() -> None:
    """DISA's layout (maps at stride 4): no finer nodes to read, the stage stays on its grid."""
    image = ph.make_grid((32, 32, 32), (2.0, 2.0, 2.0)).reference_image()
    grid = Grid.from_image(image).strided(4)
    rng = np.random.default_rng(2)
    data = ndimage.gaussian_filter(rng.normal(size=(*grid.shape, 16)), (1, 1, 1, 0))
    fixed = DescriptorMap(np.ascontiguousarray(data, np.float32), grid)
    weights = np.ones(grid.shape, dtype=np.float32)
    linear = np.hstack([np.eye(3), np.zeros((3, 1))])
    stage = deformable_stage(fixed, fixed, weights, linear, "dot", image, 2.0,
                             DeformableSettings(fine_stride=2))
    assert stage.grid.spacing[0] == pytest.approx(8.0)
    assert "deformable_fine" not in stage.timings
