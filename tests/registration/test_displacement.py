"""Dense displacement fields: Jacobian metrics against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from disa.registration import phantom as ph
from disa.registration.displacement import jacobian_metrics


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
