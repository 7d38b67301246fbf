"""The paper's way to draw patch pairs with targets spread over [0, 1] (evaluation).

For a fixed image F and a moving image M of one scene: pick a patch of M with
probability proportional to a weight (local standard deviation: flat patches
carry no information and are never picked), compute its LC2 against the
patches of F, draw t ~ U[0, 1] and keep the F patch whose LC2 is closest to t.
Dense supervision in training sees the natural, skewed target distribution;
this sampler gives the near-uniform one the paper reports its errors on.

Deliberate restrictions, for cost: centres lie on the descriptor grid
(multiples of 4 voxels), so a network's descriptors are read without
interpolation, and F is searched at the grid points within a window of
``search`` voxels around the M centre rather than everywhere (LC2 at those
points by `disa.registration.similarity.lc2.lc2_against_points`, cheaper there than the
FFT of `LC2AgainstAll`). A draw whose closest LC2 is further than
``tolerance`` from t is discarded (values F cannot reach are not faked), and
t is stratified: each of ``bins`` target bins gets an equal quota, so the
spread is uniform wherever the scene can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from disa.registration.similarity import lc2

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
    search: int = 32,
    per_patch: int = 8,
    tolerance: float = 0.05,
    step: int = STEP,
    bins: int = 10,
    max_patches: int | None = None,
) -> list[PatchPair]:
    """Up to ``n_pairs`` patch pairs of two same-shape volumes with near-uniform LC2 targets.

    The MR role is drawn per M patch. t is drawn uniformly over the target bins
    whose quota (n_pairs / bins each) is not yet filled. Returns fewer pairs if
    M has no textured patch or some bins stay out of reach after
    ``max_patches`` M patches (default 2 n_pairs).
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
    out: list[PatchPair] = []
    # Equal quotas per target bin: t is drawn among bins still open, so targets
    # that are common (low LC2) cannot crowd out the rare high ones.
    quota = np.full(bins, n_pairs // bins)
    quota[: n_pairs % bins] += 1
    half = search // 2
    for _ in range(max_patches if max_patches is not None else 2 * n_pairs):
        if len(out) >= n_pairs:
            break
        c = candidates[rng.choice(len(candidates), p=p)]
        # F positions: grid points (with the same gradient margin) within the window.
        near = np.all(np.abs(candidates - c) <= half, axis=1)
        pos = candidates[near]
        mr_role = "moving" if rng.random() < 0.5 else "fixed"
        if mr_role == "moving":
            patch = moving[tuple(slice(ci - rmax - 1, ci + rmax + 2) for ci in c)]
            values = lc2.lc2_against_points(patch, fixed, pos, radii, "source")
        else:
            patch = moving[tuple(slice(ci - rmax, ci + rmax + 1) for ci in c)]
            values = lc2.lc2_against_points(patch, fixed, pos, radii, "target")
        for _ in range(per_patch):
            open_bins = np.flatnonzero(quota > 0)
            if len(open_bins) == 0:
                break
            t = (rng.choice(open_bins) + rng.uniform()) / bins
            j = int(np.argmin(np.abs(values - t)))
            b = min(int(values[j] * bins), bins - 1)
            if abs(values[j] - t) <= tolerance and quota[b] > 0:
                quota[b] -= 1
                out.append(
                    PatchPair(
                        tuple(int(v) for v in pos[j]),
                        tuple(int(v) for v in c),  # type: ignore[arg-type]
                        float(values[j]),
                        mr_role,
                    )
                )
    return out


def patch_pair_lc2(
    fixed: np.ndarray,
    moving: np.ndarray,
    pair: PatchPair,
    radii: tuple[int, ...] = lc2.DEFAULT_RADII,
) -> float:
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
