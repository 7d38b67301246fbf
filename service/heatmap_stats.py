"""What a heatmap says about the chosen point: its rank on the slice and the nearest peak.

The global maximum of a similarity map is the wrong question for a registration
check: many structures look alike (the other hemisphere, a neighbouring
vertebra), so on a good result the global peak can lie far from the point
while the point itself still scores near the top. The question a reader asks is
"is the point among the best matches here, and is there a better match right
next to it?", which these two figures answer:

- the point's percentile: the percentage of the slice's pixels (those with a
  value) whose value is at most the value at the point's pixel, and its rank
  (1 = the highest value);
- the nearest local peak: the closest pixel (in mm) that is a local maximum,
  i.e. the highest within a neighbourhood of one descriptor voxel (so the
  ripple of interpolation between descriptor voxels makes no peaks) and higher
  than somewhere in it (plateaus are no peaks). When the point is on a peak,
  the distance is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from disa.service.heatmap import Heatmap
from disa.service.viewer import PlaneGeometry


@dataclass(frozen=True)
class PointStanding:
    """The point's value, percentile (0-100) and rank on its slice; the nearest local peak."""

    value: float | None
    percentile: float | None
    rank: int | None
    count: int
    peak_column: int | None = None
    peak_row: int | None = None
    peak_point_mm: tuple[float, float, float] | None = None
    peak_value: float | None = None
    peak_distance_mm: float | None = None


def point_pixel(heatmap: Heatmap) -> tuple[int, int]:
    """(column, row) of the pixel nearest the point, clipped to the slice."""
    height, width = heatmap.values.shape
    column = int(np.clip(np.rint(heatmap.point_pixel[0]), 0, width - 1))
    row = int(np.clip(np.rint(heatmap.point_pixel[1]), 0, height - 1))
    return column, row


def local_peaks(values: np.ndarray, radius_px: tuple[int, int]) -> np.ndarray:
    """(row, column) of the local maxima of `values` (NaN: no value) within +-radius_px
    (rows, columns); plateaus (max == min over the neighbourhood) excluded."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.empty((0, 2), dtype=np.int64)
    low = float(values[finite].min()) - 1.0
    filled = np.where(finite, values, low)
    size = (2 * radius_px[0] + 1, 2 * radius_px[1] + 1)
    highest = ndimage.maximum_filter(filled, size=size, mode="nearest")
    lowest = ndimage.minimum_filter(filled, size=size, mode="nearest")
    return np.argwhere(finite & (filled >= highest) & (highest > lowest))


def standing(heatmap: Heatmap, plane: PlaneGeometry) -> PointStanding:
    """The point's percentile and rank on the heatmap's slice and its nearest local peak."""
    values = heatmap.values
    finite = np.isfinite(values)
    count = int(finite.sum())
    column, row = point_pixel(heatmap)
    value = float(values[row, column])
    if not np.isfinite(value):
        return PointStanding(value=None, percentile=None, rank=None, count=count)
    valid = values[finite]
    percentile = 100.0 * float(np.count_nonzero(valid <= value)) / count
    rank = 1 + int(np.count_nonzero(valid > value))
    spacing = np.asarray(plane.pixel_spacing_mm, dtype=np.float64)  # (column, row)
    radius = np.maximum(1, np.ceil(heatmap.descriptor_spacing_mm / spacing - 1e-9)).astype(int)
    peaks = local_peaks(values, (int(radius[1]), int(radius[0])))
    if len(peaks) == 0:
        return PointStanding(value=value, percentile=percentile, rank=rank, count=count)
    here = plane.pixel_to_physical @ np.array([column, row, heatmap.slice, 1.0])
    pixels = np.column_stack([peaks[:, 1], peaks[:, 0], np.full(len(peaks), heatmap.slice),
                              np.ones(len(peaks))]).astype(np.float64)
    where = (pixels @ plane.pixel_to_physical.T)[:, :3]
    distances = np.linalg.norm(where - here[:3], axis=1)
    best = int(np.argmin(distances))
    peak_row, peak_column = (int(v) for v in peaks[best])
    return PointStanding(
        value=value, percentile=percentile, rank=rank, count=count,
        peak_column=peak_column, peak_row=peak_row,
        peak_point_mm=tuple(float(v) for v in where[best]),  # type: ignore[arg-type]
        peak_value=float(values[peak_row, peak_column]),
        peak_distance_mm=float(distances[best]))
