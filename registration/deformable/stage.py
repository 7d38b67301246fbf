"""Dense deformable stage on descriptor maps, after the rigid or affine stage.

The mapping is T(x) = L(x + v(x)): L the linear stage's 3x4 matrix (fixed ->
moving, LPS mm) and v a displacement field (LPS mm) on a control grid in the
fixed frame, linear between nodes. The control grid is the fixed descriptor
grid (DISA: stride 4) or, for maps computed at the working spacing (MIND-SSC),
every k-th voxel of it so that its spacing is ``control_stride`` working voxels
too: both similarities run through the same optimiser at the same cost.

1. Warp: the moving map is sampled once at L(y) on a grid y in the fixed frame
   that is twice as fine as the control grid (plus a margin of the window).
2. Cost volume: for every weighted control node, the descriptor cost (dot or
   SSD, as the linear stage) of every displacement in a window of +-radius
   half-node steps: plain shifts on the warped fine grid.
3. Convex coupling (ConvexAdam-like): alternately smooth the field and
   re-choose per node the displacement minimising cost + pull |d - smooth|^2,
   the pull growing over the iterations. Gives a smooth, large-capture start.
4. Adam on v (every node, sub-voxel): similarity through the per-point kernel
   (exact trilinear interpolation of the moving map at L(x + v)), plus a
   diffusion regulariser and a penalty that keeps det J above
   ``jacobian_floor`` at every cell corner (no folding). The similarity is
   read at the nodes, or (``sub_points`` > 0, DISA) at that many points per
   weighted node jittered within its cell, with v interpolated there: read at
   nodes only, a coarse moving map pulls every node onto moving grid nodes
   (the grid-alignment bias of docs/DESIGN.md).
5. Fine level (``fine_stride``, 2 working voxels: 4 mm at 2 mm): where the fixed
   map is finer than the control nodes (MIND-SSC), v is interpolated exactly onto
   a control grid of that stride (``upsample_field``) and Adam runs again there
   (``fine_steps``, same energy and normalisation), the similarity read at its
   weighted nodes: 8x the similarity points and field detail the 8 mm grid cannot
   hold. The result's grid is then the fine one. DISA's stride-4 maps have no finer
   nodes: the level is skipped.

Energies are normalised so that one setting serves DISA and MIND: costs are
divided by the median cost contrast of the window (mean - min over the
window), and node weights by their mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk
from numba import njit
from scipy import ndimage

from disa.core.errors import CancelledError
from disa.core.grid import Grid
from disa.registration.deformable.discrete import cost_volume, coupled_argmin
from disa.registration.deformable.regularise import diffusion, jacobian_penalty
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.kernels import point_descriptor_cost, sample_descriptors
from disa.registration.transform.displacement import covering_grid


@dataclass(frozen=True)
class DeformableSettings:
    """Settings of the deformable stage. Distances in mm unless named otherwise."""

    #: Control node spacing in working voxels (the DISA network's output stride).
    control_stride: int = 4
    #: Half-width of the discrete search window (mm); None: 1.5 control spacings.
    search_radius_mm: float | None = None
    #: Weight of the diffusion regulariser (relative; 1 is the tuned default).
    regularisation: float = 1.0
    #: Pull of the coupling iterations, in (cost contrast) per (half-node step)^2.
    coupling: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    #: Gaussian smoothing of the coupled field, in control nodes.
    smoothing_nodes: float = 1.0
    adam_steps: int = 80
    #: det J is kept above this at every cell corner.
    jacobian_floor: float = 0.2
    jacobian_weight: float = 10.0
    #: Similarity points per weighted node for Adam, jittered within its cell (0: the
    #: node itself). The pipeline uses 8 for DISA's 8 mm maps, 0 for MIND-SSC.
    sub_points: int = 0
    #: Control stride (working voxels) of a final, finer level (0: none): the field is
    #: interpolated onto that grid and Adam runs again there, the similarity read at its
    #: nodes. Only where the fixed map is finer than the first level's nodes (MIND-SSC at
    #: the working spacing: yes; DISA's stride-4 maps: no, the level is skipped).
    fine_stride: int = 2
    #: Adam steps of the fine level (20 kept most of 40's gain, 30 all of it, at 1.5x the time).
    fine_steps: int = 20
    #: Diffusion weight of the fine level relative to ``regularisation`` (0.3 lost Dice
    #: on every benchmark pair, 1.5 matched 1).
    fine_regularisation: float = 1.0


@dataclass
class DeformableResult:
    """v (Z, Y, X, 3) LPS mm on ``grid`` (fixed frame): fixed x -> L(x + v(x))."""

    grid: Grid
    field: np.ndarray
    min_corner_jacobian: float
    similarity_before: float
    similarity_after: float
    timings: dict[str, float] = field(default_factory=dict)


#: Largest cost volume (bytes) the stage allocates; the window shrinks beyond it.
COST_VOLUME_MAX_BYTES = 512 * 2**20
#: Base diffusion weight at ``regularisation`` 1 (tuned on phantoms; see DESIGN.md).
DIFFUSION_WEIGHT = 2.5


def control_maps(fixed: DescriptorMap, weights: np.ndarray, working_spacing_mm: float,
                 control_stride: int) -> tuple[DescriptorMap, np.ndarray]:
    """The fixed map and weights read at the control nodes: every k-th voxel, k the power
    of 2 that brings the map's spacing to ``control_stride`` working voxels (k = 1 for DISA
    at its stride 4). Weights are the maximum over the node's cell, centred on it.

    Why subsample rather than pool: the moving map stays at its own resolution and is
    interpolated where the nodes land, as in the linear stage; pooling both maps blurred
    MIND-SSC so much that label Dice dropped by 0.02-0.03 (phantom and ICBM152 head).
    """
    target = control_stride * working_spacing_mm
    k = 2 ** max(0, round(math.log2(target / float(fixed.grid.spacing.min()))))
    if k == 1:
        return fixed, weights
    nodes = DescriptorMap(np.ascontiguousarray(fixed.data[::k, ::k, ::k]),
                          fixed.grid.strided(k), fixed.scale)
    cell_max = ndimage.maximum_filter(weights, size=k + 1, mode="constant")
    return nodes, np.ascontiguousarray(cell_max[::k, ::k, ::k])


def _fold(linear: np.ndarray, moving_grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Physical fixed point -> moving index: (3x3, 3) of index = A x + b."""
    h = moving_grid.physical_to_index
    return h[:3, :3] @ linear[:, :3], h[:3, :3] @ linear[:, 3] + h[:3, 3]


def _warp_fine(moving: DescriptorMap, linear: np.ndarray, grid: Grid, radius: int
               ) -> np.ndarray:
    """Moving descriptors (Zf, Yf, Xf, C) float32 at L(y) for y on ``grid`` refined 2x with
    a margin of ``radius`` fine steps: fine voxel 2 i + radius is control node i."""
    fine = Grid(shape=tuple(2 * (n - 1) + 1 + 2 * radius for n in grid.shape),
                origin=grid.to_physical(np.full((1, 3), -radius / 2.0))[0],
                spacing=grid.spacing / 2.0, direction=grid.direction)
    z, y, x = np.meshgrid(*(np.arange(n) for n in fine.shape), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
    a, b = _fold(linear, moving.grid)
    coords = fine.to_physical(index) @ a.T + b
    data = sample_descriptors(np.ascontiguousarray(moving.data), coords, float(moving.scale))
    return data.reshape(*fine.shape, moving.channels)


@njit(cache=True)
def _point_coords(field, corners, weights, base, a, out):
    """out[p] = base[p] + a @ (sum_c weights[p, c] field[corners[p, c]]): moving indices
    of similarity points whose displacement is interpolated from 8 nodes (flat field)."""
    for p in range(corners.shape[0]):
        vx = 0.0
        vy = 0.0
        vz = 0.0
        for c in range(8):
            k = corners[p, c]
            w = weights[p, c]
            vx += w * field[k, 0]
            vy += w * field[k, 1]
            vz += w * field[k, 2]
        for i in range(3):
            out[0, p, i] = base[p, i] + a[i, 0] * vx + a[i, 1] * vy + a[i, 2] * vz


@njit(cache=True)
def _scatter_to_nodes(grad_index, corners, weights, a, out):
    """out[corners[p, c]] += weights[p, c] a^T grad_index[p]: the transpose of
    ``_point_coords`` (d cost / d node displacement, flat field)."""
    for p in range(corners.shape[0]):
        g0 = a[0, 0] * grad_index[0, p, 0] + a[1, 0] * grad_index[0, p, 1] \
            + a[2, 0] * grad_index[0, p, 2]
        g1 = a[0, 1] * grad_index[0, p, 0] + a[1, 1] * grad_index[0, p, 1] \
            + a[2, 1] * grad_index[0, p, 2]
        g2 = a[0, 2] * grad_index[0, p, 0] + a[1, 2] * grad_index[0, p, 1] \
            + a[2, 2] * grad_index[0, p, 2]
        for c in range(8):
            k = corners[p, c]
            w = weights[p, c]
            out[k, 0] += w * g0
            out[k, 1] += w * g1
            out[k, 2] += w * g2


@njit(cache=True, fastmath=True)
def _adam_update(v, m, s, grad, g_diff, g_jac, alpha, beta, beta1, beta2, c1, c2, lr):
    """One Adam step in place on flat arrays: g = grad + alpha g_diff + beta g_jac, moments
    m, s with bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t, v -= lr m^ / sqrt(s^)."""
    for i in range(v.shape[0]):
        g = grad[i] + alpha * g_diff[i] + beta * g_jac[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * g
        s[i] = beta2 * s[i] + (1.0 - beta2) * g * g
        v[i] -= lr * (m[i] / c1) / (np.sqrt(s[i] / c2) + 1e-12)


@dataclass
class SimilarityPoints:
    """Where the Adam stage reads the similarity: physical positions (P, 3) at zero
    displacement, the 8 control nodes (flat padded-grid indices, P x 8) whose trilinear
    weights (P x 8) give each point's displacement, the fixed descriptors there (P, C) with
    their dequantisation scale, and the point weights (P,)."""

    positions: np.ndarray
    corners: np.ndarray
    corner_weights: np.ndarray
    fixed_values: np.ndarray
    fixed_scale: float
    weights: np.ndarray


def similarity_points(nodes: np.ndarray, offset: np.ndarray, grid: Grid, f_map: DescriptorMap,
                      node_weight: np.ndarray, count: int, seed: int = 0) -> SimilarityPoints:
    """The weighted nodes themselves (``count`` 0), or ``count`` points per node jittered
    uniformly within +-0.5 node, the fixed map interpolated there. ``nodes``: padded-grid
    indices (x, y, z); ``f_map`` is indexed by the padded index minus ``offset``."""
    if count == 0:
        points = nodes.astype(np.float64)
        values = np.ascontiguousarray(f_map.data[tuple((nodes - offset)[:, ::-1].T)])
        flat = np.ravel_multi_index((nodes[:, 2], nodes[:, 1], nodes[:, 0]), grid.shape)
        corners = np.repeat(flat[:, None], 8, axis=1)
        weights = np.zeros((len(nodes), 8))
        weights[:, 0] = 1.0
        return SimilarityPoints(grid.to_physical(points), corners, weights, values,
                                float(f_map.scale), node_weight)
    rng = np.random.default_rng(seed)
    base = np.repeat(nodes.astype(np.float64), count, axis=0)
    upper = np.array(grid.shape[::-1], dtype=np.float64) - 1.0
    points = np.clip(base + rng.uniform(-0.5, 0.5, base.shape), 0.0, upper)
    low = np.minimum(np.floor(points), upper - 1).astype(np.int64)
    frac = points - low
    corners = np.empty((len(points), 8), dtype=np.int64)
    weights = np.empty((len(points), 8))
    for c in range(8):
        bit = np.array([c & 1, (c >> 1) & 1, (c >> 2) & 1])
        idx = low + bit
        corners[:, c] = np.ravel_multi_index((idx[:, 2], idx[:, 1], idx[:, 0]), grid.shape)
        weights[:, c] = np.prod(np.where(bit == 1, frac, 1.0 - frac), axis=1)
    values = sample_descriptors(np.ascontiguousarray(f_map.data), points - offset,
                                float(f_map.scale))
    return SimilarityPoints(grid.to_physical(points), corners, weights, values, 1.0,
                            np.repeat(node_weight, count) / count)


def _smooth(values: np.ndarray, confidence: np.ndarray, sigma: float) -> np.ndarray:
    """Confidence-weighted Gaussian smoothing of a field (Z, Y, X, 3): nodes without
    confidence take their neighbours' values, fading to zero far from any (the floor of
    the normaliser: no division by ~0 in the background)."""
    num = np.stack([ndimage.gaussian_filter(values[..., k] * confidence, sigma, mode="nearest")
                    for k in range(3)], axis=-1)
    den = ndimage.gaussian_filter(confidence, sigma, mode="nearest")
    return num / np.maximum(den, 0.1)[..., None]


def deformable_stage(fixed: DescriptorMap, moving: DescriptorMap, weights: np.ndarray,
                     linear: np.ndarray, kind: Literal["dot", "ssd"], fixed_image: sitk.Image,
                     working_spacing_mm: float, settings: DeformableSettings | None = None,
                     cancel: Callable[[], bool] | None = None) -> DeformableResult:
    """Find v with fixed x -> L(x + v(x)) on descriptor maps (see the module docstring).

    Args:
        fixed, moving: descriptor maps of the fixed and (re-oriented) moving image.
        weights: w(p) on the fixed map's grid (zero: no similarity at that node).
        linear: (3, 4) physical fixed -> moving matrix of the linear stage (LPS mm).
        kind: "dot" (DISA) or "ssd" (MIND-SSC), as the linear stage.
        fixed_image: the fixed image; the control grid is padded to cover it.
        working_spacing_mm: the pipeline's working spacing.
    """
    settings = settings or DeformableSettings()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def check() -> None:
        if cancel is not None and cancel():
            raise CancelledError("registration cancelled")

    f_map, w_map = control_maps(fixed, weights, working_spacing_mm, settings.control_stride)
    grid0 = f_map.grid
    weighted = int(np.count_nonzero(w_map > 0))
    radius = _search_radius(float(grid0.spacing.min()), settings.search_radius_mm, weighted)
    grid, inner = covering_grid(grid0, fixed_image)
    offset = np.array([inner[2].start, inner[1].start, inner[0].start])  # (x, y, z) pad
    if weighted == 0:  # nothing to match: the linear stage stands
        return DeformableResult(grid=grid, field=np.zeros((*grid.shape, 3)),
                                min_corner_jacobian=1.0, similarity_before=0.0,
                                similarity_after=0.0, timings=timings)

    nodes0, node_weight, fixed_values = _weighted_nodes(f_map, w_map)
    padded_nodes = nodes0 + offset
    warped = _warp_fine(moving, linear, grid0, radius)
    t1 = time.perf_counter()
    timings["deformable_warp"] = t1 - t0
    check()

    costs = cost_volume(fixed_values, float(f_map.scale), 2 * nodes0 + radius, warped, radius,
                        kind == "ssd")
    del warped  # not needed past the cost volume: freed before the coupling allocates
    contrast = _normalise_costs(costs, node_weight)
    t2 = time.perf_counter()
    timings["deformable_costs"] = t2 - t1
    check()

    steps = _coupled_steps(costs, radius, padded_nodes, node_weight, grid.shape, settings)
    del costs
    # Steps along grid axes -> LPS mm: v = D (s/2 * steps).
    v = (steps * (grid.spacing / 2.0)) @ grid.direction.T
    t3 = time.perf_counter()
    timings["deformable_coupling"] = t3 - t2
    check()

    points = similarity_points(padded_nodes, offset, grid, f_map, node_weight,
                               settings.sub_points)
    v, before, after, min_det = _adam(v, grid, points, len(padded_nodes), moving, linear, kind,
                                      contrast, settings, check)
    t4 = time.perf_counter()
    timings["deformable_adam"] = t4 - t3
    fine = _fine_level(v, grid, fixed, weights, moving, linear, kind, fixed_image,
                       working_spacing_mm, contrast, settings, check)
    if fine is not None:
        grid, v, after, min_det = fine
        timings["deformable_fine"] = time.perf_counter() - t4
    return DeformableResult(grid=grid, field=v, min_corner_jacobian=min_det,
                            similarity_before=before, similarity_after=after, timings=timings)


def _search_radius(h: float, radius_mm: float | None, weighted: int) -> int:
    """Half-width of the discrete search window in half-node steps (h/2 mm, h the control
    grid's smallest spacing in mm): ``radius_mm`` (default 1.5 h), shrunk until the cost
    volume of ``weighted`` nodes fits in ``COST_VOLUME_MAX_BYTES``."""
    radius_mm = radius_mm or 1.5 * h
    radius = max(1, round(radius_mm / (h / 2)))
    while radius > 1 and weighted * (2 * radius + 1) ** 3 * 4 > COST_VOLUME_MAX_BYTES:
        radius -= 1  # a whole-body grid would not fit: a smaller window, not a crash
    return radius


def _weighted_nodes(f_map: DescriptorMap, w_map: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The control nodes with weight > 0: their ITK indices (x, y, z) on the control grid
    (N, 3), their weights divided by the mean (N,), and the fixed descriptors there (N, C)."""
    zz, yy, xx = np.nonzero(w_map > 0)
    nodes = np.stack([xx, yy, zz], axis=1)
    node_weight = w_map[zz, yy, xx].astype(np.float64)
    node_weight /= node_weight.mean()
    return nodes, node_weight, np.ascontiguousarray(f_map.data[zz, yy, xx])


def _normalise_costs(costs: np.ndarray, node_weight: np.ndarray) -> float:
    """Normalise the cost volume (N nodes, window) in place and return the contrast.

    Each node's costs are shifted to a minimum of 0 and scaled by its weight over the
    median cost contrast (mean - min over the window), so that one coupling schedule
    serves DISA (dot) and MIND (ssd), whose raw costs differ in scale.
    """
    costs -= costs.min(axis=1, keepdims=True)
    contrast = float(np.median(costs.mean(axis=1)))
    contrast = contrast if contrast > 0 else 1.0  # a flat window: leave the scale alone
    costs *= (node_weight / contrast).astype(np.float32)[:, None]
    return contrast


def _coupled_steps(costs: np.ndarray, radius: int, padded_nodes: np.ndarray,
                   node_weight: np.ndarray, shape: tuple[int, ...],
                   settings: DeformableSettings) -> np.ndarray:
    """Convex coupling on the padded control grid (``shape``, Z, Y, X): the smooth field of
    displacements (Z, Y, X, 3) in half-node steps along the grid axes (x, y, z).

    ``padded_nodes``: the weighted nodes' indices (x, y, z) on that grid, ``costs`` their
    normalised cost volume over the window of +-``radius`` steps. Each round re-chooses
    every node's step against cost + pull |d - smooth|^2, the pull growing over
    ``settings.coupling``; nodes without weight only take their neighbours' steps.
    """
    at = (padded_nodes[:, 2], padded_nodes[:, 1], padded_nodes[:, 0])
    confidence = np.zeros(shape)
    confidence[at] = node_weight
    steps = np.zeros((*shape, 3))
    chosen = coupled_argmin(costs, radius, np.zeros((len(costs), 3)), 0.0)
    for pull in settings.coupling:
        steps[at] = chosen
        smooth = _smooth(steps, confidence, settings.smoothing_nodes)
        target = smooth[at]
        chosen = coupled_argmin(costs, radius, target, pull)
        steps = smooth
    steps[at] = chosen
    return _smooth(steps, confidence, settings.smoothing_nodes)


def upsample_field(v: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    """The trilinear field v (Z, Y, X, 3, LPS mm) on ``grid`` read at the nodes of
    ``target`` (same frame); nodes beyond ``grid`` take its edge values. Exact where
    ``target``'s nodes are ``grid``'s nodes and points between them (a grid refined
    by an integer factor on the same origin): the mapping does not change."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in target.shape), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
    at = grid.to_index(target.to_physical(index))[:, ::-1].T  # (z, y, x) rows
    return np.stack([ndimage.map_coordinates(v[..., k], at, order=1, mode="nearest")
                     for k in range(3)], axis=-1).reshape(*target.shape, 3)


def _fine_level(v: np.ndarray, grid: Grid, fixed: DescriptorMap, weights: np.ndarray,
                moving: DescriptorMap, linear: np.ndarray, kind: str,
                fixed_image: sitk.Image, working_spacing_mm: float, contrast: float,
                settings: DeformableSettings, check: Callable[[], None]
                ) -> tuple[Grid, np.ndarray, float, float] | None:
    """The final level (``settings.fine_stride``): v interpolated onto a control grid of
    that stride, then Adam there with the similarity read at its weighted nodes (the
    fixed map read every k-th voxel, exact values: no interpolation), the first level's
    cost contrast normalising it. Returns (grid, field, similarity after, min corner
    det J), or None when off or when the fixed map is no finer than ``grid``."""
    if settings.fine_stride <= 0:
        return None
    f_map, w_map = control_maps(fixed, weights, working_spacing_mm, settings.fine_stride)
    h = float(f_map.grid.spacing.min())
    if h > 0.75 * float(grid.spacing.min()):
        return None
    zz, yy, xx = np.nonzero(w_map > 0)
    if len(zz) == 0:
        return None
    fine_grid, inner = covering_grid(f_map.grid, fixed_image)
    offset = np.array([inner[2].start, inner[1].start, inner[0].start])
    node_weight = w_map[zz, yy, xx].astype(np.float64)
    node_weight /= node_weight.mean()
    nodes = np.stack([xx, yy, zz], axis=1) + offset
    points = similarity_points(nodes, offset, fine_grid, f_map, node_weight, 0)
    start = upsample_field(v, grid, fine_grid)
    check()
    field_, _, after, min_det = _adam(
        start, fine_grid, points, len(nodes), moving, linear, kind, contrast, settings, check,
        steps=settings.fine_steps,
        regularisation=settings.regularisation * settings.fine_regularisation,
        step_mm=(h / 16.0, h / 64.0))
    return fine_grid, field_, after, min_det


def _adam(v: np.ndarray, grid: Grid, points: SimilarityPoints, n_weighted: int,
          moving: DescriptorMap, linear: np.ndarray, kind: str, contrast: float,
          settings: DeformableSettings, check: Callable[[], None], steps: int | None = None,
          regularisation: float | None = None, step_mm: tuple[float, float] | None = None
          ) -> tuple[np.ndarray, float, float, float]:
    """Adam on the node displacements (mm) of E = similarity + diffusion + folding penalty,
    the similarity read at ``points`` (``n_weighted`` weighted nodes normalise the terms).

    ``steps``, ``regularisation`` (relative diffusion weight) and ``step_mm`` (first and
    last Adam step, mm) default to the settings' first level: ``adam_steps``,
    ``regularisation`` and h/8 -> h/64 (h the grid's smallest spacing, mm).
    Returns the field, the normalised similarity term before and after, and the
    smallest corner det J of the result.
    """
    a, b = _fold(linear, moving.grid)
    kernel_weights = (points.weights / (contrast * n_weighted)).astype(np.float32)
    moving_data = np.ascontiguousarray(moving.data)
    valid = moving.validity
    faces = moving.faces
    total = float(kernel_weights.sum())
    ssd = kind == "ssd"
    index_to_physical = grid.direction * grid.spacing[None, :]
    regularisation = settings.regularisation if regularisation is None else regularisation
    alpha = DIFFUSION_WEIGHT * regularisation / n_weighted
    beta = settings.jacobian_weight / n_weighted
    h = float(grid.spacing.min())
    base = points.positions @ a.T + b  # moving index of every point at zero displacement
    coords = np.empty((1, len(base), 3))

    def similarity(field_: np.ndarray, want_grad: bool) -> tuple[float, np.ndarray]:
        """Normalised similarity term and its gradient on the whole field (Z, Y, X, 3)."""
        _point_coords(field_.reshape(-1, 3), points.corners, points.corner_weights, base, a,
                      coords)
        s, w, grad_s, grad_w = point_descriptor_cost(
            points.fixed_values, kernel_weights, coords, moving_data, valid, faces,
            points.fixed_scale, float(moving.scale), ssd, want_grad)
        # The mean over the points that land on moving data (objective.py), scaled back to
        # the sum's size so that the regularisation weights keep their meaning.
        overlap = max(float(w[0]), 1e-12)
        mean = float(s[0]) / overlap
        grad = np.zeros_like(field_)
        if want_grad:
            grad_index = (grad_s - mean * grad_w) * (total / overlap)
            _scatter_to_nodes(grad_index, points.corners, points.corner_weights, a,
                              grad.reshape(-1, 3))
        return mean * total, grad

    v = np.array(v, dtype=np.float64, order="C")  # updated in place below
    before = similarity(v, False)[0]
    m = np.zeros_like(v)
    s = np.zeros_like(v)
    beta1, beta2 = 0.9, 0.999
    lr_start, lr_end = step_mm if step_mm is not None else (h / 8.0, h / 64.0)
    steps = settings.adam_steps if steps is None else steps
    min_det = 1.0
    for step in range(steps):
        check()
        _, grad = similarity(v, True)
        _, g_diff = diffusion(v, grid.spacing)
        _, g_jac, min_det = jacobian_penalty(v, index_to_physical, settings.jacobian_floor)
        lr = lr_start * (lr_end / lr_start) ** (step / max(steps - 1, 1))
        _adam_update(v.reshape(-1), m.reshape(-1), s.reshape(-1), grad.reshape(-1),
                     g_diff.reshape(-1), g_jac.reshape(-1), alpha, beta, beta1, beta2,
                     1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1), lr)
    _, _, min_det = jacobian_penalty(v, index_to_physical, settings.jacobian_floor)
    after = similarity(v, False)[0]
    return v, before, after, min_det
