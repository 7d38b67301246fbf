"""Similarities behind one interface: the optimisers only see costs of parameters.

Every objective is a cost to MINIMISE over transform parameters theta (B, P)
of a ``TransformModel`` (fixed -> moving points, LPS mm):

- ``DescriptorObjective``: the paper's Eq. 2, sum_p w(p) <F[p], M(T(x_p))>, with
  trilinear interpolation of the moving map and an analytic gradient; "dot"
  for DISA descriptors (cost = -similarity), "ssd" for MIND-SSC (cost = SSD).
  Overlap-normalised: a weighted MEAN over the points that land where the moving
  image has data, not a sum over all points (see the class docstring).
- ``PointObjective``: the same cost for a non-linear mapping of the points (a
  ``PointModel``, e.g. rigid + probe compression); the per-point kernel returns
  d cost / d moving point and the model chains its own Jacobian.
- ``LC2Objective``: LC2 of the fixed image and the resampled moving image
  (no gradient: used with a derivative-free optimiser).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from disa.core.grid import Grid
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.kernels import (
    descriptor_cost,
    point_descriptor_cost,
    sample_descriptors,
)
from disa.registration.transform.parametric import TransformModel


class Objective(Protocol):
    """A cost over transform parameters; lower is better."""

    model: TransformModel
    differentiable: bool
    evaluations: int

    def cost(self, theta: np.ndarray) -> np.ndarray:
        """Costs (B,) of parameters (B, P)."""
        ...

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Costs (B,) and gradients (B, P) w.r.t. theta."""
        ...


def sample_points(weight_map: np.ndarray, n_points: int | None, rng: np.random.Generator,
                  replicate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sample points of a weight map (Z, Y, X) for the objective.

    With ``n_points`` None or at least the number of weighted voxels, every
    voxel with positive weight is used with its weight (``replicate``: each
    repeated until there are at least ``n_points``, for callers that move the
    copies apart). Otherwise points are drawn without replacement with
    probability proportional to the weight and weighted equally, an importance
    sample of the same weighted sum.

    Returns indices (N, 3) in (x, y, z) order as float32 and weights (N,)
    float32 summing to 1.
    """
    flat = weight_map.ravel()
    candidates = np.flatnonzero(flat > 0)
    if candidates.size == 0:
        raise ValueError("no voxel of the fixed image carries weight")
    values = flat[candidates].astype(np.float64)  # (not a float64 copy of the whole map)
    if n_points is None or n_points >= candidates.size:
        copies = -(-n_points // candidates.size) if replicate and n_points else 1
        chosen = np.repeat(candidates, copies)
        weights = np.repeat(values, copies)
    else:
        p = values / values.sum()
        chosen = np.sort(rng.choice(candidates, size=n_points, replace=False, p=p))
        weights = np.ones(n_points)
    z, y, x = np.unravel_index(chosen, weight_map.shape)
    points = np.stack([x, y, z], axis=1).astype(np.float32)
    return points, (weights / weights.sum()).astype(np.float32)


def fold_grids(p: np.ndarray, fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """Physical [M | o] (B, 3, 4) -> the same map from fixed indices to moving indices."""
    h_fixed = fixed_grid.index_to_physical
    h_moving_inv = moving_grid.physical_to_index
    full = np.zeros((len(p), 4, 4))
    full[:, :3] = p
    full[:, 3, 3] = 1.0
    return np.ascontiguousarray((h_moving_inv @ full @ h_fixed)[:, :3])


#: Poses whose overlap (weighted fraction of sample points landing on valid moving data)
#: falls below this are refused by a barrier (docs/DESIGN.md, "Overlap-normalised
#: objective"). The sample points come from the image with the smaller field of view,
#: so at the true pose the overlap is near 1 for a crop, a slab or a sector.
MIN_OVERLAP = 0.3
#: Weight (as a fraction of the sample weight) of the prior that shrinks the mean
#: towards the chance cost: a handful of overlapping points cannot score like a full
#: overlap by luck.
PRIOR_WEIGHT = 0.05
#: Barrier height at zero overlap, in units of the contrast between chance and a
#: perfect match: at half the minimum overlap a pose is as bad as chance.
BARRIER = 4.0


@dataclass
class DescriptorObjective:
    """Weighted descriptor similarity of a fixed and a moving map (paper, Eq. 2),
    normalised by the overlap.

    With c_p = -<F_p, M(T(x_p))> (kind "dot", DISA) or ||F_p - M(T(x_p))||^2 (kind
    "ssd", MIND-SSC), v_p the moving validity at T(x_p) (1 on data, 0 outside the
    moving field of view, sector or mask; trilinear) and weights w_p summing to 1:

        S = sum_p w_p v_p c_p,   W = sum_p w_p v_p           (the overlap)
        cost = (S + W0 c0) / (W + W0) + D k max(0, 1 - W / W_min)^2

    i.e. the mean cost over the points that have a partner, shrunk by a small prior
    weight W0 towards the chance cost c0 (the expected cost of unrelated
    descriptors), plus a barrier that refuses poses overlapping less than W_min
    (D = c0 - the cost of a perfect match, k = BARRIER). Why: summed over all
    points with zeros outside the moving image, the optimum was pulled towards
    poses that maximise the overlap rather than the correspondence, and every real
    pair (a slab, a sector, a crop, another scanner's field of view) failed.

    ``jitter`` moves every sampled grid point by a uniform random
    offset within its descriptor cell and interpolates the fixed map there, so
    the cost is the cross-correlation of two interpolated maps rather than the
    moving map's interpolation read at fixed nodes. Why: a dot product with a
    trilinearly interpolated vector is linear between nodes, so with every
    point on a node of a parallel grid (shared grids, or the re-oriented
    refinement) the cost is piecewise linear in translation with all kinks at
    grid alignment, and its optimum snaps to a multiple of the descriptor
    spacing (8 mm for DISA). Spread over the cell, the kinks average out
    (docs/DESIGN.md, "The objective and its kernel"). The engine turns it on
    for DISA's coarse maps only: on MIND-SSC's 2-4 mm grids the kinks are
    small and interpolating the fixed map only blurs it (a probe phantom's
    decay length drifted from 30 to 23 mm).
    """

    fixed: DescriptorMap
    moving: DescriptorMap
    weight_map: np.ndarray
    model: TransformModel
    kind: Literal["dot", "ssd"] = "dot"
    n_points: int | None = None
    seed: int = 0
    jitter: bool = False
    min_overlap: float = MIN_OVERLAP
    differentiable: bool = True
    evaluations: int = 0
    points: np.ndarray = field(init=False)
    weights: np.ndarray = field(init=False)
    fixed_values: np.ndarray = field(init=False)
    #: Expected cost of unrelated descriptors and cost of a perfect match.
    chance_cost: float = field(init=False)
    match_cost: float = field(init=False)

    def __post_init__(self) -> None:
        if self.fixed.channels != self.moving.channels:
            raise ValueError("fixed and moving descriptors have different channel counts")
        if self.weight_map.shape != tuple(self.fixed.grid.shape):
            raise ValueError("weight map is not on the fixed descriptor grid")
        rng = np.random.default_rng(self.seed)
        self.points, self.weights = sample_points(self.weight_map, self.n_points, rng,
                                                  replicate=self.jitter)
        self._fixed_scale = float(self.fixed.scale)
        if self.jitter:
            upper = np.array(self.fixed.grid.shape[::-1], dtype=np.float32) - 1.0
            offsets = rng.uniform(-0.5, 0.5, self.points.shape).astype(np.float32)
            self.points = np.clip(self.points + offsets, 0.0, upper)
            self.fixed_values = sample_descriptors(self.fixed.data, self.points, self._fixed_scale)
            self._fixed_scale = 1.0
        else:
            idx = self.points.astype(np.int64)
            self.fixed_values = np.ascontiguousarray(
                self.fixed.data[idx[:, 2], idx[:, 1], idx[:, 0]])
        self._moving = np.ascontiguousarray(self.moving.data)
        self._valid = self.moving.validity
        self._faces = self.moving.faces
        self.chance_cost, self.match_cost = self._reference_costs()

    def release_fixed_map(self) -> None:
        """Keep only the fixed map's grid (``DescriptorMap.grid_only``): the cost reads the
        values at the sample points (``fixed_values``), read at construction, and the
        grid. Why: the search's orientation bins build ~90 MB maps (a torso) that would
        otherwise stay alive for the whole search, and each later map then lands on fresh
        pages: MIND-SSC took 0.15-0.23 s a bin instead of 0.06 s (pipeline.oriented_levels).
        An objective whose fixed map is released cannot seed another objective
        (``affine`` copies ``fixed`` from the rigid one): only the search's bins do it."""
        self.fixed = self.fixed.grid_only()

    def _reference_costs(self) -> tuple[float, float]:
        """(c0, c_match): the expected cost of a point against a random valid moving
        descriptor, and the cost of a perfect match (descriptors equal)."""
        f = self.fixed_values.astype(np.float64) * self._fixed_scale
        w = self.weights.astype(np.float64)
        f_mean = w @ f
        f_sq = float(w @ np.sum(f * f, axis=1))
        if not np.any(self._valid > 0):
            raise ValueError("the moving image has no valid descriptor")
        m_mean, m_sq = self.moving.valid_moments
        if self.kind == "dot":
            return -float(f_mean @ m_mean), -f_sq
        return f_sq + m_sq - 2.0 * float(f_mean @ m_mean), 0.0

    def _normalise(self, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
        """Cost (B,) from the gated sums, and the factors (a, b) of its gradient:
        d cost = a d S + b d W."""
        c0 = self.chance_cost
        contrast = max(c0 - self.match_cost, 1e-9)
        short = np.maximum(0.0, 1.0 - w / self.min_overlap)
        barrier = contrast * BARRIER * short * short
        d_barrier = -2.0 * contrast * BARRIER * short / self.min_overlap
        den = w + PRIOR_WEIGHT
        mean = (s + PRIOR_WEIGHT * c0) / den
        return mean + barrier, 1.0 / den, -mean / den + d_barrier

    @property
    def physical_points(self) -> np.ndarray:
        """The sample points in LPS mm (N, 3)."""
        return self.fixed.grid.to_physical(self.points)

    def _evaluate(self, theta: np.ndarray, want_grad: bool) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
        theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
        p, dp = self.model.matrices(theta)
        mats = fold_grids(p, self.fixed.grid, self.moving.grid)
        s, w, grad_s, grad_w = descriptor_cost(
            self.fixed_values, self.weights, self.points, self._moving, self._valid, self._faces,
            mats, self._fixed_scale, float(self.moving.scale), self.kind == "ssd", want_grad)
        self.evaluations += len(theta)
        cost, a, b = self._normalise(s, w)
        if not want_grad:
            return cost, np.zeros_like(theta), w
        grad_idx = a[:, None, None] * grad_s + b[:, None, None] * grad_w
        # d cost / d P = A_m^-T  S  H_f^T  (chain rule through fold_grids).
        a_inv = self.moving.grid.physical_to_index[:3, :3]
        grad_p = np.einsum("ji,bjk,lk->bil", a_inv, grad_idx, self.fixed.grid.index_to_physical)
        grad_p = grad_p[:, :, :4]
        grad_theta = np.einsum("bij,bkij->bk", grad_p, dp)
        return cost, grad_theta, w

    def cost(self, theta: np.ndarray) -> np.ndarray:
        return self._evaluate(theta, want_grad=False)[0]

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cost, grad, _ = self._evaluate(theta, want_grad=True)
        return cost, grad

    def overlaps(self, theta: np.ndarray) -> np.ndarray:
        """Weighted fractions (B,) of the sample points that land on valid moving data."""
        return self._evaluate(theta, want_grad=False)[2]

    def overlap(self, theta: np.ndarray) -> float:
        """Weighted fraction of fixed sample points that land on valid moving data."""
        return float(self.overlaps(theta)[0])

    def match_quality(self, cost: float) -> float:
        """Where ``cost`` lies between chance (0) and a perfect match (1)."""
        contrast = max(self.chance_cost - self.match_cost, 1e-9)
        return float((self.chance_cost - cost) / contrast)


class PointModel(Protocol):
    """A transform family given by where it maps points, not by a 3x4 matrix.

    ``map_points`` sends fixed points (N, 3, LPS mm) to moving points (B, N, 3)
    for parameters (B, P); ``pullback`` turns d cost / d moving point (B, N, 3)
    into d cost / d theta (B, P) (the transposed Jacobian of the mapping).
    """

    mode: str
    n_params: int

    def map_points(self, theta: np.ndarray, points: np.ndarray) -> np.ndarray: ...

    def pullback(self, theta: np.ndarray, points: np.ndarray, grad: np.ndarray
                 ) -> np.ndarray: ...


@dataclass
class PointObjective(DescriptorObjective):
    """Eq. 2 for a non-linear mapping: the moving point of every sample point comes from
    ``model.map_points`` (LPS mm) and the per-point kernel; same points, weights and
    conventions as ``DescriptorObjective``."""

    model: PointModel  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        self._physical = self.fixed.grid.to_physical(self.points)

    def _evaluate(self, theta: np.ndarray, want_grad: bool) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
        theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
        moved = self.model.map_points(theta, self._physical)  # (B, N, 3) LPS mm
        to_index = self.moving.grid.physical_to_index
        coords = np.ascontiguousarray(moved @ to_index[:3, :3].T + to_index[:3, 3])
        s, w, grad_s, grad_w = point_descriptor_cost(
            self.fixed_values, self.weights, coords, self._moving, self._valid, self._faces,
            self._fixed_scale, float(self.moving.scale), self.kind == "ssd", want_grad)
        self.evaluations += len(theta)
        cost, a, b = self._normalise(s, w)
        if not want_grad:
            return cost, np.zeros_like(theta), w
        grad_idx = a[:, None, None] * grad_s + b[:, None, None] * grad_w
        # Row-vector chain rule through index = A y + b: d cost / d y = (d cost / d index) A.
        grad_physical = grad_idx @ to_index[:3, :3]
        return cost, self.model.pullback(theta, self._physical, grad_physical), w


@dataclass
class LC2Objective:
    """Negative global LC2 (Wein et al. 2008) of the fixed image and the warped moving image.

    The moving volume (z-scored, working grid) is resampled trilinearly onto
    the fixed working grid for each parameter set; LC2 uses radii 3, 5 and 7
    voxels with the fixed image as the target and the moving image in the
    intensity + gradient role. No gradient: use a derivative-free optimiser.
    """

    fixed: np.ndarray
    fixed_grid: Grid
    moving: np.ndarray
    moving_grid: Grid
    model: TransformModel
    fixed_mask: np.ndarray | None = None
    #: Where the moving image has data (bool/float on the moving grid; None: everywhere).
    moving_valid: np.ndarray | None = None
    radii: tuple[int, ...] = (3, 5, 7)
    min_overlap: float = MIN_OVERLAP
    differentiable: bool = False
    evaluations: int = 0

    def warped_moving(self, theta: np.ndarray, volume: np.ndarray | None = None) -> np.ndarray:
        """The moving volume (or ``volume`` on its grid) resampled on the fixed grid (zero
        outside) for one theta."""
        from scipy import ndimage

        p, _ = self.model.matrices(np.atleast_2d(theta))
        mat = fold_grids(p, self.fixed_grid, self.moving_grid)[0]
        # map_coordinates wants (z, y, x) indices; permute the xyz matrix accordingly.
        perm = np.array([2, 1, 0])
        zyx = np.zeros((3, 4))
        zyx[:, :3] = mat[perm][:, perm]
        zyx[:, 3] = mat[perm, 3]
        source = self.moving if volume is None else volume
        return ndimage.affine_transform(source, zyx[:, :3], offset=zyx[:, 3],
                                        output_shape=self.fixed.shape, order=1, mode="constant",
                                        cval=0.0).astype(np.float32)

    def cost(self, theta: np.ndarray) -> np.ndarray:
        """-LC2 over the fixed voxels whose moving partner has data (overlap-normalised, as
        DescriptorObjective); 0 (no similarity) when they are fewer than ``min_overlap``
        of the fixed mask."""
        from disa.registration.similarity.lc2 import global_lc2

        theta = np.atleast_2d(theta)
        out = np.empty(len(theta))
        base = np.ones(self.fixed.shape, bool) if self.fixed_mask is None else self.fixed_mask
        moving_valid = (np.ones(self.moving.shape, np.float32) if self.moving_valid is None
                        else self.moving_valid.astype(np.float32))
        for i, th in enumerate(theta):
            warped = self.warped_moving(th)
            mask = base & (self.warped_moving(th, moving_valid) > 0.5)
            if mask.sum() < self.min_overlap * max(base.sum(), 1):
                out[i] = 0.0
                continue
            out[i] = -global_lc2(self.fixed, warped, radii=self.radii, mask=mask)
        self.evaluations += len(theta)
        return out

    def overlap(self, theta: np.ndarray) -> float:
        """Fraction of the fixed mask whose moving partner has data at ``theta`` (one pose)."""
        base = np.ones(self.fixed.shape, bool) if self.fixed_mask is None else self.fixed_mask
        moving_valid = (np.ones(self.moving.shape, np.float32) if self.moving_valid is None
                        else self.moving_valid.astype(np.float32))
        inside = base & (self.warped_moving(np.asarray(theta), moving_valid) > 0.5)
        return float(inside.sum() / max(int(base.sum()), 1))

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError("LC2 has no analytic gradient here: "
                                  "use a derivative-free optimiser")
