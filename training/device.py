"""Crop pairs, augmentation and LC2 targets on a torch device (the device loop's data path).

The CPU pipeline (`disa.training.pairs`) samples crops with scipy and sums LC2
moments with a numba kernel in float64: 5-11k supervised targets a second on
two cores. Here the same crops and targets are made from a scene already on
the device, in float32:

* crops: `sample_crops` resamples both scene images on the rotated/flipped,
  shifted grids of `disa.training.pairs.CropDraw` with ``grid_sample``
  (trilinear, align_corners=True, so index i is voxel i as in
  ``scipy.ndimage.map_coordinates``; the scene's border mode "nearest" is
  ``border`` padding, "mirror" is ``reflection``), then applies the drawn
  intensity gain and shift. The same draw gives the same crop as the CPU
  pipeline (tests/training/test_device.py).
* targets: LC2 (radii 3, 5, 7, both MR roles averaged) between the fixed
  crop's patch at descriptor node i (voxel margin + 4i) and the moving crop's
  patch at that centre plus a voxel offset o, for every node at once
  (`lc2_map`). Every moment of a cube is a box mean, computed separably with
  ``avg_pool3d`` (kernel 2r+1, stride 4, one axis at a time) over product
  volumes of the two crops shifted by o. Intensities are centred per crop
  first (LC2 ignores an intensity offset; centring keeps the fp32 moments
  away from cancellation). Offsets that are multiples of 4 pair node i with
  moving node i + o/4 (dense cross pairs); any other offset pairs it with a
  point between moving nodes, where the objective of registration reads the
  trilinear interpolation of the moving descriptors (`moving_at_offset`).

Units: voxels of the 2 mm training grid; tensors are (batch, channel, z, y, x).
Everything here runs in float32 whatever the autocast state of the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from disa.registration.similarity.lc2 import RIDGE, VAR_FLOOR
from disa.training.pairs import STRIDE, CropDraw, PairConfig

#: Local standard deviation radius of the registration weights w(p)
#: (`disa.registration.pipeline.fixed_weights`: stride // 2 + 1 voxels).
WEIGHT_RADIUS = STRIDE // 2 + 1
#: Nodes whose weight is below this fraction of the crop's largest carry none (as there).
WEIGHT_FLOOR = 0.05


def _local_grid(side: int, device: torch.device) -> torch.Tensor:
    """(side^3, 3) voxel offsets x - h of a side^3 grid, (z, y, x), float32."""
    h = (side - 1) / 2.0
    axis = torch.arange(side, dtype=torch.float32, device=device) - h
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([zz, yy, xx], dim=-1).reshape(-1, 3)


def _normalised(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel (z, y, x) coordinates -> grid_sample's (x, y, z) in [-1, 1] (align_corners)."""
    size = torch.tensor([max(s - 1, 1) for s in shape], dtype=coords.dtype, device=coords.device)
    return (coords / size * 2.0 - 1.0).flip(-1)


def sample_crops(
    images: torch.Tensor, draws: Sequence[CropDraw], side: int, mirror: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed and moving crops (B, 1, side, side, side) of one scene, augmented as drawn.

    ``images``: (2, 1, Z, Y, X) float32 on the device, the scene's fixed and moving
    images. Fixed voxel x samples ``centre + shared (x - h)``, moving voxel x samples
    ``centre + shift + shared relative (x - h)`` (`disa.training.pairs.sample_grid`).
    """
    device = images.device
    b = len(draws)
    local = _local_grid(side, device)

    def grids(matrices: np.ndarray, centres: np.ndarray) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(matrices, dtype=np.float32), device=device)
        c = torch.as_tensor(np.asarray(centres, dtype=np.float32), device=device)
        coords = torch.einsum("bij,nj->bni", m, local) + c[:, None, :]
        return _normalised(coords, images.shape[2:]).reshape(b * side, side, side, 3)

    grid = torch.stack([
        grids(np.stack([d.shared for d in draws]), np.stack([d.centre for d in draws])),
        grids(np.stack([d.moving_matrix for d in draws]),
              np.stack([d.centre + d.shift for d in draws])),
    ])
    out = F.grid_sample(images, grid, mode="bilinear",
                        padding_mode="reflection" if mirror else "border", align_corners=True)
    out = out.reshape(2, b, 1, side, side, side)

    def augment(crops: torch.Tensor, which: str) -> torch.Tensor:
        gain = torch.tensor([getattr(d, which).gain for d in draws], dtype=torch.float32,
                            device=device).view(b, 1, 1, 1, 1)
        shift = torch.tensor([getattr(d, which).shift for d in draws], dtype=torch.float32,
                             device=device).view(b, 1, 1, 1, 1)
        return crops * gain + shift

    return augment(out[0], "fixed_intensity"), augment(out[1], "moving_intensity")


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Central differences with edge replication, as
    `disa.registration.similarity.lc2.gradient_magnitude` (the edge slice gets half the
    one-sided difference); (B, 1, Z, Y, X) -> same."""
    p = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    gz = (p[:, :, 2:, 1:-1, 1:-1] - p[:, :, :-2, 1:-1, 1:-1]) * 0.5
    gy = (p[:, :, 1:-1, 2:, 1:-1] - p[:, :, 1:-1, :-2, 1:-1]) * 0.5
    gx = (p[:, :, 1:-1, 1:-1, 2:] - p[:, :, 1:-1, 1:-1, :-2]) * 0.5
    return torch.sqrt(gz * gz + gy * gy + gx * gx)


def box_means(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Means over the cubes of ``radius`` whose first one starts at voxel 0 of every axis,
    every STRIDE voxels: (B, C, L...) -> (B, C, (L - 2r - 1) // STRIDE + 1 ...).

    Separable (a mean of means of equal-size windows is the cube's mean, at 3 (2r + 1)
    rather than (2r + 1)^3 reads per output), each axis a strided window view reduced
    by ``mean``: the same sums as ``avg_pool3d`` with kernel (2r + 1, 1, 1) etc., about
    5x faster on a CPU, where avg_pool3d does not vectorise a kernel along z.
    """
    k = 2 * radius + 1
    for axis in (2, 3, 4):
        x = x.unfold(axis, k, STRIDE).mean(dim=-1)
    return x


def lc2_from_means(mp: torch.Tensor, mg: torch.Tensor, mu: torch.Tensor, epp: torch.Tensor,
                   epg: torch.Tensor, egg: torch.Tensor, epu: torch.Tensor, egu: torch.Tensor,
                   euu: torch.Tensor) -> torch.Tensor:
    """`disa.registration.similarity.lc2.lc2_from_moments` on the means of full cubes (torch)."""
    cpp = torch.clamp(epp - mp * mp, min=0.0)
    cgg = torch.clamp(egg - mg * mg, min=0.0)
    cuu = torch.clamp(euu - mu * mu, min=0.0)
    cpg = epg - mp * mg
    cpu = epu - mp * mu
    cgu = egu - mg * mu
    app, agg = cpp + RIDGE, cgg + RIDGE
    det = app * agg - cpg * cpg
    a = (agg * cpu - cpg * cgu) / det
    b = (app * cgu - cpg * cpu) / det
    explained = 2.0 * (a * cpu + b * cgu) - (a * a * cpp + 2.0 * a * b * cpg + b * b * cgg)
    return torch.clamp(explained / torch.clamp(cuu, min=VAR_FLOOR), 0.0, 1.0)


@dataclass(frozen=True)
class NodeRange:
    """Fixed nodes [lo, hi) per axis (z, y, x) whose partner at a voxel offset exists."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def count(self) -> int:
        return math.prod(h - lo for lo, h in zip(self.lo, self.hi, strict=True))

    def slices(self) -> tuple[slice, slice, slice, slice, slice]:
        return (slice(None), slice(None),
                *(slice(lo, h) for lo, h in zip(self.lo, self.hi, strict=True)))

    def intersect(self, other: NodeRange) -> NodeRange | None:
        lo = tuple(max(a, b) for a, b in zip(self.lo, other.lo, strict=True))
        hi = tuple(min(a, b) for a, b in zip(self.hi, other.hi, strict=True))
        return NodeRange(lo, hi) if all(h > lo for lo, h in zip(lo, hi, strict=True)) else None  # type: ignore[arg-type]


def node_range(offset: Sequence[int], k: int) -> NodeRange | None:
    """Fixed nodes i (k per axis) for which the moving point 4i + ``offset`` (voxels) lies
    within the moving node grid, so its descriptor is an interpolation of existing nodes
    (its LC2 cube then lies inside the padded crop, since margin > the largest radius)."""
    lo, hi = [], []
    for o in offset:
        q, frac = divmod(int(o), STRIDE)
        lo.append(max(0, -q))
        hi.append(min(k, k - q - (1 if frac else 0)))
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return NodeRange(tuple(lo), tuple(hi))  # type: ignore[arg-type]


@dataclass
class PreparedCrops:
    """Padded crops centred per crop, with their gradient magnitudes (fp32, on the device)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    grad_fixed: torch.Tensor
    grad_moving: torch.Tensor


def prepare(fixed: torch.Tensor, moving: torch.Tensor) -> PreparedCrops:
    fixed = fixed.float()
    moving = moving.float()
    f = fixed - fixed.mean(dim=(2, 3, 4), keepdim=True)
    m = moving - moving.mean(dim=(2, 3, 4), keepdim=True)
    return PreparedCrops(f, m, gradient_magnitude(fixed), gradient_magnitude(moving))


def _window(x: torch.Tensor, start: Sequence[int], length: Sequence[int]) -> torch.Tensor:
    return x[:, :, start[0]:start[0] + length[0], start[1]:start[1] + length[1],
             start[2]:start[2] + length[2]]


def _pooled(q: torch.Tensor, counts: Sequence[int], cfg: PairConfig) -> list[torch.Tensor]:
    """Cube means of ``q`` (a window of the largest radius around ``counts`` nodes) for each
    of ``cfg.radii``: list of (B, C, *counts)."""
    rmax = max(cfg.radii)
    out = []
    for r in cfg.radii:
        i = rmax - r
        sub = q[:, :, i:q.shape[2] - i, i:q.shape[3] - i, i:q.shape[4] - i]
        out.append(box_means(sub, r)[:, :, :counts[0], :counts[1], :counts[2]])
    return out


def _single(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The five per-voxel quantities of one crop's moments: x, x^2, g, g^2, x g."""
    return torch.cat([x, x * x, g, g * g, x * g], dim=1)


class LC2Targets:
    """LC2 targets of one step's crops at any number of offsets.

    The moments of one crop alone (five per radius) are pooled once at every node and
    sliced for each node offset; only the three cross moments (f m, g_f m, g_m f) are
    pooled per offset, and the moving crop's own moments only for offsets between nodes.
    """

    def __init__(self, crops: PreparedCrops, cfg: PairConfig) -> None:
        self.crops, self.cfg = crops, cfg
        k, rmax = cfg.out_side, max(cfg.radii)
        self.length_all = [STRIDE * (k - 1) + 2 * rmax + 1] * 3
        start = [cfg.margin - rmax] * 3
        self.fixed_nodes = _pooled(_single(_window(crops.fixed, start, self.length_all),
                                           _window(crops.grad_fixed, start, self.length_all)),
                                   [k] * 3, cfg)
        self._moving_nodes: list[torch.Tensor] | None = None

    def moving_nodes(self) -> list[torch.Tensor]:
        if self._moving_nodes is None:
            start = [self.cfg.margin - max(self.cfg.radii)] * 3
            c, k = self.crops, self.cfg.out_side
            self._moving_nodes = _pooled(_single(_window(c.moving, start, self.length_all),
                                                 _window(c.grad_moving, start, self.length_all)),
                                         [k] * 3, self.cfg)
        return self._moving_nodes

    def __call__(self, offset: Sequence[int], nodes: NodeRange) -> torch.Tensor:
        """Symmetric multi-radius LC2 (B, nz, ny, nx) between fixed node i in ``nodes`` and
        the moving crop's patch centred ``offset`` voxels (z, y, x) from it (the target of
        `disa.training.pair_lc2.pair_lc2`, averaged over both roles and over the radii)."""
        cfg, c = self.cfg, self.crops
        rmax = max(cfg.radii)
        counts = [h - lo for lo, h in zip(nodes.lo, nodes.hi, strict=True)]
        f_start = [cfg.margin + STRIDE * lo - rmax for lo in nodes.lo]
        m_start = [s + int(o) for s, o in zip(f_start, offset, strict=True)]
        length = [STRIDE * (n - 1) + 2 * rmax + 1 for n in counts]
        side = c.fixed.shape[-1]
        if min(m_start) < 0 or max(s + n for s, n in zip(m_start, length, strict=True)) > side:
            raise ValueError(f"offset {tuple(offset)} takes moving cubes outside the padded crop")
        f, gf = _window(c.fixed, f_start, length), _window(c.grad_fixed, f_start, length)
        m, gm = _window(c.moving, m_start, length), _window(c.grad_moving, m_start, length)
        cross = _pooled(torch.cat([f * m, gf * m, gm * f], dim=1), counts, cfg)
        fixed_sl = nodes.slices()
        if all(int(o) % STRIDE == 0 for o in offset):
            moved = NodeRange(
                tuple(lo + int(o) // STRIDE for lo, o in zip(nodes.lo, offset, strict=True)),  # type: ignore[arg-type]
                tuple(h + int(o) // STRIDE for h, o in zip(nodes.hi, offset, strict=True)))  # type: ignore[arg-type]
            moving = [t[moved.slices()] for t in self.moving_nodes()]
        else:
            moving = _pooled(_single(m, gm), counts, cfg)
        total = torch.zeros((c.fixed.shape[0], *counts), dtype=torch.float32,
                            device=c.fixed.device)
        for fixed_r, moving_r, cross_r in zip(self.fixed_nodes, moving, cross, strict=True):
            ef, eff, egf, egfgf, efgf = fixed_r[fixed_sl].unbind(1)
            em, emm, egm, egmgm, emgm = moving_r.unbind(1)
            efm, egfm, egmf = cross_r.unbind(1)
            # Role 0: the fixed patch gives intensity p and gradient g, the moving one u.
            fixed_mr = lc2_from_means(ef, egf, em, eff, efgf, egfgf, efm, egfm, emm)
            moving_mr = lc2_from_means(em, egm, ef, emm, emgm, egmgm, efm, egmf, eff)
            total = total + 0.5 * (fixed_mr + moving_mr)
        return total / len(cfg.radii)


def lc2_map(crops: PreparedCrops, offset: Sequence[int], nodes: NodeRange,
            cfg: PairConfig) -> torch.Tensor:
    """One offset's targets (see `LC2Targets.__call__`); a step with several offsets
    should build one `LC2Targets` and call it for each."""
    return LC2Targets(crops, cfg)(offset, nodes)


def moving_at_offset(moving: torch.Tensor, offset: Sequence[int],
                     nodes: NodeRange) -> torch.Tensor:
    """The moving descriptors (B, C, k, k, k) read at node i + offset / 4 for i in ``nodes``:
    trilinear interpolation between nodes, as the registration objective reads them."""
    parts: list[tuple[int, float]] = []  # per axis: (whole nodes, fraction)
    for o in offset:
        q, frac = divmod(int(o), STRIDE)
        parts.append((q, frac / STRIDE))
    out: torch.Tensor | None = None
    for corner in np.ndindex(2, 2, 2):
        weight = 1.0
        index = []
        for (q, frac), c, lo, hi in zip(parts, corner, nodes.lo, nodes.hi, strict=True):
            weight *= frac if c else 1.0 - frac
            index.append(slice(lo + q + c, hi + q + c))
        if weight == 0.0:
            continue
        term = weight * moving[:, :, index[0], index[1], index[2]]
        out = term if out is None else out + term
    assert out is not None
    return out


def node_weights(fixed: torch.Tensor, cfg: PairConfig) -> torch.Tensor:
    """w at every fixed node (B, k, k, k): the registration's point weights
    (`disa.registration.pipeline.fixed_weights`: local standard deviation in a cube of
    radius 3 voxels; nodes under 5 % of the crop's largest get 0), from the padded crop.
    The intensity augmentation only scales a crop's weights, which are used normalised."""
    r, k = WEIGHT_RADIUS, cfg.out_side
    start = cfg.margin - r
    x = fixed.float()[:, :, start:, start:, start:]
    x = x - x.mean(dim=(2, 3, 4), keepdim=True)
    means = box_means(torch.cat([x, x * x], dim=1), r)[:, :, :k, :k, :k]
    std = torch.sqrt(torch.clamp(means[:, 1] - means[:, 0] ** 2, min=0.0))
    peak = std.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    return torch.where(std > WEIGHT_FLOOR * peak, std, torch.zeros_like(std))


@dataclass(frozen=True)
class StepOffsets:
    """One step's offsets, shared by its crop pairs (voxels, z y x).

    ``node``: dense cross pairs, multiples of STRIDE (node i with moving node i + o/4).
    ``shift``: pairs (s, s + d) of nearby offsets for the shift-difference terms.
    """

    node: tuple[tuple[int, int, int], ...]
    shift: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]


def draw_offsets(rng: np.random.Generator, k: int, node_offsets: int, node_reach: int,
                 shift_pairs: int, shift_range: int, shift_step: int) -> StepOffsets:
    """Random offsets of one step (see `StepOffsets`), each with at least one valid node.

    Node offsets: uniform in +-``node_reach`` nodes per axis, not all zero (the CPU
    pipeline's cross pairs: weighting each by its number of valid nodes gives the same
    spread of j - i). Shift pairs: s uniform in +-``shift_range`` voxels per axis,
    d = a random direction scaled to a length uniform in [1, ``shift_step``] voxels and
    rounded to whole voxels (not zero).
    """
    node: list[tuple[int, int, int]] = []
    while len(node) < node_offsets:
        delta = rng.integers(-node_reach, node_reach + 1, size=3)
        if np.any(delta != 0) and node_range(STRIDE * delta, k) is not None:
            node.append(tuple(int(v) for v in STRIDE * delta))  # type: ignore[arg-type]
    shift: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []
    while len(shift) < shift_pairs:
        s = rng.integers(-shift_range, shift_range + 1, size=3)
        u = rng.normal(size=3)
        d = np.rint(u / np.linalg.norm(u) * rng.uniform(1.0, shift_step)).astype(int)
        if not np.any(d != 0):
            continue
        a, b = node_range(s, k), node_range(s + d, k)
        if a is None or b is None or a.intersect(b) is None:
            continue
        shift.append((tuple(int(v) for v in s), tuple(int(v) for v in s + d)))  # type: ignore[arg-type]
    return StepOffsets(tuple(node), tuple(shift))
