"""Discrete displacement search on descriptor maps: cost volume and convex coupling (numba).

In the spirit of the paper's deformable experiment (its reference [6]) and of
ConvexAdam: every control point gets the cost of every displacement in a small
window (a cost volume), then a smooth field is found by alternating between
smoothing the field and re-choosing, per point, the displacement that
minimises its own cost plus a quadratic pull towards the smoothed field, with a
pull that grows over the iterations (the coupling of a convex relaxation).

Frames: displacements are integer *steps* (x, y, z) along the grid axes of the
search grid, the control grid refined 2x (one step = half a control spacing).
The warped moving map lives on that fine grid, in the fixed frame, with a
margin of ``radius`` steps on every side, so control node i (ITK index) at
displacement d reads fine voxel 2 i + radius + d.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def window_offsets(radius: int) -> np.ndarray:
    """All displacements (K, 3) in steps, (x, y, z), K = (2 radius + 1)^3, x fastest."""
    r = np.arange(-radius, radius + 1)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.int64)


@njit(parallel=True, fastmath=True, cache=True)
def _cost_volume(fixed, scale_fixed, nodes, warped, offsets, ssd, out):
    n_chan = fixed.shape[1]
    for p in prange(nodes.shape[0]):
        bx = nodes[p, 0]
        by = nodes[p, 1]
        bz = nodes[p, 2]
        f = np.empty(n_chan, dtype=np.float32)
        for c in range(n_chan):
            f[c] = fixed[p, c] * scale_fixed
        for k in range(offsets.shape[0]):
            x = bx + offsets[k, 0]
            y = by + offsets[k, 1]
            z = bz + offsets[k, 2]
            acc = np.float32(0.0)
            if ssd:
                for c in range(n_chan):
                    r = f[c] - warped[z, y, x, c]
                    acc += r * r
            else:
                for c in range(n_chan):
                    acc -= f[c] * warped[z, y, x, c]
            out[p, k] = acc


def cost_volume(fixed: np.ndarray, scale_fixed: float, nodes: np.ndarray, warped: np.ndarray,
                radius: int, ssd: bool) -> np.ndarray:
    """Costs (N, K) float32 of every window displacement for every node.

    Args:
        fixed: (N, C) fixed descriptors at the nodes (int8 codes or float32).
        scale_fixed: dequantisation factor of ``fixed``.
        nodes: (N, 3) int fine-grid index (x, y, z) of each node at zero displacement.
        warped: (Zf, Yf, Xf, C) float32 moving descriptors on the fine grid.
        radius: window half-width in steps; nodes +- radius must lie in ``warped``.
        ssd: squared distance (MIND-SSC) instead of the negative dot product (DISA).
    """
    offsets = window_offsets(radius)
    out = np.empty((len(nodes), len(offsets)), dtype=np.float32)
    _cost_volume(fixed, np.float32(scale_fixed), np.ascontiguousarray(nodes, dtype=np.int64),
                 warped, offsets, ssd, out)
    return out


@njit(parallel=True, fastmath=True, cache=True)
def _coupled_argmin(costs, offsets, target, pull, out):
    for p in prange(costs.shape[0]):
        best = np.inf
        best_k = 0
        tx = target[p, 0]
        ty = target[p, 1]
        tz = target[p, 2]
        for k in range(offsets.shape[0]):
            dx = offsets[k, 0] - tx
            dy = offsets[k, 1] - ty
            dz = offsets[k, 2] - tz
            e = costs[p, k] + pull * (dx * dx + dy * dy + dz * dz)
            if e < best:
                best = e
                best_k = k
        out[p, 0] = offsets[best_k, 0]
        out[p, 1] = offsets[best_k, 1]
        out[p, 2] = offsets[best_k, 2]


def coupled_argmin(costs: np.ndarray, radius: int, target: np.ndarray, pull: float
                   ) -> np.ndarray:
    """Per node, the displacement (steps, float64 (N, 3)) minimising cost + pull |d - target|^2.

    ``costs`` (N, K) as returned by ``cost_volume`` (normalised by the caller);
    ``target`` (N, 3) the smoothed field in steps.
    """
    offsets = window_offsets(radius).astype(np.float64)
    out = np.empty((len(costs), 3))
    _coupled_argmin(costs, offsets, np.ascontiguousarray(target, dtype=np.float64),
                    float(pull), out)
    return out

