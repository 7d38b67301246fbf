"""Dense descriptor maps on physical grids (DISA network output or MIND-SSC).

A map holds one C-vector per voxel of its grid, channels last, as float32 or as
symmetric int8 codes (value = code x scale), and a validity in [0, 1] per voxel:
1 where the image has data (inside its field of view, ultrasound sector and
mask), 0 elsewhere. The registration objective reads fixed descriptors at sample
points and trilinearly interpolates moving ones and their validity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from disa.model.codes import INT8_SCALE, encode_int8
from disa.registration.grid import Grid


@dataclass(frozen=True)
class DescriptorMap:
    """Descriptors (Z, Y, X, C) on ``grid``; physical value = data * scale.

    ``valid`` (Z, Y, X) float32 in [0, 1], None meaning valid everywhere: where the
    image has data. Points of the other image that land where it is 0 count neither
    for nor against a pose (the overlap-normalised objective).
    """

    data: np.ndarray
    grid: Grid
    scale: float = 1.0
    valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 4 or tuple(self.data.shape[:3]) != tuple(self.grid.shape):
            raise ValueError(f"descriptor array {self.data.shape} does not match grid "
                             f"{self.grid.shape}")
        if self.valid is not None and tuple(self.valid.shape) != tuple(self.grid.shape):
            raise ValueError(f"validity {self.valid.shape} does not match grid "
                             f"{self.grid.shape}")

    @property
    def validity(self) -> np.ndarray:
        """The validity (Z, Y, X) float32, C-contiguous (ones when none was given)."""
        if self.valid is None:
            return np.ones(self.grid.shape, dtype=np.float32)
        return np.ascontiguousarray(self.valid, dtype=np.float32)

    def with_validity(self, valid: np.ndarray | None) -> DescriptorMap:
        """The same descriptors with validity ``valid`` (bool or float on this grid)."""
        v = None if valid is None else np.ascontiguousarray(valid, dtype=np.float32)
        return DescriptorMap(self.data, self.grid, self.scale, v)

    @cached_property
    def valid_moments(self) -> tuple[np.ndarray, float]:
        """(mean descriptor (C,), mean squared norm) over the valid voxels, float64 physical
        values, from a regular subsample of at most ~200,000 voxels (a mean needs no more).
        Cached: every objective on this map (one per level and orientation bin) needs it."""
        v = self.validity.ravel().astype(np.float64)
        m = self.data.reshape(-1, self.channels)
        stride = max(1, len(v) // 200_000)
        m = m[::stride].astype(np.float64) * float(self.scale)
        v = v[::stride]
        if v.sum() <= 0:
            v = np.ones_like(v)
        mean = (v @ m) / v.sum()
        return mean, float(v @ np.sum(m * m, axis=1)) / float(v.sum())

    @property
    def channels(self) -> int:
        return int(self.data.shape[3])

    @property
    def is_int8(self) -> bool:
        return self.data.dtype == np.int8

    def as_float(self) -> np.ndarray:
        """The descriptors as float32 values."""
        return (self.data.astype(np.float32) * np.float32(self.scale)) if self.is_int8 \
            else self.data.astype(np.float32, copy=False)

    def quantised(self) -> DescriptorMap:
        """Symmetric int8 codes round(x * 127) of a map whose values lie in [-1, 1].

        DISA descriptors lie in the unit ball, so every component is in [-1, 1]
        and the code loses at most 1/254 per component (docs/DESIGN.md, "The method
        and the network").
        """
        if self.is_int8:
            return self
        codes = encode_int8(self.as_float())
        return DescriptorMap(np.ascontiguousarray(codes), self.grid, INT8_SCALE, self.valid)

    def pooled(self) -> DescriptorMap:
        """Half resolution: [1, 2, 1]/4 smoothing then every second voxel.

        The binomial filter is centred, so voxel i of the result sits on voxel
        2i of this map and the grid keeps its origin (Grid.strided(2)).
        """
        values = self.as_float()
        for axis in range(3):
            values = _binomial_halved(values, axis, edge=False)
        valid = None
        if self.valid is not None:
            # A pooled node is as valid as the data its filter reads (edges taper).
            valid = self.validity
            for axis in range(3):
                valid = _binomial_halved(valid, axis, edge=True)
        pooled = DescriptorMap(np.ascontiguousarray(values), self.grid.strided(2), 1.0,
                               None if valid is None else np.ascontiguousarray(valid))
        return pooled.quantised() if self.is_int8 else pooled

    def smoothed(self, sigma_voxels: float) -> DescriptorMap:
        """Each channel under a Gaussian of ``sigma_voxels`` (this map's voxels); same grid.

        Why (the final refinement): trilinear interpolation blurs the moving descriptors
        between their voxels and not at them, so an unsmoothed map scores poses that
        put the sample points on its lattice better, and the re-gridded moving map's
        lattice follows the current rotation: rotations stuck 1-2 mm (at the sample
        radius) from the optimum. Smoothing both maps by about a voxel makes that
        blur small against the content (t1-t2 realistic cases: TRE p50 1.2 -> 0.7 mm).
        """
        if sigma_voxels <= 0:
            return self
        values = ndimage.gaussian_filter(self.as_float(), (sigma_voxels,) * 3 + (0.0,),
                                         mode="nearest").astype(np.float32)
        smooth = DescriptorMap(np.ascontiguousarray(values), self.grid, 1.0, self.valid)
        return smooth.quantised() if self.is_int8 else smooth

    def masked(self, mask: np.ndarray) -> DescriptorMap:
        """Validity set to 0 where ``mask`` (bool on this grid) is False: no similarity there.

        Why not zero the descriptors (as until 2026-12-04): a point on a zeroed moving
        descriptor still counted, as 0 (dot) or ||F||^2 (SSD), so a small moving mask
        pulled the fixed foreground onto it; gated by validity it no longer counts.
        """
        return self.with_validity(self.validity * mask)


def _binomial_halved(values: np.ndarray, axis: int, edge: bool) -> np.ndarray:
    """[1, 2, 1]/4 along ``axis`` evaluated at every second voxel only (voxel i of the result
    on voxel 2i), zeros beyond the ends, or the edge value with ``edge``.

    Why not ndimage.convolve1d then [::2]: filtering and halving one axis at a time
    filters the next axes on half the data, and no filtered value is thrown away
    (3 full passes -> about 1.2 of them; the same numbers).
    """
    n = values.shape[axis]
    m = (n + 1) // 2  # output voxels: inputs 0, 2, ...

    def take(part: slice) -> np.ndarray:
        index = [slice(None)] * values.ndim
        index[axis] = part
        return values[tuple(index)]

    def into(part: slice) -> tuple[slice, ...]:
        index = [slice(None)] * values.ndim
        index[axis] = part
        return tuple(index)

    quarter = np.float32(0.25)
    out = take(slice(0, None, 2)) * np.float32(0.5)
    odd = take(slice(1, None, 2)) * quarter  # right neighbours of 0, 2, ...; left of 2, 4, ...
    out[into(slice(0, n // 2))] += odd
    out[into(slice(1, m))] += odd[into(slice(0, m - 1))]
    if edge:  # beyond the ends, the edge voxel's value
        out[into(slice(0, 1))] += take(slice(0, 1)) * quarter
        if n % 2:
            out[into(slice(m - 1, m))] += take(slice(n - 1, n)) * quarter
    return out


def pool_weights(weights: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Weights of a 2x pooled grid of ``shape``: the maximum of each 2x2x2 cell (keeps thin
    structures that a mean would dilute)."""
    padded = np.zeros(tuple(2 * n for n in shape), dtype=np.float32)
    padded[: weights.shape[0], : weights.shape[1], : weights.shape[2]] = weights
    cells = padded.reshape(shape[0], 2, shape[1], 2, shape[2], 2)
    return np.ascontiguousarray(cells.max(axis=(1, 3, 5)))
