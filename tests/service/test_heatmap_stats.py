"""The heatmap's answer: the point's percentile and rank, and the nearest local peak."""

from __future__ import annotations

import numpy as np
import pytest

from disa.core.grid import Grid
from disa.service.heatmap import Heatmap
from disa.service.heatmap_stats import local_peaks, standing
from disa.service.viewer import plane_geometry


def _bump(shape: tuple[int, int], centre: tuple[float, float], height: float,
          width: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return height * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * width**2))


def _heatmap(values: np.ndarray, point_pixel: tuple[float, float]) -> tuple[Heatmap, object]:
    grid = Grid(shape=(5, values.shape[0], values.shape[1]), origin=np.zeros(3),
                spacing=np.array([2.0, 2.0, 3.0]), direction=np.eye(3))
    plane = plane_geometry(grid, "axial")
    assert (plane.height, plane.width) == values.shape
    heat = Heatmap(similarity="mind", kind="neg_ssd", plane="axial", slice=2,
                   point_mm=np.zeros(3), point_pixel=np.array(point_pixel, dtype=float),
                   moving_point_mm=np.zeros(3), values=values.astype(np.float32),
                   descriptor_spacing_mm=4.0)
    return heat, plane


def test_the_point_near_a_local_peak_ranks_high_though_the_global_peak_is_far() -> None:
    """A good result on a map whose global maximum is a look-alike 40 px away."""
    values = _bump((30, 50), (10, 10), 1.0, 3.0) + _bump((30, 50), (12, 45), 1.3, 3.0)
    values[0, 0] = np.nan
    heat, plane = _heatmap(values, (11.0, 10.0))  # column 11, row 10: one pixel off the bump
    s = standing(heat, plane)
    assert s.peak_column == 10 and s.peak_row == 10
    assert s.peak_distance_mm == pytest.approx(2.0)  # one 2 mm pixel
    assert s.percentile is not None and s.percentile > 97.0
    assert s.rank is not None and 1 < s.rank < 40
    assert s.count == values.size - 1
    on_peak = standing(_heatmap(values, (10.0, 10.0))[0], plane)
    assert on_peak.peak_distance_mm == 0.0


def test_the_global_maximum_is_rank_one_and_plateaus_are_no_peaks() -> None:
    values = _bump((20, 20), (5, 5), 2.0, 2.0)
    heat, plane = _heatmap(values, (5.0, 5.0))
    s = standing(heat, plane)
    assert s.rank == 1 and s.percentile == 100.0
    flat = np.ones((20, 20))
    assert len(local_peaks(flat, (1, 1))) == 0
    none = np.full((20, 20), np.nan)
    s = standing(_heatmap(none, (3.0, 3.0))[0], plane)
    assert s.value is None and s.percentile is None and s.peak_distance_mm is None
