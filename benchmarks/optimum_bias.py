"""Where the similarity's optimum lies: local refinement started at the true pose.

    python benchmarks/optimum_bias.py [--model DIR_OR_CARD ...] [--similarities disa,mind]
    python benchmarks/optimum_bias.py --quick           # two pairs: the harness works

A registration can only be as accurate as the optimum of its objective. Each
case is a perfectly aligned pair (two synthetic modalities of one anatomy,
``disa.training.synthesis``), registered rigidly with one start (``starts=1``)
from the header geometry, which *is* the truth (the moving image is resampled
onto a grid shifted by a random 0-8 mm, so no grid coincides with the other's;
``_off_grid``): the refinement then walks to
the nearest optimum of the objective, and its distance from the identity
(mean |T(x) - x| over the fixed foreground, mm) measures the objective's bias
on that pair, free of capture-range effects.

Cases (deterministic; ``--seeds`` draws of each): the training anatomy (ICBM152 head) with training
settings, and anatomy held out of training (MNI152 NLin6Asym head, the CT head
template) with training and held-out settings. Sources whose package is
missing are skipped; a held-out phantom stands in when none is installed.

``--model`` compares DISA networks on the same cases: each is a folder with
an exported ``disa.onnx`` and its card (``disa-train export --out``) or a card
file. Every DISA model runs on the same engine (``--engine``, default
openvino-fp32 where OpenVINO is installed, else onnxruntime) so that only the
weights differ. MIND-SSC is the reference.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import machine

from disa.model import card as card_module

#: The engine finds its model through this function; ``use_model`` swaps it and back.
_SHIPPED_CARD_PATH = card_module.default_card_path

#: (source, fixed setting, moving setting); "native" is the source's own image.
CASES: tuple[tuple[str, str, str], ...] = (
    ("icbm152-head", "t1", "t2"),
    ("icbm152-head", "t2", "t1"),
    ("icbm152-head", "t1", "ct"),
    ("icbm152-head", "pd", "lut"),
    ("icbm152-head", "us", "t1"),
    ("mni152-nlin6asym", "native", "t2"),
    ("mni152-nlin6asym", "native", "ct"),
    ("mni152-nlin6asym", "native", "pd"),
    ("mni152-nlin6asym", "native", "flair"),
    ("mni152-nlin6asym", "lut-high-frequency", "native"),
    ("ct-brain-atlas", "native", "flair"),
    ("ct-brain-atlas", "native", "t1"),
    ("ct-brain-atlas", "us", "native"),
    ("ct-brain-atlas", "us-steep-attenuation", "native"),
)
SPACING_MM = 2.0


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((SPACING_MM,) * 3)
    return image


def _off_grid(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """``image`` resampled (B-spline) onto its grid shifted by a random 0-8 mm per axis.

    Why: on two identical grids every fixed sample point lands exactly on a moving
    grid node at the true pose, where trilinear interpolation has a kink: a refinement
    started there may stay put for that reason alone (drift exactly 0). The shift keeps
    the anatomy where it is (the true mapping stays the identity) and puts the moving
    nodes, and DISA's 8 mm descriptor nodes, off the fixed ones, as in real pairs.
    """
    shifted = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    shifted.SetSpacing(image.GetSpacing())
    shifted.SetDirection(image.GetDirection())
    shifted.SetOrigin(tuple(np.add(image.GetOrigin(), rng.uniform(0.0, 8.0, 3))))
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, shifted, sitk.Transform(), sitk.sitkBSpline, background,
                         sitk.sitkFloat32)


def _volume(source: str):  # -> disa.training.sources.Volume | None
    from disa.training import sources

    try:
        return sources.load_volume(source)
    except (ImportError, LookupError, FileNotFoundError):
        return None


def make_pairs(cases: Sequence[tuple[str, str, str]], seeds: int = 2
               ) -> list[tuple[str, sitk.Image, sitk.Image, np.ndarray]]:
    """(name, fixed, moving, fixed foreground points in mm) per case whose source exists and
    per seed. A case's images depend only on the case and the seed, not on which other
    cases are run (``--quick`` draws the same images as the full run)."""
    from disa.training import sources
    from disa.training.synthesis import synthesize

    out = []
    for (source, fixed_setting, moving_setting), seed in itertools.product(cases, range(seeds)):
        volume = _volume(source)
        if volume is None:
            continue
        key = zlib.crc32(f"{source}|{fixed_setting}|{moving_setting}".encode())
        rng = np.random.default_rng([seed, key])
        centre = (np.array(volume.shape) - 1) / 2.0
        extent = 0.6 * float(min(volume.shape))
        fixed_a = synthesize(volume, fixed_setting, rng, centre, extent)
        moving_a = synthesize(volume, moving_setting, rng, centre, extent)
        mask = volume.foreground() & ((fixed_a > 0) if fixed_setting.startswith("us") else True)
        idx = np.argwhere(mask)[:, ::-1].astype(np.float64)
        pick = rng.choice(len(idx), size=min(2000, len(idx)), replace=False)
        points = idx[pick] * SPACING_MM  # origin 0, identity direction
        out.append((f"{volume.subject} {fixed_setting}->{moving_setting} #{seed}", _image(fixed_a),
                    _off_grid(_image(moving_a), rng), points))
    if not out:  # no package installed: a held-out phantom
        rng = np.random.default_rng(sources.phantom_seed("held-out", 0, 0))
        volume = sources.make_phantom(rng, subject="phantom-held-out-0")
        fixed_a = synthesize(volume, "t1", rng)
        moving_a = synthesize(volume, "flair", rng)
        idx = np.argwhere(volume.foreground())[:, ::-1].astype(np.float64) * SPACING_MM
        out.append(("phantom t1->flair", _image(fixed_a), _image(moving_a), idx[::50]))
    return out


def drift_mm(transform: sitk.Transform, points: np.ndarray) -> float:
    """Mean |T(x) - x| (mm) over ``points``: the distance from the true (identity) mapping."""
    mapped = np.array([transform.TransformPoint(p) for p in points.tolist()])
    return float(np.linalg.norm(mapped - points, axis=1).mean())


def use_model(path: Path | None) -> str:
    """Point the engine at the DISA model of ``path`` (None: the shipped one); its name."""
    from disa.registration import pipeline

    if path is None:
        card_module.default_card_path = _SHIPPED_CARD_PATH
    else:
        card_path = (path if path.suffix == ".json"
                     else card_module.card_path_for(path / "disa.onnx"))
        if not card_path.is_file():
            raise SystemExit(f"no model card at {card_path}")
        card_module.default_card_path = lambda: card_path
    pipeline._extractors.clear()
    found = card_module.default_card_path()
    assert found is not None
    return card_module.load_model_card(found, verify=False).version


def run(models: Sequence[Path | None], similarities: Sequence[str],
        cases: Sequence[tuple[str, str, str]], seeds: int = 2) -> list[dict]:
    from disa.registration.options import RegistrationOptions
    from disa.registration.pipeline import register

    pairs = make_pairs(cases, seeds)
    methods: list[tuple[str, str, Path | None]] = []
    for similarity in similarities:
        if similarity == "disa":
            methods += [("disa", "", m) for m in models]
        else:
            methods.append((similarity, similarity, None))
    rows = []
    for similarity, label, model in methods:
        if similarity == "disa":
            label = use_model(model)
        options = RegistrationOptions(similarity=similarity, starts=1, init="geometry")
        for name, fixed, moving, points in pairs:
            t0 = time.perf_counter()
            result = register(fixed, moving, options)
            rows.append({"method": label, "case": name,
                         "drift_mm": drift_mm(result.transform, points),
                         "seconds": time.perf_counter() - t0})
            print(f"  {label:28s} {name:44s} {rows[-1]['drift_mm']:6.2f} mm", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    table = {(r["method"], r["case"]): r["drift_mm"] for r in rows}
    lines = ["| case | " + " | ".join(methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for case in cases:
        lines.append(f"| {case} | " + " | ".join(
            f"{table[(m, case)]:.2f}" if (m, case) in table else "" for m in methods) + " |")
    for name, fn in (("mean", np.mean), ("median", np.median)):
        lines.append(f"| **{name}** | " + " | ".join(
            f"**{fn([table[(m, c)] for c in cases if (m, c) in table]):.2f}**"
            for m in methods) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="an exported model folder or card (repeatable); default the shipped one")
    p.add_argument("--with-shipped", action="store_true",
                   help="also run the shipped model beside the --model ones")
    p.add_argument("--similarities", default="disa,mind")
    p.add_argument("--engine", default=None,
                   help="DISA engine for every model (default openvino-fp32 when installed)")
    p.add_argument("--seeds", type=int, default=2, help="image draws per case (default 2)")
    p.add_argument("--quick", action="store_true", help="two cases, one draw each")
    args = p.parse_args(argv)
    engine = args.engine
    if engine is None:
        try:
            import openvino  # noqa: F401
            engine = "openvino-fp32"
        except ImportError:
            engine = "onnxruntime"
    os.environ["DISA_DESCRIPTOR_ENGINE"] = engine
    models: list[Path | None] = list(args.model or [])
    if not models or args.with_shipped:
        models.insert(0, None)
    cases = CASES[:1] + CASES[5:6] if args.quick else CASES
    print(f"Machine: {machine()}; DISA engine {engine}")
    seeds = 1 if args.quick else args.seeds
    rows = run(models, [s.strip() for s in args.similarities.split(",") if s.strip()], cases,
               seeds)
    print("\nDistance (mm) of the optimum reached from the true pose:\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
