"""LC2 of arbitrary patch pairs between two crops, both roles at once (numba).

Training supervises not only descriptors at the same crop position (offset by
the crop pair's small relative shift) but also pairs at different positions,
up to +-16 voxels apart, as in the paper's sampling and in our held-out
evaluation: a network never shown distant pairs learns "same place = similar"
and over-predicts LC2 for unrelated patches (the v1 model's failure, bias
+0.3 in the lowest target bin).

The box-filter identities of `disa.registration.similarity.lc2` cover one relative offset
per pass (ten integral volumes each); a few thousand pairs at arbitrary
offsets are cheaper summed directly: one pass over the radius-7 cube of each
pair accumulates the moments of all radii (nested cubes) for both roles.
About 20 us per pair on one core; numba because numpy would need the
(pairs x 3375) patch arrays in memory.

Frames: arrays are (z, y, x) voxel arrays of one crop grid; centres are
integer voxel indices whose cube of the largest radius lies inside the array.
Gradients are those of `disa.registration.similarity.lc2.gradient_magnitude` over the
whole crop (central differences), so a pair at offset zero reproduces
`local_lc2_multi` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from disa.registration.similarity import lc2

# The kernel accumulates 14 sums per cube: 0 n, 1 f, 2 m, 3 gf, 4 gm, 5 ff, 6 mm,
# 7 gf gf, 8 gm gm, 9 f gf, 10 m gm, 11 f m, 12 gf m, 13 gm f, where
# f, m are the fixed and moving intensities and gf, gm their gradient magnitudes.
# Row r picks the ten moments (n, Sp, Sg, Su, Spp, Spg, Sgg, Spu, Sgu, Suu) of
# lc2.lc2_from_moments for role r: 0 = fixed is the source p (MR role), 1 = moving.
_ROLE_MOMENTS = np.array(
    [[0, 1, 3, 2, 5, 9, 7, 11, 12, 6], [0, 2, 4, 1, 6, 10, 8, 11, 13, 5]], dtype=np.int64
)


@njit(cache=True, fastmath=False)
def _pair_moments(fixed, moving, grad_fixed, grad_moving, fixed_pts, moving_pts, radii,
                  role_moments):
    """Raw cube moments (pairs, role, radius, 10); role 0: fixed gives intensity+gradient."""
    n_pairs = fixed_pts.shape[0]
    n_radii = radii.shape[0]
    rmax = 0
    for k in range(n_radii):
        rmax = max(rmax, radii[k])
    out = np.zeros((n_pairs, 2, n_radii, 10))
    # Shell sums: index s accumulates voxels with Chebyshev distance exactly s.
    shell = np.zeros((rmax + 1, 14))
    for i in range(n_pairs):
        fz, fy, fx = fixed_pts[i, 0], fixed_pts[i, 1], fixed_pts[i, 2]
        mz, my, mx = moving_pts[i, 0], moving_pts[i, 1], moving_pts[i, 2]
        shell[:, :] = 0.0
        for dz in range(-rmax, rmax + 1):
            for dy in range(-rmax, rmax + 1):
                for dx in range(-rmax, rmax + 1):
                    s = max(abs(dz), abs(dy), abs(dx))
                    f = fixed[fz + dz, fy + dy, fx + dx]
                    m = moving[mz + dz, my + dy, mx + dx]
                    gf = grad_fixed[fz + dz, fy + dy, fx + dx]
                    gm = grad_moving[mz + dz, my + dy, mx + dx]
                    row = shell[s]
                    row[0] += 1.0
                    row[1] += f
                    row[2] += m
                    row[3] += gf
                    row[4] += gm
                    row[5] += f * f
                    row[6] += m * m
                    row[7] += gf * gf
                    row[8] += gm * gm
                    row[9] += f * gf
                    row[10] += m * gm
                    row[11] += f * m
                    row[12] += gf * m
                    row[13] += gm * f
        # Cumulative over shells: row s then holds the sums of the cube of radius s.
        for s in range(1, rmax + 1):
            shell[s] += shell[s - 1]
        for k in range(n_radii):
            for role in range(2):
                for q in range(10):
                    out[i, role, k, q] = shell[radii[k], role_moments[role, q]]
    return out


def pair_lc2(
    fixed: np.ndarray,
    moving: np.ndarray,
    fixed_pts: np.ndarray,
    moving_pts: np.ndarray,
    radii: Sequence[int] = lc2.DEFAULT_RADII,
) -> np.ndarray:
    """Multi-radius LC2 of patch pairs, (pairs, 2): column 0 with the fixed patch in the
    MR role (intensity and gradient), column 1 with the moving patch in it.

    ``fixed_pts`` / ``moving_pts``: (pairs, 3) integer voxel centres in ``fixed`` /
    ``moving``; each cube of the largest radius must lie inside its array.
    """
    f = np.ascontiguousarray(fixed, dtype=np.float64)
    m = np.ascontiguousarray(moving, dtype=np.float64)
    fp = np.ascontiguousarray(fixed_pts, dtype=np.int64).reshape(-1, 3)
    mp = np.ascontiguousarray(moving_pts, dtype=np.int64).reshape(-1, 3)
    r = np.asarray(tuple(int(x) for x in radii), dtype=np.int64)
    if fp.shape != mp.shape:
        raise ValueError("fixed_pts and moving_pts must pair up (same shape)")
    rmax = int(r.max())
    for pts, arr, name in ((fp, f, "fixed"), (mp, m, "moving")):
        if len(pts) and (
            pts.min() < rmax or np.any(pts.max(axis=0) + rmax >= np.asarray(arr.shape))
        ):
            raise ValueError(f"a {name} centre's cube of radius {rmax} leaves the array")
    if len(fp) == 0:
        return np.zeros((0, 2))
    moments = _pair_moments(
        f, m, lc2.gradient_magnitude(f), lc2.gradient_magnitude(m), fp, mp, r, _ROLE_MOMENTS
    )
    # (pairs, 2, radii, 10) -> the shared closed-form solve, then mean over radii.
    values = lc2.lc2_from_moments(np.moveaxis(moments, -1, 0))
    return values.mean(axis=-1)
