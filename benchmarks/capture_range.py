"""Capture range and accuracy against peers (the paper's Table 3 protocol, rigid).

    python benchmarks/capture_range.py [--cases-per-bin N] [--methods a,b,...] [--out DIR]
    python benchmarks/capture_range.py --quick          # one case: the harness works
    python benchmarks/capture_range.py --family realistic [--cases-per-bin N] [--pairs ...]

Pairs (``make_cases``): real anatomy held out of DISA's training (the
totalsegmentator CT head, ``pip install --no-deps totalsegmentator``; without
it a phantom of the held-out seed stream) and a partner modality synthesised
from it with settings held out of training:

    ct-mr   fixed: the real CT;                 moving: FLAIR-like MR ("flair")
    ct-us   fixed: ultrasound-like volume        moving: the real CT
            ("us-steep-attenuation", a fan of a held-out attenuation family)

The ultrasound is the fixed image because it covers only a fan: every fixed
point then has a partner in the full-field CT (as a tracked probe's volume is
registered to a planning CT).

Initial poses: the moving image's header carries a random rigid transform T
(rotation about a random axis by up to ``--max-rotation`` degrees, a random
translation), drawn until the initial error (mean distance |T(x) - x| over
the fixed image's foreground points) falls into a bin: 0-25, 25-50, 50-75,
75-100 mm. The moving voxels are untouched (only origin and direction change),
so no interpolation blurs the partner and the true mapping fixed -> moving is
exactly T.

Every method starts from the header geometry (identity) and none may use a
centre-of-mass initialisation: with full-field images that alone removes most
of the translation and would measure the initialiser, not the method.
Methods (same cases, same machine, one at a time; each runs once untimed on
the first case before the timed runs, so no time includes one-off loading):

    disa-global   DISA descriptors, 500 random starts (+-40 deg, +-100 mm) + L-BFGS
    disa-local    DISA descriptors, the same refinement from the initial pose only
    mind-global   MIND-SSC descriptors (SSD), the same global search
    lc2-local     LC2 (Wein et al.), local optimiser from the initial pose
    sitk-mi       SimpleITK Mattes mutual information, 3 levels, gradient descent
    elastix       itk-elastix default rigid parameter map (4 levels, AdvancedMattesMI)
    ants          ANTsPy rigid (Mattes MI, its default multi-resolution schedule)

The peers come with the ``bench`` extra (itk-elastix, antspyx); a method whose
package is missing is reported as skipped. Per method and bin: converged rate
(mean TRE < 10 mm), TRE median and 90th percentile of converged cases, mean
time per case, mean objective evaluations where the method reports them.
TRE of a case = mean |T_est(x) - T(x)| over the fixed foreground points.
Output: ``capture_range.md`` (table), ``capture_range.png`` (converged
rate by bin) and ``capture_range.jsonl`` (every outcome, appended as it
finishes; ``--resume`` continues an interrupted run) in ``--out`` (default
benchmarks/results/), and the table on stdout.

The cases above are "full-field" (``--family full-field``, the default): both
images on the same 2 mm lattice up to a sub-voxel shift, each covering the
whole anatomy. ``--family realistic`` makes cases that differ from them the way
real pairs do (benchmarks/realistic_cases.py): each image on its own grid
(oblique direction, own spacing, own origin), cropped fields of view (40-85 %
per axis, a thin slab, an ultrasound fan on a probe lattice), and a real torso
besides the head. Its pairs: ``realistic_cases.PAIRS``; its methods add
``disa-default``, ``register(fixed, moving)`` with the default options and
nothing else (what a user types: the engine's own similarity, starts, ranges and
initialisation). TRE there is measured on fixed foreground points where both
images have data at the true pose. Its files are ``capture_range_realistic.*``.
Every engine outcome records what the result tells a user (``result``:
confidence, ambiguous, and the verdict where the engine reports one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import realistic_cases
import SimpleITK as sitk
from common import machine, run_pending

from disa.training.pairs import random_rotation
from disa.training.phantom import target_registration_error

BINS_MM: tuple[tuple[float, float], ...] = ((0, 25), (25, 50), (50, 75), (75, 100))
CONVERGED_MM = 10.0
SPACING_MM = 2.0
ALL_METHODS = (
    "disa-global", "disa-local", "mind-global", "lc2-local", "sitk-mi", "elastix", "ants",
)
PAIRS = ("ct-mr", "ct-us")
FAMILIES = ("full-field", "realistic")
#: Source cube (voxels) of the realistic family's --quick case and of the quick test.
QUICK_CROP = 56
REALISTIC_METHODS = (
    "disa-default", "disa-global", "mind-global", "lc2-local", "sitk-mi", "elastix", "ants",
)
#: The realistic pairs a run takes by default (the tables of benchmarks/README.md); every
#: known pair, the swapped ones (the partial view as the fixed image) too, in
#: ALL_REALISTIC_PAIRS, whose order fixes each pair's random draws.
REALISTIC_PAIRS = tuple(name for name, spec in realistic_cases.PAIRS.items() if not spec.swapped)
ALL_REALISTIC_PAIRS = tuple(realistic_cases.PAIRS)
#: Fields of RegistrationResult.summary() kept with each engine outcome (those present).
RESULT_FIELDS = ("confidence", "ambiguous", "verdict", "overlap", "match_quality",
                 "similarity", "starts", "working_spacing_mm", "refined_solutions",
                 "sampled_image", "ultrasound")


@dataclass
class Case:
    """One registration problem: ``truth`` maps fixed points to moving points (LPS mm)."""

    name: str
    pair: str
    bin_index: int
    fixed: sitk.Image
    moving: sitk.Image
    truth: sitk.Euler3DTransform
    points: np.ndarray  # (N, 3) fixed foreground points, LPS mm
    initial_error_mm: float
    source: str = ""  # the anatomy's source id (realistic family)


@dataclass
class Outcome:
    """What one method did on one case."""

    case: str
    pair: str
    bin_index: int
    method: str
    tre_mm: float
    seconds: float
    evaluations: int | None
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: What the engine's result said (RESULT_FIELDS present in its summary()).
    result: dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------- cases


def _volume(source: str):  # -> disa.training.sources.Volume
    """The held-out volume ``source``, or a held-out phantom when its package is missing."""
    from disa.training import sources

    if source != "phantom":
        try:
            return sources.load_volume(source)
        except (ImportError, LookupError, FileNotFoundError):
            pass
    rng = np.random.default_rng(sources.phantom_seed("held-out", 0, 0))
    return sources.make_phantom(rng, subject="phantom-held-out-0")


def _image(array: np.ndarray) -> sitk.Image:
    """A (z, y, x) array as an image on the 2 mm grid, origin 0, identity direction."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((SPACING_MM,) * 3)
    return image


def _foreground_points(image: sitk.Image, mask: np.ndarray, count: int,
                       rng: np.random.Generator) -> np.ndarray:
    idx = np.argwhere(mask)[:, ::-1]  # (x, y, z) indices
    if len(idx) > count:
        idx = idx[rng.choice(len(idx), count, replace=False)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i)))
                     for i in idx])


def draw_pose(rng: np.random.Generator, points: np.ndarray, center: np.ndarray,
              bin_mm: tuple[float, float], max_deg: float) -> sitk.Euler3DTransform:
    """A rigid T about ``center`` whose mean |T(x) - x| over ``points`` lies in ``bin_mm``."""
    lo, hi = bin_mm
    for _ in range(10000):
        rot = random_rotation(rng, max_deg)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        shift = direction * rng.uniform(0.0, hi * 1.2)
        moved = (points - center) @ rot.T + center + shift
        error = float(np.mean(np.linalg.norm(moved - points, axis=1)))
        if lo <= error < hi:
            tx = sitk.Euler3DTransform()
            tx.SetCenter(tuple(map(float, center)))
            tx.SetMatrix(tuple(map(float, rot.ravel())))
            tx.SetTranslation(tuple(map(float, shift)))
            return tx
    raise RuntimeError(f"no pose found for the bin {bin_mm}")


def with_header_transform(array: np.ndarray, truth: sitk.Euler3DTransform,
                          rng: np.random.Generator) -> sitk.Image:
    """``array`` (on the fixed 2 mm grid) as a moving image showing the anatomy at fixed
    point x at physical point T(x), so T is exactly the fixed -> moving mapping.

    The header alone carries T (origin and direction); the voxels are then resampled
    (linear) onto a lattice shifted by a random fraction of a voxel along each axis.
    Without that shift the two lattices coincide at the true pose, and methods that
    sample on grids find it to a hundredth of a millimetre, which real pairs never allow.
    """
    image = _image(array)
    rot = np.asarray(truth.GetMatrix()).reshape(3, 3)
    image.SetOrigin(truth.TransformPoint(image.GetOrigin()))
    direction = rot @ np.asarray(image.GetDirection()).reshape(3, 3)
    image.SetDirection(tuple(map(float, direction.ravel())))
    shifted = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    shifted.CopyInformation(image)
    offset = direction @ (rng.uniform(-0.5, 0.5, 3) * SPACING_MM)
    shifted.SetOrigin(tuple(map(float, np.asarray(image.GetOrigin()) + offset)))
    return sitk.Resample(image, shifted, sitk.Transform(), sitk.sitkLinear,
                         float(np.min(array)))


def make_cases(cases_per_bin: int, pairs: Sequence[str] = PAIRS, seed: int = 0,
               source: str = "ct-brain-atlas", bins: Sequence[int] = (0, 1, 2, 3),
               max_rotation_deg: float = 40.0, crop: int | None = None) -> list[Case]:
    """``cases_per_bin`` cases per pair and bin, deterministic in ``seed``.

    ``crop``: keep a centred cube of this many voxels (quick mode).
    """
    from disa.training.synthesis import synthesize

    volume = _volume(source)
    cases: list[Case] = []
    for pi, pair in enumerate(pairs):
        for b in bins:
            for k in range(cases_per_bin):
                rng = np.random.default_rng([seed, pi, b, k])
                centre_voxel = (np.array(volume.shape) - 1) / 2.0
                extent = 0.6 * float(min(volume.shape))
                if pair == "ct-mr":
                    fixed_a = synthesize(volume, "native", rng)
                    moving_a = synthesize(volume, "flair", rng)
                    fixed_mask = volume.foreground()
                elif pair == "ct-us":
                    fixed_a = synthesize(volume, "us-steep-attenuation", rng, centre_voxel,
                                         extent)
                    moving_a = synthesize(volume, "native", rng)
                    fixed_mask = (fixed_a > 0) & volume.foreground()
                else:
                    raise ValueError(f"unknown pair {pair!r}; known: {PAIRS}")
                if crop is not None:
                    lo = [max(0, (n - crop) // 2) for n in fixed_a.shape]
                    box = tuple(slice(a, a + crop) for a in lo)
                    fixed_a, moving_a, fixed_mask = fixed_a[box], moving_a[box], fixed_mask[box]
                fixed = _image(fixed_a)
                points = _foreground_points(fixed, fixed_mask, 2000, rng)
                center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(
                    [(s - 1) / 2.0 for s in fixed.GetSize()]))
                truth = draw_pose(rng, points, center, BINS_MM[b], max_rotation_deg)
                initial = tre(sitk.Euler3DTransform(), truth, points)
                cases.append(Case(f"{pair}-bin{b}-{k}", pair, b, fixed,
                                  with_header_transform(moving_a, truth, rng), truth, points,
                                  initial))
    return cases


def make_realistic_cases(cases_per_bin: int, pairs: Sequence[str] = REALISTIC_PAIRS,
                         seed: int = 0, bins: Sequence[int] = (0, 1, 2, 3),
                         max_rotation_deg: float = 40.0, crop: int | None = None,
                         log: Callable[[str], None] | None = None) -> list[Case]:
    """``cases_per_bin`` cases per realistic pair and bin (benchmarks/realistic_cases.py),
    deterministic in ``seed``; a case's draws depend on its pair's name, not on which
    other pairs run. ``crop``: a centred cube of this many voxels of the source first.

    The moving image's header carries the true T (fixed -> moving, LPS mm), drawn
    about the fixed image's centre until the mean |T(x) - x| over the overlap points
    falls into the bin; its voxels were sampled once, on its own lattice.
    """
    from disa.training.synthesis import simulate_ultrasound, synthesize

    unknown = [p for p in pairs if p not in realistic_cases.PAIRS]
    if unknown:
        raise ValueError(f"unknown pair {unknown[0]!r}; known: {ALL_REALISTIC_PAIRS}")
    cases: list[Case] = []
    for pair in pairs:
        spec = realistic_cases.PAIRS[pair]
        volume = _volume(spec.source)
        if crop is not None:
            volume = realistic_cases.crop_volume(volume, crop)
        pi = ALL_REALISTIC_PAIRS.index(pair)
        for b in bins:
            for k in range(cases_per_bin):
                t0 = time.perf_counter()
                rng = np.random.default_rng([seed, 7919, pi, b, k])
                built = realistic_cases.build_pair(volume, spec, rng, synthesize,
                                                   simulate_ultrasound)
                overlap = built.overlap
                if len(overlap) > 2000:
                    overlap = overlap[rng.choice(len(overlap), 2000, replace=False)]
                fixed = built.fixed
                center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(
                    [(s - 1) / 2.0 for s in fixed.GetSize()]))
                truth = draw_pose(rng, overlap, center, BINS_MM[b], max_rotation_deg)
                moving = realistic_cases.move_header(built.moving, truth)
                initial = tre(sitk.Euler3DTransform(), truth, overlap)
                if spec.swapped:
                    # The moved partial view is the fixed image: a point y of it shows the
                    # anatomy of the whole volume's T^-1(y), and the overlap points are where
                    # T takes them (the same mean |T(x) - x|, so the same bin).
                    overlap = np.array([truth.TransformPoint([float(v) for v in x])
                                        for x in overlap])
                    fixed, moving, truth = moving, fixed, sitk.Euler3DTransform(truth.GetInverse())
                cases.append(Case(f"{pair}-bin{b}-{k}", pair, b, fixed, moving, truth, overlap,
                                  initial, source=volume.id))
                if log is not None:
                    log(f"case {pair}-bin{b}-{k} ({volume.id}): fixed {fixed.GetSize()} "
                        f"moving {moving.GetSize()} at "
                        f"{'x'.join(f'{v:.1f}' for v in moving.GetSpacing())} mm, "
                        f"{len(built.overlap)} overlap voxels, "
                        f"{time.perf_counter() - t0:.1f} s")
    return cases


def tre(estimate: sitk.Transform, truth: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance (mm) between where ``estimate`` and ``truth`` map ``points``."""
    return target_registration_error(estimate, truth, points)


# --------------------------------------------------------------------- methods

Method = Callable[[sitk.Image, sitk.Image], tuple]
"""(fixed, moving) -> (transform, evaluations or None[, extra]); the engine's methods add
extra = {"confidence", "ambiguous"}, what result.json tells a user about the answer."""

#: The service warns when a result is ambiguous or its confidence is below this
#: (docs/SERVICE.md, the result page): a "flagged" result.
FLAG_CONFIDENCE = 0.5


def _reported(result) -> dict[str, object]:  # result: RegistrationResult
    """The RESULT_FIELDS of ``result.summary()`` that are present and JSON scalars."""
    summary = result.summary()
    return {k: summary[k] for k in RESULT_FIELDS
            if k in summary and isinstance(summary[k], (str, int, float, bool))}


def _engine(similarity: str, starts: int) -> Method:
    def run(fixed: sitk.Image, moving: sitk.Image) -> tuple:
        from disa.registration.options import RegistrationOptions
        from disa.registration.pipeline import register

        options = RegistrationOptions(similarity=similarity, starts=starts, init="geometry",
                                      rotation_range=40.0, translation_range=100.0)
        result = register(fixed, moving, options)
        if starts == 1:  # one solution agrees with itself: no confidence to report
            return result.transform, int(result.evaluations), {}, _reported(result)
        return result.transform, int(result.evaluations), {
            "confidence": float(result.confidence), "ambiguous": float(result.ambiguous)
        }, _reported(result)

    return run


def disa_default(fixed: sitk.Image, moving: sitk.Image) -> tuple:
    """What a user types: ``register(fixed, moving)``, default options, no masks or flags."""
    from disa.registration.pipeline import register

    result = register(fixed, moving)
    return result.transform, int(result.evaluations), {
        "confidence": float(result.confidence), "ambiguous": float(result.ambiguous)
    }, _reported(result)


def sitk_mi(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, int | None]:
    """Mattes MI (50 bins, 20 % random samples), 3 levels, regular-step gradient descent."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    initial = sitk.Euler3DTransform()
    initial.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in fixed.GetSize()]))
    reg.SetInitialTransform(initial, inPlace=False)
    iterations = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(0, iterations[0] + 1))
    result = reg.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
    return result, iterations[0]


def _write(image: sitk.Image, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), path)
    return path


def elastix(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, int | None]:
    """itk-elastix with its default rigid map; geometry initialisation (no centring)."""
    import itk

    with tempfile.TemporaryDirectory() as tmp:
        f = itk.imread(_write(fixed, tmp, "fixed.nii.gz"), itk.F)
        m = itk.imread(_write(moving, tmp, "moving.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    rigid = params.GetDefaultParameterMap("rigid")
    rigid["AutomaticTransformInitialization"] = ["false"]
    params.AddParameterMap(rigid)
    _, result = itk.elastix_registration_method(f, m, parameter_object=params,
                                                log_to_console=bool(os.environ.get("ELASTIX_LOG")))
    # The transform map: EulerTransform (angles x, y, z in rad, then translation, mm)
    # about CenterOfRotationPoint, fixed points -> moving points as in ITK.
    p = dict(result.GetParameterMap(0))
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in p["CenterOfRotationPoint"]])
    tx.SetComputeZYX(p.get("ComputeZYX", ("false",))[0] == "true")
    tx.SetParameters([float(v) for v in p["TransformParameters"]])
    # Iterations per level are fixed (no early stop in its default optimiser).
    return tx, int(rigid["MaximumNumberOfIterations"][0]) * int(rigid["NumberOfResolutions"][0])


def ants(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, int | None]:
    """ANTsPy rigid (Mattes MI), identity initial transform (not its centre-of-mass default)."""
    import ants as antspy

    with tempfile.TemporaryDirectory() as tmp:
        f = antspy.image_read(_write(fixed, tmp, "fixed.nii.gz"))
        m = antspy.image_read(_write(moving, tmp, "moving.nii.gz"))
        out = antspy.registration(f, m, type_of_transform="Rigid", initial_transform="Identity",
                                  aff_metric="mattes", random_seed=1,
                                  outprefix=os.path.join(tmp, "ants_"))
        # ANTs writes an ITK transform file: fixed points -> moving points, like ours.
        transform = sitk.ReadTransform(out["fwdtransforms"][0])
    return transform, None


METHODS: dict[str, Method] = {
    "disa-default": disa_default,
    "disa-global": _engine("disa", 500),
    "disa-local": _engine("disa", 1),
    "mind-global": _engine("mind", 500),
    "lc2-local": _engine("lc2", 1),
    "sitk-mi": sitk_mi,
    "elastix": elastix,
    "ants": ants,
}
_PACKAGE = {"elastix": "itk", "ants": "ants"}


def available(method: str) -> bool:
    """Whether ``method`` can run here (its peer package installed, DISA weights shipped)."""
    import importlib.util

    if method == "disa-default":  # the engine's default similarity: DISA or MIND-SSC
        return True
    if method.startswith("disa"):
        from disa.model.card import default_model_path

        path = default_model_path()
        return path is not None and path.is_file()
    package = _PACKAGE.get(method)
    return package is None or importlib.util.find_spec(package) is not None


def run_case(case: Case, method: str) -> Outcome:
    """One method on one case; a method's exception is a failed case, not a crash."""
    t0 = time.perf_counter()
    try:
        transform, evaluations, *rest = METHODS[method](case.fixed, case.moving)
    except Exception as exc:  # a peer failing on a hard start is a result too
        return Outcome(case.name, case.pair, case.bin_index, method, float("inf"),
                       time.perf_counter() - t0, None, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    return Outcome(case.name, case.pair, case.bin_index, method,
                   tre(transform, case.truth, case.points), seconds, evaluations,
                   extra=dict(rest[0]) if rest else {},
                   result=dict(rest[1]) if len(rest) > 1 else {})


def flagged(outcome: Outcome) -> bool | None:
    """Whether the method warned about its answer (None: it reports no confidence)."""
    if "confidence" not in outcome.extra:
        return None
    return bool(outcome.extra.get("ambiguous")) or outcome.extra["confidence"] < FLAG_CONFIDENCE


def confidence_summary(outcomes: Sequence[Outcome]) -> list[dict[str, object]]:
    """Per (pair, method) that reports a confidence: how many failed cases it flagged
    (a warning where one was due) and how many converged ones (a false alarm)."""
    rows = []
    keys = dict.fromkeys((o.pair, o.method) for o in outcomes if flagged(o) is not None)
    for pair, method in keys:
        sel = [o for o in outcomes if o.pair == pair and o.method == method and o.error is None]
        failed = [o for o in sel if o.tre_mm >= CONVERGED_MM]
        converged = [o for o in sel if o.tre_mm < CONVERGED_MM]
        rows.append({
            "pair": pair, "method": method,
            "failed": len(failed), "failed_flagged": sum(bool(flagged(o)) for o in failed),
            "converged": len(converged),
            "converged_flagged": sum(bool(flagged(o)) for o in converged),
        })
    return rows


def confidence_markdown(rows: Sequence[dict[str, object]]) -> str:
    lines = [f"Warnings (ambiguous, or confidence < {FLAG_CONFIDENCE:.0%}): failed cases "
             "flagged / failed, converged cases flagged / converged.", "",
             "| pair | method | failed flagged | converged flagged |", "|---|---|---:|---:|"]
    lines += [f"| {r['pair']} | {r['method']} | {r['failed_flagged']} / {r['failed']} "
              f"| {r['converged_flagged']} / {r['converged']} |" for r in rows]
    return "\n".join(lines) + "\n"


def verdict_summary(outcomes: Sequence[Outcome]) -> list[dict[str, object]]:
    """Per method that reports a verdict: results called likely, how many of them are wrong
    (TRE >= CONVERGED_MM; the verdict's target is at most 5 %), and how many converged
    results it called uncertain or failed (the price of the rule)."""
    rows = []
    for method in dict.fromkeys(o.method for o in outcomes if o.result.get("verdict")):
        sel = [o for o in outcomes if o.method == method and o.result.get("verdict")]
        likely = [o for o in sel if o.result["verdict"] == "likely"]
        converged = [o for o in sel if o.tre_mm < CONVERGED_MM]
        rows.append({
            "method": method, "results": len(sel), "likely": len(likely),
            "likely_wrong": sum(o.tre_mm >= CONVERGED_MM for o in likely),
            "converged": len(converged),
            "converged_not_likely": sum(o.result["verdict"] != "likely" for o in converged),
            "failed_wrong": sum(o.result["verdict"] == "failed" and o.tre_mm >= CONVERGED_MM
                                for o in sel),
        })
    return rows


def verdict_markdown(rows: Sequence[dict[str, object]]) -> str:
    lines = [f"Verdict calibration (wrong = TRE >= {CONVERGED_MM:.0f} mm; target: at most 5 % "
             "of likely results wrong).", "",
             "| method | results | likely | likely but wrong | converged | converged not "
             "likely | failed and wrong |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['results']} | {r['likely']} | {r['likely_wrong']} | "
              f"{r['converged']} | {r['converged_not_likely']} | {r['failed_wrong']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def warm_up(case: Case, methods: Sequence[str], log: Callable[[str], None]) -> None:
    """Run each method once, untimed: the first call pays one-off costs (ITK's lazy
    module loading took ~10 s for elastix, ONNX Runtime session creation and numba's
    cache load for the engine) that a service or a batch script pays only once."""
    for method in methods:
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # the timed run reports failures
            METHODS[method](case.fixed, case.moving)
        log(f"warm-up {method}: {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------- report


def summarise(outcomes: Sequence[Outcome], methods: Sequence[str],
              bins: Sequence[int]) -> list[dict[str, object]]:
    """Per (pair, method, bin): cases, converged rate, TRE p50/p90 of converged cases,
    mean time per case, mean evaluations; pair "all" pools the pairs."""
    pairs = list(dict.fromkeys(o.pair for o in outcomes))
    groups = [*pairs, "all"] if len(pairs) > 1 else pairs
    rows = []
    for pair in groups:
        for method in methods:
            for b in bins:
                sel = [o for o in outcomes if o.method == method and o.bin_index == b
                       and pair in (o.pair, "all")]
                if not sel:
                    continue
                ok = [o.tre_mm for o in sel if o.tre_mm < CONVERGED_MM]
                evals = [o.evaluations for o in sel if o.evaluations is not None]
                rows.append({
                    "pair": pair,
                    "method": method,
                    "bin": b,
                    "cases": len(sel),
                    "converged": len(ok) / len(sel),
                    "tre_p50": float(np.percentile(ok, 50)) if ok else None,
                    "tre_p90": float(np.percentile(ok, 90)) if ok else None,
                    "seconds": float(np.mean([o.seconds for o in sel])),
                    "evaluations": float(np.mean(evals)) if evals else None,
                    "errors": sum(o.error is not None for o in sel),
                })
    return rows


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: Sequence[dict[str, object]], header: str) -> str:
    lines = [header, "",
             "| pair | method | initial error | cases | converged | TRE p50 / p90 (mm) "
             "| s / case | evaluations |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = BINS_MM[int(r["bin"])]  # type: ignore[call-overload]
        lines.append(
            f"| {r['pair']} | {r['method']} | {lo:.0f}-{hi:.0f} mm | {r['cases']} "
            f"| {100 * float(r['converged']):.0f} % "  # type: ignore[arg-type]
            f"| {_fmt(r['tre_p50'], '.1f')} / {_fmt(r['tre_p90'], '.1f')} "
            f"| {float(r['seconds']):.1f} | {_fmt(r['evaluations'], ',.0f')} |"  # type: ignore[arg-type]
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Converged rate per bin, one panel per pair, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(str(r["pair"]) for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), dpi=100,
                             squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        methods = list(dict.fromkeys(str(r["method"]) for r in rows))
        for k, method in enumerate(methods):
            sel = [r for r in rows if r["method"] == method and r["pair"] == pair]
            # A small horizontal offset per method keeps coinciding lines visible.
            dodge = 1.2 * (k - (len(methods) - 1) / 2)
            x = [np.mean(BINS_MM[int(r["bin"])]) + dodge  # type: ignore[call-overload]
                 for r in sel]
            ax.plot(x, [100 * float(r["converged"]) for r in sel],  # type: ignore[arg-type]
                    marker="o", label=method)
        ax.set_title(pair)
        ax.set_xlabel("initial error (mm, bin centre)")
        ax.set_ylabel(f"converged (TRE < {CONVERGED_MM:.0f} mm), %")
        ax.set_ylim(-5, 105)
        ax.set_xticks([np.mean(b) for b in BINS_MM],
                      [f"{lo:.0f}-{hi:.0f}" for lo, hi in BINS_MM])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


OUTCOMES = "capture_range.jsonl"


def _stem(family: str) -> str:
    """File name stem of a family's outputs (the full-field family keeps its old names)."""
    return "capture_range" if family == "full-field" else f"capture_range_{family}"


def _load_outcomes(path: Path) -> list[Outcome]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Outcome(**json.loads(line)) for line in lines if line.strip()]


def run(cases_per_bin: int, methods: Sequence[str], out: Path, pairs: Sequence[str] = PAIRS,
        bins: Sequence[int] = (0, 1, 2, 3), crop: int | None = None, seed: int = 0,
        source: str = "ct-brain-atlas", log: Callable[[str], None] = print,
        resume: bool = False, warm: bool = True, family: str = "full-field"
        ) -> tuple[list[Outcome], list[dict[str, object]]]:
    """Build the cases, run every available method on each, write table and plot.

    Every outcome is appended to ``out/capture_range.jsonl`` (realistic family:
    ``capture_range_realistic.jsonl``) as it finishes; with ``resume`` the (case,
    method) pairs already there are not run again, so an interrupted full run
    continues where it stopped. ``warm``: run each method once untimed first
    (`warm_up`); the quick test skips it to save time. ``source`` is the
    full-field family's anatomy; each realistic pair names its own.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    runnable = [m for m in methods if available(m)]
    skipped = [m for m in methods if m not in runnable]
    if family == "realistic":
        cases = make_realistic_cases(cases_per_bin, pairs, seed, bins, crop=crop, log=log)
    else:
        cases = make_cases(cases_per_bin, pairs, seed, source, bins, crop=crop)
    stem = _stem(family)
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{stem}.jsonl"
    if not resume:
        record.unlink(missing_ok=True)
    wanted = {(c.name, m) for c in cases for m in runnable}
    outcomes = [o for o in _load_outcomes(record) if (o.case, o.method) in wanted]
    done = {(o.case, o.method) for o in outcomes}
    todo = [c for c in cases if any((c.name, m) not in done for m in runnable)]
    if todo and warm:
        warm_up(todo[0], runnable, log)
    with record.open("a", encoding="utf-8") as sink:
        outcomes += run_pending(cases, runnable, done, run_case, sink,
                                lambda case, o: log(
                                    f"{case.name} (initial {case.initial_error_mm:.0f} mm) "
                                    f"{o.method}: TRE {o.tre_mm:.1f} mm, {o.seconds:.1f} s"
                                    + (f" [{o.error}]" if o.error else "")))
    rows = summarise(outcomes, runnable, bins)
    if family == "realistic":
        described = "; ".join(_realistic_pair_line(p, cases) for p in pairs)
        header = (f"Command: `{_command(cases_per_bin, methods, pairs, crop, family, bins)}`. "
                  f"Machine: {machine()}. Family: realistic (own grids, cropped fields of "
                  f"view; TRE over the overlap at the true pose). Pairs: {described}; "
                  f"{len(cases)} cases; converged = mean TRE < {CONVERGED_MM:.0f} mm.")
    else:
        header = (f"Command: `{_command(cases_per_bin, methods, pairs, crop, bins=bins)}`. "
                  f"Machine: {machine()}. Pairs: {', '.join(pairs)} ({source}, held out); "
                  f"{len(cases)} cases; converged = mean TRE < {CONVERGED_MM:.0f} mm.")
    header += f" Skipped (not installed): {', '.join(skipped)}." if skipped else ""
    table = markdown(rows, header)
    warnings = confidence_summary(outcomes)
    if warnings:
        table += "\n" + confidence_markdown(warnings)
    verdicts = verdict_summary(outcomes)
    if verdicts:
        table += "\n" + verdict_markdown(verdicts)
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    if rows:
        plot(rows, out / f"{stem}.png")
    return outcomes, rows


def _realistic_pair_line(pair: str, cases: Sequence[Case]) -> str:
    """"pair (source[, note])" with the source the cases really used (a phantom when the
    pair's package is missing)."""
    spec = realistic_cases.PAIRS[pair]
    used = sorted({c.source for c in cases if c.pair == pair}) or [spec.source]
    note = f", {spec.note}" if spec.note and spec.source in used else ""
    return f"{pair} ({', '.join(used)}{note})"


def _command(cases_per_bin: int, methods: Sequence[str], pairs: Sequence[str],
             crop: int | None, family: str = "full-field",
             bins: Sequence[int] = (0, 1, 2, 3)) -> str:
    parts = ["python benchmarks/capture_range.py", f"--cases-per-bin {cases_per_bin}"]
    default_methods, default_pairs = ALL_METHODS, PAIRS
    if family != "full-field":
        parts.insert(1, f"--family {family}")
        default_methods, default_pairs = REALISTIC_METHODS, REALISTIC_PAIRS
    if tuple(methods) != default_methods:
        parts.append(f"--methods {','.join(methods)}")
    if tuple(pairs) != default_pairs:
        parts.append(f"--pairs {','.join(pairs)}")
    if tuple(bins) != (0, 1, 2, 3):
        parts.append(f"--bins {','.join(map(str, bins))}")
    if crop is not None:
        parts.append(f"--crop {crop}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, default="full-field",
                   help="full-field: the same lattice, whole anatomy (the paper's protocol); "
                        "realistic: own grids, cropped fields of view, torso")
    p.add_argument("--cases-per-bin", type=int, default=5)
    p.add_argument("--methods", default=None,
                   help=f"default: {','.join(ALL_METHODS)} (realistic: "
                        f"{','.join(REALISTIC_METHODS)})")
    p.add_argument("--pairs", default=None,
                   help=f"default: {','.join(PAIRS)} (realistic: {','.join(REALISTIC_PAIRS)}; "
                        "also " + ",".join(p for p in ALL_REALISTIC_PAIRS
                                           if p not in REALISTIC_PAIRS)
                        + ": the partial view as the fixed image)")
    p.add_argument("--bins", default="0,1,2,3",
                   help="initial-error bins to run (0: 0-25 mm ... 3: 75-100 mm)")
    p.add_argument("--crop", type=int, default=None, help="centred cube of this many voxels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--resume", action="store_true",
                   help="keep the outcomes already in OUT/capture_range.jsonl, run the rest")
    p.add_argument("--quick", action="store_true",
                   help="one CT / FLAIR case in the 0-25 mm bin (what the test suite runs; "
                        "realistic: one ct-mr case of a 56-voxel crop, disa-default only)")
    args = p.parse_args(argv)
    realistic = args.family == "realistic"
    methods = [m for m in (args.methods or ",".join(
        REALISTIC_METHODS if realistic else ALL_METHODS)).split(",") if m]
    pairs = [s for s in (args.pairs or ",".join(
        REALISTIC_PAIRS if realistic else PAIRS)).split(",") if s]
    bins = tuple(int(b) for b in args.bins.split(",") if b)
    cases, crop = args.cases_per_bin, args.crop
    if args.quick:
        cases, bins, pairs = 1, (0,), ["ct-mr"]
        if realistic:
            crop = crop or QUICK_CROP
            methods = methods if args.methods else ["disa-default"]
    _, rows = run(cases, methods, args.out, pairs, bins, crop, args.seed, resume=args.resume,
                  family=args.family)
    print((args.out / f"{_stem(args.family)}.md").read_text(encoding="utf-8"))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
