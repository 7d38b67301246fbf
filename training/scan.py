"""A quick optimum-bias scan for checkpoint selection (torch, any device).

`benchmarks/optimum_bias.py` measures how far a rigid refinement started at the
true pose walks on perfectly aligned pairs; v5 walks 9.1 mm on average where
LC2 walks 1.5 mm, and the held-out MSE does not show it. That benchmark needs
the registration engine, SimpleITK and exported weights, and takes minutes; this
scan is its translation-only proxy, cheap enough to run at every checkpoint of
the device loop, on the training machine (the GPU one has neither the engine's
image I/O nor the held-out data):

* pairs: validation scenes of the *training* volumes and of phantoms from a
  seed stream of their own (neither the training stream nor evaluation's held-out
  one), in the settings of the benchmark's training-anatomy cases; each is an
  axis-aligned crop of ``side`` voxels around the scene's focus, the moving
  setting resampled on the same grid shifted by a random 0-``max_offset`` voxels
  per axis (the benchmark's 0-8 mm), so no node of one grid sits on the other's;
* objective: the engine's, sum_p F(p) . M(p + t) over points p drawn among the
  fixed nodes in proportion to the registration weights w and jittered within
  their descriptor cell, both maps read by trilinear interpolation, zero outside
  the moving map (`disa.registration.similarity.objective`);
* search: from the true translation, move to the best of the 26 neighbours
  while that improves the objective, on a 1 mm lattice, then 0.5 mm; the drift
  is the distance (mm) between where that stops and the truth.

Rotations are not searched, so the figures are not the benchmark's; they rank
checkpoints by the error that moves the optimum, which the MSE does not.
``val_mse`` (dense zero-offset targets of the same pairs) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from disa.training import device as dv
from disa.training import sources
from disa.training.network import clip_to_unit_ball
from disa.training.pairs import STRIDE, CropDraw, IntensityDraw, PairConfig, make_scene

SPACING_MM = 2.0
#: Settings of the training-anatomy cases of benchmarks/optimum_bias.py, then two more
#: training pairs so that phantoms see the label and CT settings.
SCAN_SETTINGS: tuple[tuple[str, str], ...] = (
    ("t1", "t2"), ("t2", "t1"), ("t1", "ct"), ("pd", "lut"), ("us", "t1"), ("labels", "ct"),
)
#: Phantom seed stream of the scan (`sources.phantom_seed` uses 0 for training, 1 for
#: held-out evaluation).
VALIDATION_STREAM = 2
_NEIGHBOURS = np.array([d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], dtype=np.float64) - 1


@dataclass(frozen=True)
class ScanConfig:
    """Size of the scan (voxels of the 2 mm grid unless stated)."""

    pairs: int = 6
    side: int = 80
    points: int = 2048
    max_offset: float = 4.0
    #: Lattice steps of the search, voxels (1 mm, then 0.5 mm).
    steps: tuple[float, ...] = (0.5, 0.25)
    max_moves: int = 48
    seed: int = 90210


@dataclass
class ScanPair:
    """One validation pair: crops (1, 1, n, n, n), the translation t* (voxels, z y x) at
    which moving point p + t* is fixed point p, and the fixed sample points (M, 3)."""

    name: str
    fixed: torch.Tensor
    moving: torch.Tensor
    truth: np.ndarray
    points: torch.Tensor


def _validation_volumes(volumes: Sequence[sources.Volume], cfg: ScanConfig,
                        phantom_shape: tuple[int, int, int]) -> list[sources.Volume]:
    out = list(volumes)
    rng = np.random.default_rng(np.random.SeedSequence([0xD15A, VALIDATION_STREAM, cfg.seed]))
    out.append(sources.make_phantom(rng, phantom_shape, subject="phantom-validation-0"))
    return out


def make_scan_pairs(volumes: Sequence[sources.Volume], cfg: ScanConfig,
                    phantom_shape: tuple[int, int, int] = sources.PHANTOM_SHAPE
                    ) -> list[ScanPair]:
    """``cfg.pairs`` validation pairs (CPU tensors), cycling over ``volumes`` + a phantom."""
    if cfg.side % STRIDE or cfg.side < 6 * STRIDE:
        raise ValueError(f"scan side must be a multiple of {STRIDE} and >= {6 * STRIDE}")
    pool = _validation_volumes(volumes, cfg, phantom_shape)
    pairs = []
    for j in range(cfg.pairs):
        rng = np.random.default_rng([cfg.seed, j])
        volume = pool[j % len(pool)]
        settings = SCAN_SETTINGS[j % len(SCAN_SETTINGS)]
        scene = make_scene(volume, settings, rng, float(cfg.side))
        offset = rng.uniform(0.0, cfg.max_offset, 3)
        plain = IntensityDraw(1.0, 1.0, 0.0)
        draw = CropDraw(np.eye(3), offset, np.eye(3), np.asarray(scene.focus, np.float64),
                        plain, plain)
        images = torch.from_numpy(np.stack(scene.images))[:, None]
        fixed, moving = dv.sample_crops(images, [draw], cfg.side, scene.border_mode == "mirror")
        points = _sample_points(fixed, rng, cfg)
        # Moving voxel y shows scene point focus + offset + y - h, fixed voxel x shows
        # focus + x - h: the same point when y = x - offset.
        pairs.append(ScanPair(f"{volume.subject} {settings[0]}->{settings[1]}", fixed, moving,
                              -offset, points))
    return pairs


def _sample_points(fixed: torch.Tensor, rng: np.random.Generator, cfg: ScanConfig
                   ) -> torch.Tensor:
    """Points (M, 3) voxels: nodes drawn in proportion to w, jittered within their cell."""
    n = cfg.side
    w = dv.node_weights(fixed, PairConfig(crop=n - 2 * STRIDE, margin=STRIDE,
                                          radii=(dv.WEIGHT_RADIUS,)))[0]
    # Nodes of that call are voxels STRIDE + 4i; keep those a full cell from the border.
    w = w.double().numpy()
    w[[0, -1], :, :] = 0.0
    w[:, [0, -1], :] = 0.0
    w[:, :, [0, -1]] = 0.0
    flat = w.ravel()
    if flat.sum() <= 0:
        flat = np.ones_like(flat)
    pick = rng.choice(flat.size, size=cfg.points, p=flat / flat.sum())
    nodes = np.stack(np.unravel_index(pick, w.shape), axis=1).astype(np.float64)
    jitter = rng.uniform(-STRIDE / 2, STRIDE / 2, size=(cfg.points, 3))
    return torch.from_numpy((STRIDE + STRIDE * nodes + jitter).astype(np.float32))


def _read(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Descriptors (1, C, K, K, K) read at voxel points (S, M, 3): (S, M, C), zero outside."""
    k = maps.shape[2:]
    size = torch.tensor([max(s - 1, 1) for s in k], dtype=points.dtype, device=points.device)
    grid = (points / STRIDE / size * 2.0 - 1.0).flip(-1)
    out = F.grid_sample(maps, grid[None, :, :, None, :], mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[0, :, :, :, 0].permute(1, 2, 0)


def climb(evaluate: Callable[[np.ndarray], np.ndarray], start: np.ndarray,
          steps: Sequence[float], max_moves: int) -> np.ndarray:
    """Greedy ascent on a lattice: from ``start``, move to the best of the 26 neighbours
    at each step size in turn while that raises ``evaluate`` ((S, 3) -> (S,))."""
    t = np.asarray(start, dtype=np.float64)
    best = float(evaluate(t[None])[0])
    for h in steps:
        for _ in range(max_moves):
            candidates = t + h * _NEIGHBOURS
            values = evaluate(candidates)
            i = int(np.argmax(values))
            if values[i] <= best + 1e-7:
                break
            t, best = candidates[i], float(values[i])
    return t


def run_scan(net: torch.nn.Module, pairs: Sequence[ScanPair], cfg: ScanConfig,
             device: torch.device) -> dict[str, Any]:
    """Drift (mm) of the objective's optimum from the truth on every pair, its mean and
    median, and the dense zero-offset MSE of the same pairs (fp32, eval mode)."""
    was_training = net.training
    net.eval()
    drifts, errors, rows = [], [], []
    margin = 2 * STRIDE
    pair_cfg = PairConfig(crop=cfg.side - 2 * margin, margin=margin)
    try:
        with torch.no_grad():
            for pair in pairs:
                x = torch.cat([pair.fixed, pair.moving]).to(device)
                d = clip_to_unit_ball(
                    net.forward_unnormalised(x.contiguous(memory_format=torch.channels_last_3d)
                                             ).float(), dim=1)
                d_f, d_m = d[:1], d[1:]
                points = pair.points.to(device)
                f_at = _read(d_f, points[None])[0]  # (M, C)

                def evaluate(shifts: np.ndarray, d_m: torch.Tensor = d_m,
                             points: torch.Tensor = points, f_at: torch.Tensor = f_at
                             ) -> np.ndarray:
                    t = torch.as_tensor(shifts, dtype=torch.float32, device=points.device)
                    m_at = _read(d_m, points[None] + t[:, None, :])
                    return (m_at * f_at[None]).sum(-1).mean(-1).double().cpu().numpy()

                found = climb(evaluate, pair.truth, cfg.steps, cfg.max_moves)
                drift = float(np.linalg.norm(found - pair.truth)) * SPACING_MM
                # Targets at nodes margin/4 + i of both crops (cubes inside the crop).
                crops = dv.prepare(x[:1], x[1:])
                k = pair_cfg.out_side
                target = dv.lc2_map(crops, (0, 0, 0), dv.NodeRange((0, 0, 0), (k, k, k)),
                                    pair_cfg)
                inner = slice(margin // STRIDE, margin // STRIDE + k)
                pred = (d_f * d_m)[:, :, inner, inner, inner].sum(1)
                errors.append(((pred - target) ** 2).flatten().double().cpu())
                drifts.append(drift)
                rows.append({"pair": pair.name, "drift_mm": round(drift, 3)})
    finally:
        net.train(was_training)
    return {
        "drift_mm_mean": float(np.mean(drifts)),
        "drift_mm_median": float(np.median(drifts)),
        "val_mse": float(torch.cat(errors).mean()),
        "pairs": rows,
    }
