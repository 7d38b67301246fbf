"""The paper's way to draw patch pairs with targets spread over [0, 1] (evaluation).

For a fixed image F and a moving image M of one scene: pick a patch of M with
probability proportional to a weight (local standard deviation: flat patches
carry no information and are never picked), compute its LC2 against every
patch of F (one FFT pass, `disa.registration.lc2.LC2AgainstAll`), draw
t ~ U[0, 1] and keep the F patch whose LC2 is closest to t. Dense supervision
in training sees the natural, skewed target distribution; this sampler gives
the near-uniform one the paper reports its errors on.

Two deliberate restrictions, both for cost: centres lie on the descriptor grid
(multiples of 4 voxels), so a network's descriptors are read without
interpolation, and F is searched in a window of ``search`` voxels around the M
centre instead of the whole volume. A draw whose closest LC2 is further than
``tolerance`` from t is discarded (values F cannot reach are not faked), and
t is stratified: each of ``bins`` target bins gets an equal quota, so the
spread is uniform wherever the scene can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from disa.registration import lc2

STEP = 4


@dataclass(frozen=True)
class PatchPair:
    """Centres (voxels (z, y, x), multiples of 4) of an F and an M patch and their LC2."""

    fixed_centre: tuple[int, int, int]
    moving_centre: tuple[int, int, int]
    target: float
    mr_role: str  # "fixed" or "moving": which patch gave intensity and gradient


def _grid_candidates(shape: tuple[int, ...], margin: int, step: int) -> np.ndarray:
    axes = [np.arange(((margin + step - 1) // step) * step, s - margin, step) for s in shape]
    if any(len(a) == 0 for a in axes):
        return np.zeros((0, 3), dtype=np.int64)
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def sample_patch_pairs(
    fixed: np.ndarray,
    moving: np.ndarray,
    n_pairs: int,
    rng: np.random.Generator,
    radii: tuple[int, ...] = lc2.DEFAULT_RADII,
    search: int = 56,
    per_patch: int = 4,
    tolerance: float = 0.05,
    step: int = STEP,
    bins: int = 10,
    max_patches: int | None = None,
) -> list[PatchPair]:
    """Up to ``n_pairs`` patch pairs of two same-shape volumes with near-uniform LC2 targets.

    The MR role is drawn per M patch. t is drawn uniformly over the target bins
    whose quota (n_pairs / bins each) is not yet filled. Returns fewer pairs if
    M has no textured patch or some bins stay out of reach after
    ``max_patches`` M patches (default 4 n_pairs).
    """
    if fixed.shape != moving.shape:
        raise ValueError("fixed and moving must share one grid")
    rmax = max(radii)
    # +1: the MR-role patch needs a voxel of margin for its own gradient.
    candidates = _grid_candidates(moving.shape, rmax + 1, step)
    if len(candidates) == 0:
        return []
    weight = lc2.local_std(moving, rmax)[tuple(candidates.T)]
    weight = np.where(weight >= 1e-3, weight, 0.0)
    if weight.sum() <= 0:
        return []
    p = weight / weight.sum()
    shape = np.array(fixed.shape)
    out: list[PatchPair] = []
    # Equal quotas per target bin: t is drawn among bins still open, so targets
    # that are common (low LC2) cannot crowd out the rare high ones.
    quota = np.full(bins, n_pairs // bins)
    quota[: n_pairs % bins] += 1
    for _ in range(max_patches if max_patches is not None else 4 * n_pairs):
        if len(out) >= n_pairs:
            break
        c = candidates[rng.choice(len(candidates), p=p)]
        # Search window of F around c, starting on the grid so its positions stay on it.
        lo = np.maximum((c - search // 2) // step * step, 0)
        hi = np.minimum(lo + search, shape)
        window = np.ascontiguousarray(fixed[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        if min(window.shape) < 2 * rmax + 3:
            continue
        mr_role = "moving" if rng.random() < 0.5 else "fixed"
        if mr_role == "moving":
            patch = moving[tuple(slice(ci - rmax - 1, ci + rmax + 2) for ci in c)]
            scores = lc2.lc2_against_all(patch, window, radii, "source")
        else:
            patch = moving[tuple(slice(ci - rmax, ci + rmax + 1) for ci in c)]
            scores = lc2.lc2_against_all(patch, window, radii, "target")
        # Positions within rmax + 1 of a window face that is not the volume's face
        # would see a gradient clipped by the window: keep them out.
        pos = _grid_candidates(window.shape, 0, step)
        keep = np.ones(len(pos), bool)
        for ax in range(3):
            if lo[ax] > 0:
                keep &= pos[:, ax] >= rmax + 1
            if hi[ax] < shape[ax]:
                keep &= pos[:, ax] < window.shape[ax] - rmax - 1
        pos = pos[keep]
        values = scores[tuple(pos.T)] if len(pos) else np.zeros(0)
        finite = np.isfinite(values)
        pos, values = pos[finite], values[finite]
        if len(values) == 0:
            continue
        for _ in range(per_patch):
            open_bins = np.flatnonzero(quota > 0)
            if len(open_bins) == 0:
                break
            t = (rng.choice(open_bins) + rng.uniform()) / bins
            j = int(np.argmin(np.abs(values - t)))
            b = min(int(values[j] * bins), bins - 1)
            if abs(values[j] - t) <= tolerance and quota[b] > 0:
                quota[b] -= 1
                f = lo + pos[j]
                out.append(PatchPair(tuple(int(v) for v in f), tuple(int(v) for v in c),  # type: ignore[arg-type]
                                     float(values[j]), mr_role))
    return out


def patch_pair_lc2(fixed: np.ndarray, moving: np.ndarray, pair: PatchPair,
                   radii: tuple[int, ...] = lc2.DEFAULT_RADII) -> float:
    """Direct least-squares LC2 of one sampled pair (the check for the sampler's targets)."""
    values = []
    for r in radii:
        for_mr = moving if pair.mr_role == "moving" else fixed
        for_us = fixed if pair.mr_role == "moving" else moving
        c_mr = pair.moving_centre if pair.mr_role == "moving" else pair.fixed_centre
        c_us = pair.fixed_centre if pair.mr_role == "moving" else pair.moving_centre
        mr_patch = for_mr[tuple(slice(c - r - 1, c + r + 2) for c in c_mr)]
        us_patch = for_us[tuple(slice(c - r, c + r + 1) for c in c_us)]
        values.append(lc2.lc2_patch_naive(us_patch, mr_patch))
    return float(np.mean(values))
