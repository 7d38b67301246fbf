"""Deformable registration, Learn2Reg-style figures: DISA and MIND-SSC through one
optimiser, against deformable peers (ANTs SyN, elastix B-spline, SimpleITK B-spline).

    python benchmarks/deformable.py [--quick] [--cases N] [--source S[,S...]]
                                    [--similarities disa,mind] [--peers a,b,... | none]
    python benchmarks/deformable.py --speed [--size 160]

Pairs: real anatomy with labels, two synthetic modalities of it (the training
package's synthesis), the moving one deformed by a known smooth field (Gaussian
bumps of up to ``--max-mm``) on top of a small rigid offset. ``--cases`` pairs
per source; sources (``--source``, comma-separated, each its own table rows):

    icbm152-head       melage ICBM152 head (31 labels; ``pip install --no-deps
                       melage``; its anatomy is in DISA's training set); T1 -> T2,
                       CT, PD in turn. Dice over brain labels (CSF, GM, WM, deep grey)
    mni152-nlin6asym   nimare MNI152 NLin6Asym head (held out from DISA's training;
                       CSF/GM/WM labels from k-means); T1 -> T2, CT, PD in turn
    xcat-chest         the gecatsim XCAT torso (held out; body outline, both lungs,
                       sternum: the only organ surfaces its file has besides the
                       ears), cropped to the lungs' box + 16 mm. Pairs in turn:
                       "mr": fixed CT (made from the labels) -> moving FLAIR-like MR;
                       "us": fixed ultrasound fan (held-out steep attenuation, drawn
                       as benchmarks/realistic_cases.py draws torso fans: apex in
                       tissue, energy reaching a third of the fan, a tissue boundary
                       inside) -> moving CT. Figures of a "us" pair are taken inside
                       the fan only (labels cut to it, TRE over its voxels).

A source whose package is missing falls back to the engine's ellipsoid phantom.
Dice uses labels of at least 200 voxels (inside the evaluation region).

Methods (same pairs, same run, one at a time): DISA and MIND-SSC,
``register(mode="deformable")`` (rigid search, affine, then the deformable
stage) with the same options; the peers of benchmarks/deformable_peers.py with
their documented default recipes (that module's docstring says which). A peer
that raises counts as a failed pair, its message in the report. Reported per
source and method:

    Dice     mean label Dice after registration
    Dice30   mean of the worst 30 % of (pair, label) Dice values (robustness)
    HD95     mean over labels of the 95th percentile symmetric surface distance (mm)
    TRE      dense TRE: mean over the fixed image's labelled voxels (inside the
             evaluation region) of |T_est(x) - T_true(x)| (mm), both mappings
             fixed -> moving
    SDlogJ   standard deviation of log det J of the mapping on the fixed grid
    neg J    fraction of det J <= 0 (folding); both as the engine reports them
    time     the whole registration (s); for the engine also its deformable stage

plus the same figures before registration (identity), for the true transform
and, for the engine, its linear stage alone. DISA runs only when
model/weights/disa.onnx is installed; otherwise the report says it was
skipped. Every outcome is appended to ``OUT/deformable.jsonl`` as it finishes and
``OUT/deformable.md`` (the table) is rewritten after each, so an interrupted run
leaves a table; ``--resume`` keeps the outcomes there and runs the rest.

``--speed``: wall time of the deformable stage alone on a SIZE^3 volume at 2 mm
(control grid at stride 4), for MIND-SSC maps of a phantom and for 16-channel
stride-4 maps (DISA's layout; the stage's cost does not depend on the network
weights), with the phantom's own weights and with every node weighted (the
worst case), the fine level (MIND-SSC only) in its own column. Target: <= 10 s at
160^3 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import deformable_peers as peers
import numpy as np
import SimpleITK as sitk
from common import machine, run_pending
from scipy import ndimage

from disa.core.grid import Grid
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register
from disa.registration.transform.displacement import residual_transform
from disa.training import phantom as ph

#: Labels smaller than this many voxels (2 mm) are left out of Dice: a few voxels say nothing.
MIN_LABEL_VOXELS = 200
SOURCES = ("icbm152-head", "mni152-nlin6asym", "xcat-chest")
HEAD_SETTINGS = ("t2", "ct", "pd")
TORSO_PAIRS = ("mr", "us")
#: Voxels kept around the XCAT lungs' (and sternum's) bounding box.
TORSO_MARGIN = 8
RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    """One benchmark pair: images, label maps (same grids) and the true mapping.

    ``mask``: the evaluation region on the fixed grid ((z, y, x) bool; None: all of
    it), e.g. an ultrasound fan; Dice, HD95 and TRE are taken inside it.
    """

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    truth: sitk.Transform
    labels: list[int]
    mask: np.ndarray | None = None
    source: str = ""


def _grid_for(shape: tuple[int, int, int], spacing: float) -> Grid:
    size = (shape[2], shape[1], shape[0])
    return ph.make_grid(size, (spacing,) * 3)


def deformed_case(name: str, fixed_array: np.ndarray, moving_array: np.ndarray,
                  labels: np.ndarray, rng: np.random.Generator, max_mm: float,
                  label_ok: Callable[[int], bool], mask: np.ndarray | None = None,
                  source: str = "") -> Case:
    """The pair with the moving image deformed: a rigid offset (+-3 deg, +-4 mm) and 6
    Gaussian bumps of up to ``max_mm`` (sigma 20 mm) within the central 60 %.

    The moving image at y shows the anatomy at S(L^-1(y)), S(z) = z + g(z), so the
    true fixed -> moving mapping is T(x) = L(S^-1(x)). ``label_ok(k)``: whether label
    k counts (those of fewer than MIN_LABEL_VOXELS voxels in the region never do).
    """
    from disa.training.sources import SPACING_MM

    grid = _grid_for(labels.shape, SPACING_MM)
    extent = 0.3 * float(np.min(grid.extent_mm))
    bumps = ph.random_bumps(rng, count=6, max_mm=max_mm, sigma_mm=20.0, extent_mm=extent)
    angles = tuple(float(v) for v in rng.uniform(-3.0, 3.0, 3))
    shift = tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3))
    linear = ph.rigid_truth(angles, shift)
    inverse_linear = linear.GetInverse()
    points = ph.grid_points(grid)
    anatomy = ph._apply_affine(inverse_linear, points)
    anatomy = anatomy + bumps(anatomy)
    index = grid.to_index(anatomy)[:, ::-1].T  # (z, y, x) rows for map_coordinates
    warped = ndimage.map_coordinates(moving_array, index, order=1, mode="nearest")
    warped_labels = ndimage.map_coordinates(labels, index, order=0, mode="constant", cval=0)
    residual = bumps.inverse(points).reshape(*grid.shape, 3)
    truth = residual_transform(linear, residual, grid)
    region = labels if mask is None else np.where(mask, labels, 0)
    counts = np.bincount(region.ravel(), minlength=int(labels.max()) + 1)
    keep = [k for k in range(1, len(counts)) if counts[k] >= MIN_LABEL_VOXELS and label_ok(k)]
    return Case(
        name=name,
        fixed=grid.image_like(fixed_array.astype(np.float32)),
        moving=grid.image_like(warped.reshape(grid.shape).astype(np.float32)),
        fixed_labels=grid.image_like(labels.astype(np.int16)),
        moving_labels=grid.image_like(warped_labels.reshape(grid.shape).astype(np.int16)),
        truth=truth, labels=keep, mask=mask, source=source)


def head_case(seed: int, moving_setting: str, max_mm: float, crop: int | None = None,
              source: str = "icbm152-head") -> Case | None:
    """A T1 / ``moving_setting`` pair of a packaged head, deformed; None without its package."""
    try:
        from disa.training.sources import TISSUES, load_volume
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
    brain = {TISSUES.index(t) for t in ("csf", "gm", "wm", "deep")}
    return deformed_case(f"{source} t1->{moving_setting} seed {seed}", fixed_array,
                         moving_array, labels, rng, max_mm,
                         lambda k: int(volume.label_tissue[k]) in brain, source=source)


def torso_volume(crop: int | None = None):  # -> disa.training.sources.Volume
    """The XCAT torso cut to its lungs' and sternum's box plus TORSO_MARGIN voxels
    (``crop``: then a centred cube of that many voxels, quick mode)."""
    from disa.training.sources import load_volume

    volume = load_volume("xcat-chest")
    organs = np.argwhere(volume.labels >= 2)
    lo = np.maximum(organs.min(0) - TORSO_MARGIN, 0)
    hi = np.minimum(organs.max(0) + TORSO_MARGIN + 1, volume.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    if crop is not None:
        mid = [(s.start + s.stop) // 2 for s in box]
        box = tuple(slice(max(s.start, m - crop // 2), min(s.stop, m - crop // 2 + crop))
                    for s, m in zip(box, mid, strict=True))
    return dataclasses.replace(volume, native=volume.native[box],
                               tissues=volume.tissues[(slice(None), *box)],
                               labels=volume.labels[box])


def torso_fan(volume, rng: np.random.Generator):  # -> UltrasoundResult
    """An ultrasound fan of the held-out steep-attenuation family on the volume's grid,
    drawn (up to 20 times) as realistic_cases.ultrasound draws one: aimed at a body
    voxel near the centre, apex in solid tissue, energy reaching a third of the fan, a
    tissue boundary inside (``fan_structure``)."""
    from realistic_cases import body_mask, draw_fan

    from disa.training.synthesis import simulate_ultrasound

    return draw_fan(volume, rng, body_mask(volume), simulate_ultrasound)


def torso_case(seed: int, pair: str, max_mm: float, crop: int | None = None) -> Case | None:
    """An XCAT torso pair ("mr": CT -> FLAIR-like MR; "us": ultrasound fan -> CT), the
    moving image deformed; None without gecatsim."""
    try:
        from disa.training.synthesis import synthesize
        volume = torso_volume(crop)
    except (ImportError, LookupError, FileNotFoundError, ValueError):
        return None
    rng = np.random.default_rng(seed)
    if pair == "mr":
        fixed_array = synthesize(volume, "native", rng)
        moving_array = synthesize(volume, "flair", rng)
        mask = None
        name = f"xcat-chest ct->flair seed {seed}"
    elif pair == "us":
        us = torso_fan(volume, rng)
        fixed_array, mask = us.image, us.fan
        moving_array = synthesize(volume, "native", rng)
        name = f"xcat-chest us->ct seed {seed}"
    else:
        raise ValueError(f"unknown torso pair {pair!r}; known: {TORSO_PAIRS}")
    return deformed_case(name, fixed_array, moving_array, volume.labels, rng, max_mm,
                         lambda k: True, mask=mask, source="xcat-chest")


def phantom_case(seed: int, max_mm: float, size: int = 64) -> Case:
    """The engine's ellipsoid phantom (8 labels), deformed: the fallback without melage."""
    rng = np.random.default_rng(seed)
    grid = ph.make_grid((size, size, size), (2.0, 2.0, 2.0))
    anatomy = ph.default_anatomy(scale_mm=0.8 * size)
    bumps = ph.random_bumps(rng, count=4, max_mm=max_mm, sigma_mm=18.0, extent_mm=0.5 * size)
    linear = ph.rigid_truth(tuple(rng.uniform(-3, 3, 3)), tuple(rng.uniform(-4, 4, 3)))
    pair = ph.make_deformed_pair(linear, bumps, grid, seed=seed, anatomy=anatomy)
    return Case(f"phantom seed {seed}", pair.fixed, pair.moving, pair.fixed_labels,
                pair.moving_labels, pair.truth, list(range(1, 9)), source="phantom")


def make_cases(sources: Sequence[str], n_cases: int, max_mm: float, quick: bool = False
               ) -> list[Case]:
    """``n_cases`` pairs per source (seeds 100, 101, ...; head settings T2, CT, PD in
    turn; torso pairs MR, US in turn); a phantom pair where a source is missing."""
    cases: list[Case] = []
    for source in sources:
        for i in range(n_cases):
            if source == "xcat-chest":
                case = torso_case(100 + i, TORSO_PAIRS[i % len(TORSO_PAIRS)], max_mm,
                                  crop=64 if quick else None)
            else:
                case = head_case(100 + i, HEAD_SETTINGS[i % len(HEAD_SETTINGS)], max_mm,
                                 crop=64 if quick else None, source=source)
            cases.append(case if case is not None else phantom_case(
                100 + i, max_mm, size=48 if quick else 64))
    return cases


# --------------------------------------------------------------------- figures


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
    """Per label Dice and HD95 of the warped moving labels against the fixed ones
    (both cut to the case's evaluation region)."""
    fixed = sitk.GetArrayFromImage(case.fixed_labels)
    warped = warp_labels(case, transform)
    if case.mask is not None:
        fixed, warped = np.where(case.mask, fixed, 0), np.where(case.mask, warped, 0)
    spacing = float(case.fixed.GetSpacing()[0])
    return dice(warped, fixed, case.labels), hd95(warped, fixed, case.labels, spacing)


def tre_mask(case: Case) -> np.ndarray:
    """Where the dense TRE is taken: the fixed image's labelled voxels in the region."""
    labelled = sitk.GetArrayViewFromImage(case.fixed_labels) > 0
    return labelled if case.mask is None else labelled & case.mask


@dataclass
class Outcome:
    """What one method did on one case (per-label arrays as lists, for the JSON record)."""

    case: str
    source: str
    method: str
    dice: list[float] = field(default_factory=list)
    hd95: list[float] = field(default_factory=list)
    tre: float = float("nan")
    sdlogj: float | None = None
    negj: float | None = None
    seconds: float | None = None
    seconds_deformable: float | None = None
    dice_linear: list[float] | None = None
    tre_linear: float | None = None
    error: str | None = None


def figures(case: Case, method: str, transform: sitk.Transform, **extra) -> Outcome:
    d, h = label_figures(case, transform)
    return Outcome(case.name, case.source, method, [float(v) for v in d],
                   [float(v) for v in h],
                   peers.dense_tre(transform, case.truth, case.fixed, tre_mask(case)), **extra)


def run_engine(case: Case, similarity: str, options: dict) -> Outcome:
    opts = RegistrationOptions(mode="deformable", similarity=similarity, **options)
    t0 = time.perf_counter()
    result = register(case.fixed, case.moving, opts)
    total = time.perf_counter() - t0
    assert result.field_transform is not None and result.deformation is not None
    d_lin, _ = label_figures(case, result.transform)
    return figures(
        case, similarity, result.field_transform, seconds=total,
        seconds_deformable=sum(v for k, v in result.timings.items()
                               if k.startswith("deformable_")),
        sdlogj=float(result.deformation["sd_log_jacobian"]),
        negj=float(result.deformation["negative_jacobian_fraction"]),
        dice_linear=[float(v) for v in d_lin],
        tre_linear=peers.dense_tre(result.transform, case.truth, case.fixed, tre_mask(case)))


def run_peer(case: Case, peer: str) -> Outcome:
    """One peer on one case; an exception is a failed pair with its message."""
    t0 = time.perf_counter()
    try:
        transform = peers.METHODS[peer](case.fixed, case.moving)
    except Exception as exc:  # a peer failing is a result too
        return Outcome(case.name, case.source, peer, seconds=time.perf_counter() - t0,
                       error=f"{type(exc).__name__}: {exc}"[:300])
    seconds = time.perf_counter() - t0
    return figures(case, peer, transform, seconds=seconds,
                   **peers.field_figures(transform, case.fixed))


def reference_outcomes(case: Case) -> list[Outcome]:
    """The identity ("initial") and the true mapping ("true transform")."""
    return [figures(case, "initial (identity)", sitk.Transform()),
            figures(case, "true transform", case.truth)]


# ---------------------------------------------------------------------- report


def _row(name: str, sel: Sequence[Outcome], linear: bool = False) -> str:
    ok = [o for o in sel if o.error is None]
    failed = len(sel) - len(ok)
    pairs = f"{len(ok)}/{len(sel)}"
    if not ok:
        return f"| {name} | {pairs} |  |  |  |  |  |  |  |"
    if linear:
        flat = np.concatenate([o.dice_linear for o in ok])  # type: ignore[misc]
        tre = np.mean([o.tre_linear for o in ok])
        hd = sdlogj = negj = times = ""
    else:
        flat = np.concatenate([o.dice for o in ok])
        tre = np.nanmean([o.tre for o in ok])
        hd = f"{np.nanmean(np.concatenate([o.hd95 for o in ok])):.2f}"
        sd = [o.sdlogj for o in ok if o.sdlogj is not None]
        nj = [o.negj for o in ok if o.negj is not None]
        sdlogj = f"{np.mean(sd):.3f}" if sd else ""
        negj = f"{np.mean(nj):.2e}" if nj else ""
        secs = [o.seconds for o in ok if o.seconds is not None]
        stage = [o.seconds_deformable for o in ok if o.seconds_deformable is not None]
        times = (f"{np.mean(secs):.1f}" if secs else "") + (
            f" ({np.mean(stage):.2f})" if stage else "")
    worst = np.sort(flat)[: max(1, round(0.3 * len(flat)))]
    fail = f" ({failed} failed)" if failed else ""
    return (f"| {name}{fail} | {pairs} | {flat.mean():.3f} | {worst.mean():.3f} | {hd} | "
            f"{tre:.2f} | {sdlogj} | {negj} | {times} |")


TABLE_HEAD = ("| method | pairs ok | Dice | Dice30 | HD95 mm | TRE mm | SDlogJ | neg J | "
              "time s (deformable stage) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def report(outcomes: Sequence[Outcome], cases: Sequence[Case], header: str) -> str:
    """The table: per source, the reference rows and every method's (engine methods also
    their linear stage), then per-pair Dice / TRE and the failures' messages."""
    lines = [header, "", TABLE_HEAD]
    sources = list(dict.fromkeys(c.source for c in cases))
    methods = list(dict.fromkeys(o.method for o in outcomes))
    for source in sources:
        names = {c.name for c in cases if c.source == source}
        n_labels = sorted({len(c.labels) for c in cases if c.source == source})
        lines.append(f"| **{source}** ({len(names)} pairs, "
                     f"{'/'.join(map(str, n_labels))} labels) |  |  |  |  |  |  |  |  |")
        for method in methods:
            sel = [o for o in outcomes if o.method == method and o.case in names]
            if not sel:
                continue
            if any(o.dice_linear is not None for o in sel):
                lines.append(_row(f"{method} linear stage only",
                                  [o for o in sel if o.dice_linear is not None], linear=True))
            lines.append(_row(method, sel))
    lines += ["", "Per pair, Dice / TRE mm (x: failed):", "",
              "| pair | " + " | ".join(methods) + " |",
              "|---|" + "---:|" * len(methods)]
    for case in cases:
        cells = []
        for method in methods:
            o = next((o for o in outcomes if o.case == case.name and o.method == method), None)
            cells.append("" if o is None else "x" if o.error else
                         f"{np.mean(o.dice):.3f} / {o.tre:.2f}")
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    errors = [o for o in outcomes if o.error]
    if errors:
        lines += ["", "Failures:", ""] + [f"- {o.method} on {o.case}: {o.error}" for o in errors]
    return "\n".join(lines) + "\n"


def warm_up(case: Case, methods: Sequence[str], run: Callable[[Case, str], Outcome],
            log: Callable[[str], None]) -> None:
    """Each method once, untimed, on a 40-voxel centred crop of ``case``: the first call
    pays one-off costs (ITK's lazy module loading, numba's cache, ONNX Runtime's
    session) that a batch of registrations pays once."""
    def crop(image: sitk.Image) -> sitk.Image:
        size = image.GetSize()
        lo = [max(0, (s - 40) // 2) for s in size]
        return sitk.RegionOfInterest(image, [min(40, s) for s in size], lo)

    small = Case(case.name, crop(case.fixed), crop(case.moving), crop(case.fixed_labels),
                 crop(case.moving_labels), case.truth, case.labels, None, case.source)
    for method in methods:
        t0 = time.perf_counter()
        try:
            run(small, method)
        except Exception as exc:  # the timed runs report failures
            log(f"warm-up {method} raised {type(exc).__name__}: {exc}")
        log(f"warm-up {method}: {time.perf_counter() - t0:.1f} s")


def speed(size: int) -> None:
    """Time the deformable stage alone (see the module docstring, ``--speed``)."""
    from disa.registration.deformable.stage import control_maps, deformable_stage
    from disa.registration.pipeline import descriptor_maps, fixed_weights, prepare
    from disa.registration.similarity.descriptor_map import DescriptorMap

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
    print("| maps | weighted nodes | warp | costs | coupling | Adam | fine level | stage total |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
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
        # The fine level (stride 2) runs where the map is finer than the 8 mm nodes (MIND).
        parts += " | " + (f"{timings['deformable_fine']:.2f}" if "deformable_fine" in timings
                          else "-")
        print(f"| {name} | {nodes} | {parts} | {total:.2f} s |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small pair (< 1 min)")
    parser.add_argument("--cases", type=int, default=6, help="pairs per source (default 6)")
    parser.add_argument("--similarities", default="disa,mind")
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated, or none (default: {','.join(peers.PEERS)}; "
                             "--quick: none)")
    parser.add_argument("--max-mm", type=float, default=8.0,
                        help="largest bump of the true deformation (mm)")
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--source", default="icbm152-head",
                        help=f"comma-separated, of {', '.join(SOURCES)} (mni152-nlin6asym, "
                             "xcat-chest: held out from DISA)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the outcomes already in OUT/deformable.jsonl, run the rest")
    parser.add_argument("--no-warm", action="store_true", help="skip the untimed warm-up")
    parser.add_argument("--speed", action="store_true", help="time the stage alone")
    parser.add_argument("--size", type=int, default=160, help="--speed volume size (voxels)")
    args = parser.parse_args(argv)
    if args.speed:
        speed(args.size)
        return 0

    from disa.model.card import default_model_path

    sources = [s for s in args.source.split(",") if s]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        parser.error(f"unknown source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    similarities = [s.strip() for s in args.similarities.split(",") if s.strip()]
    peer_arg = args.peers if args.peers is not None else ("none" if args.quick else
                                                          ",".join(peers.PEERS))
    wanted = [] if peer_arg == "none" else [p for p in peer_arg.split(",") if p]
    bad = [p for p in wanted if p not in peers.PEERS]
    if bad:
        parser.error(f"unknown peer {bad[0]!r}; known: {', '.join(peers.PEERS)}")
    skipped = []
    if "disa" in similarities and default_model_path() is None:
        similarities.remove("disa")
        skipped.append("DISA skipped: model/weights/disa.onnx is not installed")
    skipped += [f"{p} skipped: its package is not installed" for p in wanted
                if not peers.available(p)]
    peer_list = [p for p in wanted if peers.available(p)]
    log = print
    t0 = time.perf_counter()
    cases = make_cases(sources, 1 if args.quick else args.cases, args.max_mm, args.quick)
    log(f"{len(cases)} pairs built in {time.perf_counter() - t0:.1f} s")
    options = {"starts": 50 if args.quick else args.starts, "rotation_range": 10.0,
               "translation_range": 15.0, "init": "geometry"}

    def run(case: Case, method: str) -> Outcome:
        return (run_engine(case, method, options) if method in similarities
                else run_peer(case, method))

    methods = [*similarities, *peer_list]
    command = " ".join(["python benchmarks/deformable.py",
                        *(["--quick"] if args.quick else [f"--cases {args.cases}"]),
                        f"--source {','.join(sources)}",
                        f"--similarities {','.join(similarities) or 'none'}",
                        f"--peers {','.join(peer_list) or 'none'}",
                        *([f"--max-mm {args.max_mm:g}"] if args.max_mm != 8.0 else [])])
    header = (f"Command: `{command}`. Machine: {machine()}; load average "
              f"{os.getloadavg()[0]:.1f} at start. "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. Engine options "
              f"{options}. " + " ".join(f"{s}." for s in skipped))
    args.out.mkdir(parents=True, exist_ok=True)
    record, table = args.out / "deformable.jsonl", args.out / "deformable.md"
    if not args.resume:
        record.unlink(missing_ok=True)
    names = {c.name for c in cases}
    outcomes = [Outcome(**json.loads(line)) for line in
                (record.read_text(encoding="utf-8").splitlines() if record.is_file() else [])
                if line.strip()]
    outcomes = [o for o in outcomes if o.case in names]
    done = {(o.case, o.method) for o in outcomes}
    for case in cases:
        if (case.name, "true transform") not in done:
            outcomes += reference_outcomes(case)
    if methods and not args.no_warm and any((c.name, m) not in done
                                           for c in cases for m in methods):
        warm_up(cases[0], methods, run, log)
    with record.open("a", encoding="utf-8") as sink:
        for o in outcomes:
            if (o.case, o.method) not in done:
                sink.write(json.dumps(dataclasses.asdict(o)) + "\n")
        def after(case: Case, o: Outcome) -> None:
            outcomes.append(o)
            log(f"{case.name} {o.method}: Dice "
                f"{np.mean(o.dice) if o.dice else float('nan'):.3f} TRE {o.tre:.2f} mm, "
                f"{o.seconds:.1f} s" + (f" [{o.error}]" if o.error else ""))
            table.write_text(report(outcomes, cases, header), encoding="utf-8")

        run_pending(cases, methods, done, run, sink, after)
    text = report(outcomes, cases, header + f" Load average {os.getloadavg()[0]:.1f} at the end.")
    table.write_text(text, encoding="utf-8")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
