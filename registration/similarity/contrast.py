"""Local contrast of an image: the standard deviation in a cube around every voxel.

Where it is used: the fixed weights w(p) of the descriptor objective (pipeline.fixed_weights,
once per registration and once per orientation bin). The same numbers as
``disa.core.preprocess.local_std`` (scipy's uniform filters in float64, mode "nearest"),
up to float64 rounding, compiled: scipy's two float64 filters, the squares and the
temporaries took 0.09-0.12 s a torso volume (~2.5 M voxels), seven times a registration.
The core keeps scipy's version: it must not import numba (``disa descriptors`` starts cold).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["local_std"]


@njit(cache=True)
def _clamped_row_sums(values: np.ndarray, radius: int, out: np.ndarray,
                      squares: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[i] = sum of values[clamp(i + k)], squares[i] = sum of their squares, |k| <= r."""
    n = values.shape[0]
    for i in range(n):
        total = 0.0
        total_sq = 0.0
        for k in range(-radius, radius + 1):
            v = np.float64(values[min(max(i + k, 0), n - 1)])
            total += v
            total_sq += v * v
        out[i] = total
        squares[i] = total_sq


@njit(cache=True, parallel=True)
def _plane_sums(volume: np.ndarray, radius: int, sums: np.ndarray,
                sums_sq: np.ndarray) -> None:  # pragma: no cover - compiled
    """Box sums over x and y (clamped) of every z plane, of the values and their squares."""
    nz, ny, nx = volume.shape
    for z in prange(nz):
        along_x = np.empty((ny, nx), np.float64)
        along_x_sq = np.empty((ny, nx), np.float64)
        for y in range(ny):
            _clamped_row_sums(volume[z, y], radius, along_x[y], along_x_sq[y])
        for y in range(ny):
            sums[z, y] = 0.0
            sums_sq[z, y] = 0.0
            for k in range(-radius, radius + 1):
                source = min(max(y + k, 0), ny - 1)
                for x in range(nx):
                    sums[z, y, x] += along_x[source, x]
                    sums_sq[z, y, x] += along_x_sq[source, x]


@njit(cache=True, parallel=True)
def _std_from_sums(sums: np.ndarray, sums_sq: np.ndarray, radius: int,
                   out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out = sqrt(max(E[v^2] - E[v]^2, 0)) over the cube, summing the planes along z."""
    nz, ny, nx = sums.shape
    count = float((2 * radius + 1) ** 3)
    for z in prange(nz):
        total = np.zeros((ny, nx), np.float64)
        total_sq = np.zeros((ny, nx), np.float64)
        for k in range(-radius, radius + 1):
            source = min(max(z + k, 0), nz - 1)
            for y in range(ny):
                for x in range(nx):
                    total[y, x] += sums[source, y, x]
                    total_sq[y, x] += sums_sq[source, y, x]
        for y in range(ny):
            for x in range(nx):
                mean = total[y, x] / count
                out[z, y, x] = np.sqrt(max(total_sq[y, x] / count - mean * mean, 0.0))


def local_std(volume: np.ndarray, radius: int) -> np.ndarray:
    """Standard deviation (volume's units) in the (2r + 1)^3 cube around every voxel of a
    (Z, Y, X) volume, float32; beyond the border the edge voxel repeats."""
    data = np.ascontiguousarray(volume)
    if data.ndim != 3:
        raise ValueError(f"volume must be 3D (Z, Y, X), got shape {data.shape}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0 voxels, got {radius}")
    sums = np.empty(data.shape, np.float64)
    sums_sq = np.empty(data.shape, np.float64)
    _plane_sums(data, radius, sums, sums_sq)
    out = np.empty(data.shape, np.float32)
    _std_from_sums(sums, sums_sq, radius, out)
    return out
