"""Dense descriptor maps on physical grids (DISA network output or MIND-SSC).

A map holds one C-vector per voxel of its grid, channels last, as float32 or as
symmetric int8 codes (value = code x scale), and a validity in [0, 1] per voxel:
1 where the image has data (inside its field of view, ultrasound sector and
mask), 0 elsewhere. The registration objective reads fixed descriptors at sample
points and trilinearly interpolates moving ones and their validity.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        kernel = np.array([0.25, 0.5, 0.25], dtype=np.float32)
        for axis in range(3):
            values = ndimage.convolve1d(values, kernel, axis=axis, mode="constant", cval=0.0)
        values = np.ascontiguousarray(values[::2, ::2, ::2])
        valid = None
        if self.valid is not None:
            # A pooled node is as valid as the data its filter reads (edges taper).
            valid = self.validity
            for axis in range(3):
                valid = ndimage.convolve1d(valid, kernel, axis=axis, mode="nearest")
            valid = np.ascontiguousarray(valid[::2, ::2, ::2])
        pooled = DescriptorMap(values, self.grid.strided(2), 1.0, valid)
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


def pool_weights(weights: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Weights of a 2x pooled grid of ``shape``: the maximum of each 2x2x2 cell (keeps thin
    structures that a mean would dilute)."""
    padded = np.zeros(tuple(2 * n for n in shape), dtype=np.float32)
    padded[: weights.shape[0], : weights.shape[1], : weights.shape[2]] = weights
    cells = padded.reshape(shape[0], 2, shape[1], 2, shape[2], 2)
    return np.ascontiguousarray(cells.max(axis=(1, 3, 5)))
