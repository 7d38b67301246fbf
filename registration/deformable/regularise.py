"""Regularisers of a displacement field on a control grid, with analytic gradients.

The field v is (Z, Y, X, 3): numpy grid order, vectors in LPS mm (x, y, z),
interpolated trilinearly between nodes. The fixed point x maps to x + v(x)
before the linear stage (see ``deformable``).

* ``diffusion``: sum over grid edges of |v_b - v_a|^2 / h^2 (h: the edge's
  length in mm), the membrane energy of the field; it penalises strain, not
  translation, so a uniform residual shift costs nothing.
* ``jacobian_penalty``: sum over every cell corner of max(0, tau - det J)^2,
  J = I + dv/dx the Jacobian of x -> x + v(x) at that corner. For a trilinear
  field the corners carry the extreme strains of a cell; keeping them above
  tau > 0 keeps the mapping free of folds in practice (checked on the dense
  output grid, ``displacement.jacobian_metrics``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True)
def _diffusion(v, w, grad):
    # One pass over the nodes, each adding its +x, +y, +z edges (weights w = 1 / h^2).
    nz, ny, nx = v.shape[0], v.shape[1], v.shape[2]
    energy = 0.0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                for i in range(3):
                    a = v[z, y, x, i]
                    if x + 1 < nx:
                        d = v[z, y, x + 1, i] - a
                        energy += w[0] * d * d
                        grad[z, y, x + 1, i] += 2.0 * w[0] * d
                        grad[z, y, x, i] -= 2.0 * w[0] * d
                    if y + 1 < ny:
                        d = v[z, y + 1, x, i] - a
                        energy += w[1] * d * d
                        grad[z, y + 1, x, i] += 2.0 * w[1] * d
                        grad[z, y, x, i] -= 2.0 * w[1] * d
                    if z + 1 < nz:
                        d = v[z + 1, y, x, i] - a
                        energy += w[2] * d * d
                        grad[z + 1, y, x, i] += 2.0 * w[2] * d
                        grad[z, y, x, i] -= 2.0 * w[2] * d
    return energy


def diffusion(v: np.ndarray, spacing_xyz: np.ndarray) -> tuple[float, np.ndarray]:
    """Membrane energy sum |dv|^2 / h^2 over grid edges, and its gradient (Z, Y, X, 3).

    ``spacing_xyz``: the grid's spacing (mm) along ITK x, y, z (numpy axes 2, 1, 0).
    Serial numba, one pass (the numpy version took 8 ms per call at 68 x 60 x 70 nodes,
    a fifth of the fine level's time).
    """
    field = np.ascontiguousarray(v, dtype=np.float64)
    grad = np.zeros_like(field)
    w = 1.0 / np.asarray(spacing_xyz, dtype=np.float64) ** 2
    return float(_diffusion(field, w, grad)), grad


def _jacobian_penalty(v, b, tau, grad, parity):
    # Cells of slab z write to node slabs z and z + 1 only: slabs of one parity never
    # share a node, so they could run in parallel without races (the caller does both
    # parities). Serial is used: on the busy 2-core machine the thread pool cost more
    # than it saved (26 vs 17 ms per call at 42^3 nodes).
    nz, ny, nx = v.shape[0], v.shape[1], v.shape[2]
    n_slabs = (nz - 1 - parity + 1) // 2
    energies = np.zeros(max(n_slabs, 1))
    minima = np.full(max(n_slabs, 1), np.inf)
    for s in prange(n_slabs):
        z = parity + 2 * s
        g = np.empty((3, 3))
        j = np.empty((3, 3))
        cof = np.empty((3, 3))
        energy = 0.0
        min_det = np.inf
        for y in range(ny - 1):
            for x in range(nx - 1):
                for corner in range(8):
                    xc = x + (corner & 1)
                    yc = y + ((corner >> 1) & 1)
                    zc = z + ((corner >> 2) & 1)
                    for i in range(3):
                        g[i, 0] = v[zc, yc, x + 1, i] - v[zc, yc, x, i]
                        g[i, 1] = v[zc, y + 1, xc, i] - v[zc, y, xc, i]
                        g[i, 2] = v[z + 1, yc, xc, i] - v[z, yc, xc, i]
                    for i in range(3):
                        for k in range(3):
                            j[i, k] = (1.0 if i == k else 0.0) + g[i, 0] * b[0, k] \
                                + g[i, 1] * b[1, k] + g[i, 2] * b[2, k]
                    cof[0, 0] = j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1]
                    cof[0, 1] = j[1, 2] * j[2, 0] - j[1, 0] * j[2, 2]
                    cof[0, 2] = j[1, 0] * j[2, 1] - j[1, 1] * j[2, 0]
                    det = j[0, 0] * cof[0, 0] + j[0, 1] * cof[0, 1] + j[0, 2] * cof[0, 2]
                    if det < min_det:
                        min_det = det
                    if det >= tau:
                        continue
                    r = tau - det
                    energy += r * r
                    cof[1, 0] = j[0, 2] * j[2, 1] - j[0, 1] * j[2, 2]
                    cof[1, 1] = j[0, 0] * j[2, 2] - j[0, 2] * j[2, 0]
                    cof[1, 2] = j[0, 1] * j[2, 0] - j[0, 0] * j[2, 1]
                    cof[2, 0] = j[0, 1] * j[1, 2] - j[0, 2] * j[1, 1]
                    cof[2, 1] = j[0, 2] * j[1, 0] - j[0, 0] * j[1, 2]
                    cof[2, 2] = j[0, 0] * j[1, 1] - j[0, 1] * j[1, 0]
                    # d energy / d g[i, a] = -2 r sum_k cof[i, k] b[a, k]   (J = I + g b)
                    for i in range(3):
                        for a in range(3):
                            d = -2.0 * r * (cof[i, 0] * b[a, 0] + cof[i, 1] * b[a, 1]
                                            + cof[i, 2] * b[a, 2])
                            if a == 0:
                                grad[zc, yc, x + 1, i] += d
                                grad[zc, yc, x, i] -= d
                            elif a == 1:
                                grad[zc, y + 1, xc, i] += d
                                grad[zc, y, xc, i] -= d
                            else:
                                grad[z + 1, yc, xc, i] += d
                                grad[z, yc, xc, i] -= d
        energies[s] = energy
        minima[s] = min_det
    return energies.sum(), minima.min()


_jacobian_serial = njit(cache=True, fastmath=True)(_jacobian_penalty)


def jacobian_penalty(v: np.ndarray, index_to_physical: np.ndarray, tau: float
                     ) -> tuple[float, np.ndarray, float]:
    """sum over cell corners of max(0, tau - det J)^2, its gradient, and the smallest det J.

    ``index_to_physical``: the grid's 3x3 direction x spacing matrix (mm per index
    step); derivatives along grid axes become physical ones through its inverse.
    """
    b = np.linalg.inv(index_to_physical)
    grad = np.zeros_like(v)
    field = np.ascontiguousarray(v, dtype=np.float64)
    energy = 0.0
    min_det = np.inf
    for parity in (0, 1):
        e, m = _jacobian_serial(field, b, float(tau), grad, parity)
        energy += e
        min_det = min(min_det, m)
    return float(energy), grad, float(min_det)
