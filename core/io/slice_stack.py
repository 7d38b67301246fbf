"""Slice stacks that are no regular grid as stored: gantry tilt and variable slice spacing.

A DICOM series is a stack of 2D slices, each with its own ImagePositionPatient
(LPS mm, the centre of its first pixel) and one shared ImageOrientationPatient
(row direction r, column direction c; normal n = r x c). A regular image grid
needs every slice k at P_0 + k * dz * n. Two departures from that are common
in clinical data and are corrected here rather than refused:

- **Gantry tilt.** CT acquired with a tilted gantry (typical for head CT)
  has slice planes perpendicular to n but steps the table along the patient
  axis, so the slice positions drift sideways in the slice plane by
  tan(tilt) mm per mm along n. As stored, the voxels form a sheared grid.
- **Variable slice spacing.** Steps along n that change within the series
  (a finer section through the skull base, a spacing changed in stages).

Both are corrected by resampling onto the orthogonal grid with axes (r, c, n)
that covers every slice. Its planes lie at positions along n chosen on the
slices' own positions, so the correction of a pure tilt is an exact shear: each
output plane *is* a stored slice, shifted in its own plane (bilinear
interpolation of that slice alone, never mixing two slices). With variable
spacing, output planes between two stored slices are interpolated linearly
along n from the two, each sampled at the same (r, c) position.
docs/DICOM.md ("Gantry tilt and variable slice spacing") gives the measurements
that chose resampling over carrying the sheared geometry as an affine.

What cannot be corrected is refused: a gap of missing slices (a step more than
`GAP_FACTOR` times the steps around it), sideways drift that is not a straight
line (not a tilt), and a tilt above `MAX_TILT_DEG`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from disa.core.errors import InputError

__all__ = [
    "GAP_FACTOR",
    "MAX_TILT_DEG",
    "StackGrid",
    "describe_correction",
    "plan_stack_grid",
]

#: A step more than this many times the median of the (up to) two steps on each side
#: is a gap: missing slices, which no interpolation can fill with the anatomy that was
#: there. A spacing changed in stages (1 mm, then 2 mm) stays below it at the change.
GAP_FACTOR = 1.5
#: Larger tilts are not a gantry (scanners tilt by at most about 30 degrees).
MAX_TILT_DEG = 45.0
#: Slices may lie this far (fraction of the mean step, at least `GRID_MIN_MM`) from the
#: regular grid and still count as regular (no resampling): scanners store positions as
#: decimal strings of about six digits.
GRID_REL_TOL = 0.1
GRID_MIN_MM = 0.2
#: Sideways drift, in pixels, below which a stack counts as untilted, and the largest
#: departure of the drift from a straight line (a tilt drifts linearly).
DRIFT_PIXELS = 0.25
#: Two slices closer than this along the normal are one position (duplicates).
DUPLICATE_MM = 0.01


@dataclass(frozen=True)
class StackGrid:
    """The regular grid of a slice stack (ITK order, LPS mm) and, when the stack as
    stored is not regular, how to resample it onto that grid.

    `size`, `spacing`, `origin` and `direction` describe the image the reader
    returns. `positions` (slices in ascending order along n, LPS mm) and
    `stored_size` (columns, rows, slices) are set only when resampling is needed;
    `correction` is then the record for result.json (see `StackGrid.record`).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    positions: np.ndarray | None = None
    stored_size: tuple[int, int, int] | None = None
    correction: dict[str, Any] | None = None

    @property
    def resampled(self) -> bool:
        return self.positions is not None

    def resample(self, stack: np.ndarray, background: float | None = None) -> np.ndarray:
        """Resample `stack` (numpy z, y, x: slices in ascending order along n, as
        stored) onto this grid; returns a float32 array (z, y, x) of `size`.

        Output voxels outside every stored slice (the wedges a tilt uncovers)
        take `background`, by default the stack's minimum (air, for CT).
        """
        if self.positions is None:
            return stack
        if stack.shape != self.stored_size[::-1]:
            raise ValueError(f"stack shape {stack.shape} is not {self.stored_size[::-1]}")
        fill = float(np.min(stack)) if background is None else float(background)
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        r, c, n = d[:, 0], d[:, 1], d[:, 2]
        sx, sy, sz = self.spacing
        origin = np.asarray(self.origin, dtype=np.float64)
        along = (self.positions - origin) @ n
        # Where the output grid's first pixel sits in each stored slice, in its pixels.
        offset_x = (origin - self.positions) @ r / sx
        offset_y = (origin - self.positions) @ c / sy
        out_x, out_y, out_z = self.size
        out = np.empty((out_z, out_y, out_x), dtype=np.float32)
        cache: dict[int, np.ndarray] = {}

        def shifted(j: int) -> np.ndarray:
            if j not in cache:
                if len(cache) > 2:  # output planes move forward: older slices are done
                    cache.clear()
                cache[j] = ndimage.affine_transform(
                    stack[j].astype(np.float32, copy=False), np.eye(2),
                    offset=(offset_y[j], offset_x[j]), output_shape=(out_y, out_x),
                    order=1, mode="constant", cval=fill)
            return cache[j]

        for k in range(out_z):
            a = k * sz
            j = int(np.clip(np.searchsorted(along, a, side="right") - 1, 0, len(along) - 2))
            t = (a - along[j]) / (along[j + 1] - along[j])
            if t <= 1e-6:
                out[k] = shifted(j)
            elif t >= 1.0 - 1e-6:
                out[k] = shifted(j + 1)
            else:
                out[k] = (1.0 - t) * shifted(j) + t * shifted(j + 1)
        return out


def plan_stack_grid(
    name: str,
    label: str,
    row: np.ndarray,
    col: np.ndarray,
    positions: np.ndarray,
    pixel_spacing: tuple[float, float],
    matrix: tuple[int, int],
) -> tuple[list[int], StackGrid]:
    """Slice order and the regular grid of a stack of parallel slices.

    `row`, `col`: the unit direction cosines of ImageOrientationPatient (LPS);
    `positions`: (slices, 3) ImagePositionPatient in mm, in stored order;
    `pixel_spacing`: (x, y) in mm, i.e. between columns, then between rows;
    `matrix`: (columns, rows). Slices are ordered by their position along the
    normal n = row x col, so the direction [r c n] is a proper rotation.

    Returns the order and a `StackGrid`: as stored when the slices are regular
    (within max(0.1 x step, 0.2 mm) of P_0 + k * step * n, sideways drift under
    a quarter pixel); else the orthogonal grid that covers them, with the
    resampling plan. Raises InputError naming what cannot be corrected.
    """
    normal = np.cross(row, col)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    ordered = along[order]
    count = len(order)
    sx, sy = float(pixel_spacing[0]), float(pixel_spacing[1])
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    columns, rows = matrix
    if count == 1:
        origin = tuple(float(v) for v in positions[0])
        return order, StackGrid((columns, rows, 1), (sx, sy, 1.0), origin, direction)
    steps = _slice_steps(name, label, ordered)
    stacked = positions[order]
    relative = stacked - stacked[0]
    # What is left of each slice's offset from the first once its step along n is
    # taken out: zero for a regular stack, a straight line for a gantry tilt.
    lateral = relative - np.outer(ordered - ordered[0], normal)
    drift = float(np.linalg.norm(lateral, axis=1).max())
    tolerance_px = DRIFT_PIXELS * min(sx, sy)
    tilted = drift > tolerance_px
    shear = np.zeros(3)
    if tilted:
        shear = _tilt_shear(name, label, ordered - ordered[0], lateral, tolerance_px)
    dz = float(ordered[-1] - ordered[0]) / (count - 1)
    deviation = ordered - (ordered[0] + dz * np.arange(count))
    variable = float(np.abs(deviation).max()) > max(GRID_REL_TOL * dz, GRID_MIN_MM)
    if not tilted and not variable:
        origin = tuple(float(v) for v in stacked[0])
        return order, StackGrid((columns, rows, count), (sx, sy, dz), origin, direction)
    planes, dz = _output_planes(ordered, steps) if variable else (count, dz)
    out_x, out_y, origin_vec = _in_plane_cover(stacked[0], relative, row, col, (sx, sy),
                                               matrix)
    grid = StackGrid(
        size=(out_x, out_y, planes),
        spacing=(sx, sy, dz),
        origin=tuple(float(v) for v in origin_vec),
        direction=direction,
        positions=stacked,
        stored_size=(columns, rows, count),
        correction=_correction_record(tilted, variable, shear, steps, (columns, rows, count)),
    )
    return order, grid


def _slice_steps(name: str, label: str, ordered: np.ndarray) -> np.ndarray:
    """The steps (mm) between consecutive slices along the normal, `ordered` being the
    slices' positions along it (mm, ascending). Refuses what no resampling can fix:
    all slices at one position, duplicate slices, and gaps (`_check_gaps`)."""
    count = len(ordered)
    if float(ordered[-1] - ordered[0]) < 1e-6:
        raise InputError(f"{name}: the {count} slices of {label} share one position")
    steps = np.diff(ordered)
    if float(steps.min()) < DUPLICATE_MM:
        k = int(steps.argmin())
        raise InputError(
            f"{name}: two slices of {label} share the position {ordered[k]:.2f} mm along "
            "the slice normal (duplicate slices, or several volumes in one series)"
        )
    _check_gaps(name, label, steps)
    return steps


def _output_planes(ordered: np.ndarray, steps: np.ndarray) -> tuple[int, float]:
    """Number of output planes and their step (mm along the normal) for a variably
    spaced stack whose slices lie at `ordered` (mm along the normal, ascending)."""
    # The median step keeps the resolution of most of the series; the first and the
    # last plane are stored slices.
    median = float(np.median(steps))
    planes = max(2, round(float(ordered[-1] - ordered[0]) / median) + 1)
    return planes, float(ordered[-1] - ordered[0]) / (planes - 1)


def _in_plane_cover(first: np.ndarray, relative: np.ndarray, row: np.ndarray, col: np.ndarray,
                    pixel_spacing: tuple[float, float], matrix: tuple[int, int]
                    ) -> tuple[int, int, np.ndarray]:
    """Columns and rows of the orthogonal grid that covers every slice, and its origin.

    `first`: the first slice's position (LPS mm); `relative`: every slice's position
    minus it (slices, 3), LPS mm; `row`, `col`: unit in-plane directions (LPS);
    `pixel_spacing` (x, y) mm; `matrix` (columns, rows) of a stored slice. The origin
    (LPS mm) is the corner of the cover at the first slice's position along n.
    """
    sx, sy = pixel_spacing
    columns, rows = matrix
    # In-plane extent of every slice in (r, c) coordinates about the first slice's origin.
    offset_r = relative @ row
    offset_c = relative @ col
    low_r, low_c = float(offset_r.min()), float(offset_c.min())
    # The 1e-6 pixel slack keeps rounding noise on an extent of a whole number of
    # pixels from adding a column or row.
    out_x = math.ceil((float(offset_r.max()) - low_r) / sx - 1e-6) + columns
    out_y = math.ceil((float(offset_c.max()) - low_c) / sy - 1e-6) + rows
    return out_x, out_y, first + low_r * row + low_c * col


def _correction_record(tilted: bool, variable: bool, shear: np.ndarray, steps: np.ndarray,
                       stored_size: tuple[int, int, int]) -> dict[str, Any]:
    """The correction as result.json reports it: what was corrected, the tilt (degrees)
    and shear (mm of in-plane drift per mm along the normal, LPS), the smallest and
    largest slice step (mm), and the stored size (columns, rows, slices)."""
    tilt_deg = math.degrees(math.atan(float(np.linalg.norm(shear))))
    return {
        "corrected": [w for w, on in (("gantry tilt", tilted), ("variable slice spacing",
                                                                  variable)) if on],
        "gantry_tilt_deg": round(tilt_deg, 3),
        "shear_mm_per_mm": [round(float(v), 6) for v in shear],
        "slice_steps_mm": [round(float(steps.min()), 4), round(float(steps.max()), 4)],
        "stored_size": list(stored_size),
        "method": ("resampled onto the orthogonal grid (row, column, normal): each slice "
                   "shifted in its own plane (bilinear)"
                   + ("; planes between slices linear along the normal" if variable else "")),
    }


def describe_correction(correction: dict[str, Any]) -> str:
    """One short line (at most 64 characters, a DICOM LO) naming a correction."""
    parts = []
    if "gantry tilt" in correction.get("corrected", []):
        parts.append(f"gantry tilt {correction.get('gantry_tilt_deg', 0.0):.1f} deg")
    if "variable slice spacing" in correction.get("corrected", []):
        low, high = correction.get("slice_steps_mm", [0.0, 0.0])
        parts.append(f"slice steps {low:.3g}-{high:.3g} mm")
    return (" and ".join(parts) + " resampled")[:64] if parts else ""


def _check_gaps(name: str, label: str, steps: np.ndarray) -> None:
    """Refuse a step more than GAP_FACTOR times the median of the steps around it."""
    count = len(steps)
    if count < 2:
        return
    for k in range(count):
        around = np.concatenate([steps[max(0, k - 2):k], steps[k + 1:k + 3]])
        local = float(np.median(around))
        if float(steps[k]) > GAP_FACTOR * local:
            raise InputError(
                f"{name}: slices of {label} are not evenly spaced: {steps[k]:.3g} mm between "
                f"slices {k + 1} and {k + 2}, {local:.3g} mm elsewhere (missing slices?); a "
                f"step over {GAP_FACTOR:g} x the steps around it is a gap that resampling "
                "cannot fill"
            )


def _tilt_shear(name: str, label: str, along: np.ndarray, lateral: np.ndarray,
                tolerance_mm: float) -> np.ndarray:
    """The in-plane drift per mm along the normal (LPS vector) of a tilted stack.

    A gantry tilt drifts the slices along a straight line: lateral_k = along_k * s.
    A drift that leaves that line by more than `tolerance_mm` is refused.
    """
    shear = (along @ lateral) / float(along @ along)
    residual = float(np.linalg.norm(lateral - np.outer(along, shear), axis=1).max())
    drift = float(np.linalg.norm(lateral, axis=1).max())
    if residual > tolerance_mm:
        raise InputError(
            f"{name}: slice positions of {label} drift sideways by {drift:.2g} mm, "
            f"{residual:.2g} mm off a straight line (at most {tolerance_mm:.2g} mm allowed): "
            "not a gantry tilt, so the slices cannot be put on a grid"
        )
    tilt = math.degrees(math.atan(float(np.linalg.norm(shear))))
    if tilt > MAX_TILT_DEG:
        raise InputError(
            f"{name}: slice positions of {label} drift sideways by {drift:.2g} mm, a tilt of "
            f"{tilt:.0f} deg (at most {MAX_TILT_DEG:.0f} deg corrected); not a gantry tilt"
        )
    return shear
