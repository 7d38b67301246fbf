"""Dense displacement fields: Jacobian metrics and maps against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from disa.registration.transform.displacement import (
    jacobian_map,
    jacobian_metrics,
    jacobian_statistics,
    summarise_jacobian,
)
from disa.training import phantom as ph


def _oblique(size: tuple[int, int, int], spacing: tuple[float, float, float]):
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
        [[1.0, 0.0, 0.0], [0.0, np.cos(-0.3), -np.sin(-0.3)], [0.0, np.sin(-0.3), np.cos(-0.3)]])
    return ph.make_grid(size, spacing, direction=direction, center=(30.0, -20.0, 15.0))


def _reference(u: np.ndarray, grid, border: tuple[int, int, int]) -> np.ndarray:
    """det J from np.gradient with physical spacing and direction, ``border`` (z, y, x) cut."""
    g = np.stack([np.stack(np.gradient(u[..., i], axis=(2, 1, 0)), axis=-1)
                  for i in range(3)], axis=-2)  # d u_i / d index_k
    det = np.linalg.det(np.eye(3) + g @ np.linalg.inv(grid.direction * grid.spacing[None, :]))
    bz, by, bx = border
    return det[bz:det.shape[0] - bz, by:det.shape[1] - by, bx:det.shape[2] - bx]


@pytest.mark.parametrize(("slices", "border_z"), [(4, 1), (5, 2), (12, 2)])
def test_jacobian_metrics_match_np_gradient_on_thin_oblique_grids(slices: int,
                                                                  border_z: int) -> None:
    """A 4-slice fixed image (the pipeline accepts it) left no voxel 2 voxels from every
    edge: the metrics said det J = 1 (no folding, SDlogJ 0) whatever the field."""
    grid = _oblique((20, 18, slices), (2.2, 2.6, 3.5))
    rng = np.random.default_rng(3)
    u = ndimage.gaussian_filter(rng.normal(size=(*grid.shape, 3)), (1.0, 2.0, 2.0, 0)) * 20.0
    metrics = jacobian_metrics(grid.image_like(u.astype(np.float32), is_vector=True))
    det = _reference(u.astype(np.float32).astype(np.float64), grid, (border_z, 2, 2))
    assert det.std() > 0.01  # the field is far from a translation
    assert metrics["jacobian_min"] == pytest.approx(det.min(), rel=1e-4)
    assert metrics["jacobian_max"] == pytest.approx(det.max(), rel=1e-4)
    assert metrics["negative_jacobian_fraction"] == pytest.approx(np.mean(det <= 0))
    log = np.log(np.clip(det, 1e-9, None))
    assert metrics["sd_log_jacobian"] == pytest.approx(log.std(), rel=1e-3)


def test_jacobian_metrics_of_a_linear_map_on_four_slices() -> None:
    grid = _oblique((16, 16, 4), (2.0, 2.0, 4.0))
    points = ph.grid_points(grid)
    linear = np.array([[1.1, 0.05, 0.0], [0.0, 0.9, 0.1], [0.02, 0.0, 1.2]])
    u = (points @ linear.T - points).reshape(*grid.shape, 3)
    metrics = jacobian_metrics(grid.image_like(u.astype(np.float32), is_vector=True))
    assert metrics["jacobian_min"] == pytest.approx(np.linalg.det(linear), rel=1e-3)
    assert metrics["jacobian_max"] == pytest.approx(np.linalg.det(linear), rel=1e-3)


def test_jacobian_map_holds_the_metrics_determinants_with_a_nan_border() -> None:
    grid = _oblique((20, 18, 12), (2.2, 2.6, 3.5))
    rng = np.random.default_rng(4)
    u = ndimage.gaussian_filter(rng.normal(size=(*grid.shape, 3)), (1.0, 2.0, 2.0, 0)) * 20.0
    field = grid.image_like(u.astype(np.float32), is_vector=True)
    det = sitk.GetArrayFromImage(jacobian_map(field))
    assert det.shape == grid.shape and det.dtype == np.float32
    inner = det[2:-2, 2:-2, 2:-2]
    assert np.isfinite(inner).all() and np.isnan(det[:2]).all() and np.isnan(det[:, :, -2:]).all()
    metrics = jacobian_metrics(field)
    assert inner.min() == pytest.approx(metrics["jacobian_min"], rel=1e-5)
    assert inner.max() == pytest.approx(metrics["jacobian_max"], rel=1e-5)
    np.testing.assert_allclose(inner, _reference(u.astype(np.float32).astype(np.float64), grid,
                                                 (2, 2, 2)), rtol=1e-4)


def test_a_large_field_is_mapped_every_kth_voxel() -> None:
    """Over the voxel cap the map lies on a strided grid; a linear map's det J is exact."""
    grid = _oblique((30, 28, 26), (2.0, 2.0, 3.0))
    points = ph.grid_points(grid)
    linear = np.array([[1.2, 0.1, 0.0], [0.0, 0.8, 0.05], [0.03, 0.0, 1.1]])
    u = (points @ linear.T - points).reshape(*grid.shape, 3)
    field = grid.image_like(u.astype(np.float32), is_vector=True)
    det = jacobian_map(field, max_voxels=4000)  # 21840 voxels: every 2nd (15 x 14 x 13)
    assert det.GetSize() == (15, 14, 13)
    np.testing.assert_allclose(det.GetSpacing(), (4.0, 4.0, 6.0))
    np.testing.assert_allclose(det.GetOrigin(), field.GetOrigin())
    values = sitk.GetArrayViewFromImage(det)
    np.testing.assert_allclose(values[np.isfinite(values)], np.linalg.det(linear), rtol=1e-4)


def test_jacobian_statistics_count_the_foreground_only() -> None:
    grid = ph.make_grid((24, 24, 24), (2.0, 2.0, 2.0))
    points = ph.grid_points(grid)
    # det J = 1 + 0.5 x / 24 (mm): shrinking on the right, growing on the left.
    u = np.zeros_like(points)
    u[:, 0] = 0.25 * points[:, 0] ** 2 / 24.0
    field = grid.image_like(u.reshape(*grid.shape, 3).astype(np.float32), is_vector=True)
    # The foreground: the left half (x > 0), given on a coarser grid of its own.
    coarse = ph.make_grid((12, 12, 12), (4.0, 4.0, 4.0))
    left = (ph.grid_points(coarse)[:, 0] > 0).reshape(coarse.shape).astype(np.uint8)
    summary = summarise_jacobian(field, coarse.image_like(left))
    det = sitk.GetArrayFromImage(summary.determinant)
    inside = (sitk.GetArrayFromImage(summary.foreground) > 0) & np.isfinite(det)
    stats = summary.statistics
    assert stats["voxels"] == inside.sum() > 1000
    assert stats["jacobian_min"] == pytest.approx(det[inside].min())
    assert stats["jacobian_min"] > 1.0  # the shrinking half is not counted
    assert stats["jacobian_p1"] == pytest.approx(np.percentile(det[inside], 1), rel=1e-6)
    assert stats["jacobian_p99"] == pytest.approx(np.percentile(det[inside], 99), rel=1e-6)
    assert stats["negative_jacobian_fraction"] == 0.0 and stats["grid_step_mm"] == [2.0] * 3
    none = jacobian_statistics(summary.determinant, coarse.image_like(0 * left))
    assert none["voxels"] == 0 and none["jacobian_p99"] is None
