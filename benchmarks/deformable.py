"""Deformable registration, Learn2Reg-style figures: DISA and MIND-SSC through one optimiser.

    python benchmarks/deformable.py [--quick] [--cases N] [--similarities disa,mind]
    python benchmarks/deformable.py --speed [--size 160]

Pairs: real anatomy with labels, two synthetic modalities of it (the training
package's synthesis: T1 -> T2, PD or CT contrast), the moving one deformed by a
known smooth field (Gaussian bumps of up to ``--max-mm``) on top of a small
rigid offset. Source (``--source``): the melage ICBM152 head (31 brain labels;
``pip install --no-deps melage``; its anatomy is in DISA's training set) or the
nimare MNI152 NLin6Asym head (held out from DISA's training; CSF/GM/WM labels
from k-means), else the engine's ellipsoid phantom. Dice uses the brain labels
(tissue CSF, GM, WM or deep grey) of at least 200 voxels.

Every pair runs ``register(mode="deformable")`` (rigid search, affine, then the
deformable stage) for each similarity, with the same options. Reported, per
similarity, over all pairs:

    Dice     mean label Dice after registration (brain labels of >= 200 voxels)
    Dice30   mean of the worst 30 % of (pair, label) Dice values (robustness)
    HD95     mean over labels of the 95th percentile symmetric surface distance (mm)
    SDlogJ   standard deviation of log det J of the output field (smoothness)
    neg J    fraction of det J <= 0 (folding)
    time     the deformable stage (s) and the whole registration (s)

plus the same label figures before registration (initial), for the true
transform (what interpolation of labels allows) and for the linear stage alone.
DISA runs only when model/weights/disa.onnx is installed; otherwise the table
says it was skipped.

``--speed``: wall time of the deformable stage alone on a SIZE^3 volume at 2 mm
(control grid at stride 4), for MIND-SSC maps of a phantom and for 16-channel
stride-4 maps (DISA's layout; the stage's cost does not depend on the network
weights), with the phantom's own weights and with every node weighted (the
worst case). Target: <= 10 s at 160^3 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from common import machine
from scipy import ndimage

from disa.registration import phantom as ph
from disa.registration.displacement import residual_transform
from disa.registration.grid import Grid
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register

#: Labels smaller than this many voxels (2 mm) are left out of Dice: a few voxels say nothing.
MIN_LABEL_VOXELS = 200


@dataclass
class Case:
    """One benchmark pair: images, label maps (same grids) and the true mapping."""

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    truth: sitk.Transform
    labels: list[int]


def _grid_for(shape: tuple[int, int, int], spacing: float) -> Grid:
    size = (shape[2], shape[1], shape[0])
    return ph.make_grid(size, (spacing,) * 3)


def head_case(seed: int, moving_setting: str, max_mm: float, crop: int | None = None,
              source: str = "icbm152-head") -> Case | None:
    """A T1 / ``moving_setting`` pair of a packaged head, deformed; None without its package."""
    try:
        from disa.training.sources import SPACING_MM, TISSUES, load_volume
        from disa.training.synthesis import synthesize
        volume = load_volume(source)
    except (ImportError, LookupError):
        return None
    rng = np.random.default_rng(seed)
    fixed_array = synthesize(volume, "t1", rng)
    moving_array = synthesize(volume, moving_setting, rng)
    labels = volume.labels
    if crop is not None:  # a centred sub-volume (quick mode)
        lo = [max(0, (n - crop) // 2) for n in labels.shape]
        box = tuple(slice(a, a + crop) for a in lo)
        fixed_array, moving_array, labels = fixed_array[box], moving_array[box], labels[box]
    grid = _grid_for(labels.shape, SPACING_MM)
    extent = 0.3 * float(np.min(grid.extent_mm))
    bumps = ph.random_bumps(rng, count=6, max_mm=max_mm, sigma_mm=20.0, extent_mm=extent)
    angles = tuple(float(v) for v in rng.uniform(-3.0, 3.0, 3))
    shift = tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3))
    linear = ph.rigid_truth(angles, shift)
    inverse_linear = linear.GetInverse()
    # The moving image at y shows the anatomy at S(L^-1(y)), S(z) = z + g(z).
    points = ph.grid_points(grid)
    anatomy = ph._apply_affine(inverse_linear, points)
    anatomy = anatomy + bumps(anatomy)
    index = grid.to_index(anatomy)[:, ::-1].T  # (z, y, x) rows for map_coordinates
    warped = ndimage.map_coordinates(moving_array, index, order=1, mode="nearest")
    warped_labels = ndimage.map_coordinates(labels, index, order=0, mode="constant", cval=0)
    residual = bumps.inverse(points).reshape(*grid.shape, 3)
    truth = residual_transform(linear, residual, grid)
    counts = np.bincount(labels.ravel(), minlength=len(volume.label_tissue))
    brain = {TISSUES.index(t) for t in ("csf", "gm", "wm", "deep")}
    keep = [k for k in range(len(counts))
            if int(volume.label_tissue[k]) in brain and counts[k] >= MIN_LABEL_VOXELS]
    return Case(
        name=f"{source} t1->{moving_setting} seed {seed}",
        fixed=grid.image_like(fixed_array.astype(np.float32)),
        moving=grid.image_like(warped.reshape(grid.shape).astype(np.float32)),
        fixed_labels=grid.image_like(labels.astype(np.int16)),
        moving_labels=grid.image_like(warped_labels.reshape(grid.shape).astype(np.int16)),
        truth=truth, labels=keep)


def phantom_case(seed: int, max_mm: float, size: int = 64) -> Case:
    """The engine's ellipsoid phantom (8 labels), deformed: the fallback without melage."""
    rng = np.random.default_rng(seed)
    grid = ph.make_grid((size, size, size), (2.0, 2.0, 2.0))
    anatomy = ph.default_anatomy(scale_mm=0.8 * size)
    bumps = ph.random_bumps(rng, count=4, max_mm=max_mm, sigma_mm=18.0, extent_mm=0.5 * size)
    linear = ph.rigid_truth(tuple(rng.uniform(-3, 3, 3)), tuple(rng.uniform(-4, 4, 3)))
    pair = ph.make_deformed_pair(linear, bumps, grid, seed=seed, anatomy=anatomy)
    return Case(f"phantom seed {seed}", pair.fixed, pair.moving, pair.fixed_labels,
                pair.moving_labels, pair.truth, list(range(1, 9)))


def warp_labels(case: Case, transform: sitk.Transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(case.moving_labels, case.fixed_labels, transform,
                                                sitk.sitkNearestNeighbor, 0))


def dice(a: np.ndarray, b: np.ndarray, labels: list[int]) -> np.ndarray:
    out = []
    for k in labels:
        x, y = a == k, b == k
        total = x.sum() + y.sum()
        out.append(2.0 * np.sum(x & y) / total if total else 1.0)
    return np.array(out)


def hd95(a: np.ndarray, b: np.ndarray, labels: list[int], spacing: float) -> np.ndarray:
    """Per label: 95th percentile of the symmetric surface distance (mm)."""
    out = []
    for k in labels:
        x, y = a == k, b == k
        if not x.any() or not y.any():
            out.append(np.nan)
            continue
        sx = x & ~ndimage.binary_erosion(x)
        sy = y & ~ndimage.binary_erosion(y)
        dx = ndimage.distance_transform_edt(~y, sampling=spacing)[sx]
        dy = ndimage.distance_transform_edt(~x, sampling=spacing)[sy]
        out.append(float(np.percentile(np.concatenate([dx, dy]), 95)))
    return np.array(out)


def label_figures(case: Case, transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    fixed = sitk.GetArrayFromImage(case.fixed_labels)
    warped = warp_labels(case, transform)
    spacing = float(case.fixed.GetSpacing()[0])
    return dice(warped, fixed, case.labels), hd95(warped, fixed, case.labels, spacing)


def run_case(case: Case, similarity: str, options: dict) -> dict:
    opts = RegistrationOptions(mode="deformable", similarity=similarity, **options)
    t0 = time.perf_counter()
    result = register(case.fixed, case.moving, opts)
    total = time.perf_counter() - t0
    assert result.field_transform is not None and result.deformation is not None
    d, h = label_figures(case, result.field_transform)
    d_lin, _ = label_figures(case, result.transform)
    return {"dice": d, "hd95": h, "dice_linear": d_lin, "time": total,
            "time_deformable": sum(v for k, v in result.timings.items()
                                   if k.startswith("deformable_")),
            "sdlogj": result.deformation["sd_log_jacobian"],
            "negj": result.deformation["negative_jacobian_fraction"]}


def _row(name: str, dice_values: list[np.ndarray], hd: list[np.ndarray] | None = None,
         sdlogj: str = "", negj: str = "", times: str = "") -> str:
    flat = np.concatenate(dice_values)
    worst = np.sort(flat)[: max(1, round(0.3 * len(flat)))]
    hd_text = f"{np.nanmean(np.concatenate(hd)):.2f}" if hd else ""
    return (f"| {name} | {flat.mean():.3f} | {worst.mean():.3f} | {hd_text} | {sdlogj} | "
            f"{negj} | {times} |")


def speed(size: int) -> None:
    """Time the deformable stage alone (see the module docstring, ``--speed``)."""
    from disa.registration.deformable import control_maps, deformable_stage
    from disa.registration.descriptor_map import DescriptorMap
    from disa.registration.pipeline import descriptor_maps, fixed_weights, prepare

    grid = ph.make_grid((size, size, size), (2.0, 2.0, 2.0))
    values = ph.render(ph.grid_points(grid), ph.default_anatomy(scale_mm=0.8 * size),
                       ph.contrast_table(9, 1), 4)
    fixed = grid.image_like(values.reshape(grid.shape).astype(np.float32))
    prepared = prepare(fixed, 2.0, None)
    mind, stride, _ = descriptor_maps(prepared, "mind", RegistrationOptions(similarity="mind"))
    rng = np.random.default_rng(0)
    g4 = prepared.grid.strided(4)
    data = ndimage.gaussian_filter(rng.normal(size=(*g4.shape, 16)), (1, 1, 1, 0))
    data /= np.maximum(np.linalg.norm(data, axis=-1, keepdims=True), 1.0)
    surrogate = DescriptorMap(np.ascontiguousarray(data.astype(np.float32)), g4)
    linear = np.hstack([np.eye(3), np.zeros((3, 1))])

    def shifted(m: DescriptorMap) -> DescriptorMap:  # the moving map: 3 mm away
        g = m.grid
        return DescriptorMap(m.data, Grid(g.shape, g.origin + 3.0, g.spacing, g.direction),
                             m.scale)

    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"Deformable stage alone, {size}^3 at 2 mm (best of 2 runs, numba warm):\n")
    print("| maps | weighted nodes | warp | costs | coupling | Adam | stage total |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f_map, weights, kind in (
            ("MIND-SSC (12 ch, 2 mm)", mind.quantised(), fixed_weights(prepared, stride), "ssd"),
            ("MIND-SSC, every node weighted", mind.quantised(),
             np.ones(mind.grid.shape, np.float32), "ssd"),
            ("DISA layout (16 ch, stride 4)", surrogate.quantised(),
             fixed_weights(prepared, 4), "dot"),
            ("DISA layout, every node weighted", surrogate.quantised(),
             np.ones(g4.shape, np.float32), "dot")):
        best = None
        for _ in range(2):
            t0 = time.perf_counter()
            stage = deformable_stage(f_map, shifted(f_map), weights, linear, kind, fixed, 2.0)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, stage.timings)
        assert best is not None
        total, timings = best
        nodes = int(np.count_nonzero(control_maps(f_map, weights, 2.0, 4)[1] > 0))
        parts = " | ".join(f"{timings[f'deformable_{k}']:.2f}"
                           for k in ("warp", "costs", "coupling", "adam"))
        print(f"| {name} | {nodes} | {parts} | {total:.2f} s |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small pair (< 1 min)")
    parser.add_argument("--cases", type=int, default=6, help="pairs (default 6)")
    parser.add_argument("--similarities", default="disa,mind")
    parser.add_argument("--max-mm", type=float, default=8.0,
                        help="largest bump of the true deformation (mm)")
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--source", default="icbm152-head",
                        choices=["icbm152-head", "mni152-nlin6asym"],
                        help="anatomy of the pairs (mni152-nlin6asym: held out from DISA)")
    parser.add_argument("--speed", action="store_true", help="time the stage alone")
    parser.add_argument("--size", type=int, default=160, help="--speed volume size (voxels)")
    args = parser.parse_args()
    if args.speed:
        speed(args.size)
        return

    from disa.model.card import default_model_path

    similarities = [s.strip() for s in args.similarities.split(",") if s.strip()]
    skipped = []
    if "disa" in similarities and default_model_path() is None:
        similarities.remove("disa")
        skipped.append("DISA skipped: model/weights/disa.onnx is not installed")
    settings = ("t2", "ct", "pd")
    cases: list[Case] = []
    n_cases = 1 if args.quick else args.cases
    for i in range(n_cases):
        case = head_case(100 + i, settings[i % len(settings)], args.max_mm,
                         crop=64 if args.quick else None, source=args.source)
        cases.append(case if case is not None else phantom_case(100 + i, args.max_mm,
                                                                size=48 if args.quick else 64))
    options = {"starts": 50 if args.quick else args.starts, "rotation_range": 10.0,
               "translation_range": 15.0, "init": "geometry"}

    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"Pairs: {len(cases)} ({cases[0].name}, ...), {len(cases[0].labels)} labels; options "
          f"{options}")
    for line in skipped:
        print(line)
    print()
    print("| method | Dice | Dice30 | HD95 mm | SDlogJ | neg J | time deformable / total s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    initial = [label_figures(c, sitk.Transform()) for c in cases]
    truth = [label_figures(c, c.truth) for c in cases]
    print(_row("initial (identity)", [d for d, _ in initial], [h for _, h in initial]))
    print(_row("true transform", [d for d, _ in truth], [h for _, h in truth]))
    for similarity in similarities:
        runs = [run_case(c, similarity, options) for c in cases]
        print(_row(f"{similarity} linear stage only", [r["dice_linear"] for r in runs]))
        print(_row(f"{similarity} deformable", [r["dice"] for r in runs],
                   [r["hd95"] for r in runs],
                   sdlogj=f"{np.mean([r['sdlogj'] for r in runs]):.3f}",
                   negj=f"{np.mean([r['negj'] for r in runs]):.2e}",
                   times=f"{np.mean([r['time_deformable'] for r in runs]):.2f} / "
                         f"{np.mean([r['time'] for r in runs]):.1f}"))


if __name__ == "__main__":
    main()
