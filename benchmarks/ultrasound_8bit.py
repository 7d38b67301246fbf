"""Realistic CT/ultrasound cases with the ultrasound exported as scanners write it.

    python benchmarks/ultrasound_8bit.py [--seed 0] [--cases-per-bin 3] [--bins 0,1,2,3]
                                         [--pairs ct-us-moving,us-ct]
                                         [--export float|8bit|jpeg-ring|thick-slice]
                                         [--before shadows|growth|hull] [--out DIR]
    python benchmarks/ultrasound_8bit.py --quick     # one small case, both runs: the harness works

Cases: the realistic family's CT/ultrasound pairs (``capture_range.make_realistic_cases``,
the ultrasound fixed or moving). ``--export`` says how the ultrasound is written
(``EXPORTS``): ``8bit`` rescales it so that its 99.5th percentile inside the fan is 255 and
rounds to uint8 (``eight_bit``): its acoustic shadows become exact zeros, as in a
scanner's export; ``jpeg-ring`` adds the ring of values 0-5 that a lossy codec leaves
around the fan (``jpeg_ring``); ``thick-slice`` smooths along the slices before the 8-bit
export, so that the fan's edge ramps into the padding (``thick_slice``). Each case runs
twice in the same process with ``disa.registration.pipeline.register``'s defaults: as the
engine is (``after``), and with the feature that handles the export switched off
(``before``, ``BEFORE``): for ``8bit`` ``fov.acoustic_shadows`` (shadows that touch the
padding count as padding, the engine until 2026-12-07), for the other two
``fov.grown_padding`` (padding is exact only, the engine until 2026-12-08); ``--before
hull`` switches off the beam's search on the fan's convex hull instead (``hull_off``),
and ``--export float`` keeps the simulated float ultrasound. Per pair and
run: cases converged (TRE < 10 mm, the capture-range benchmark's TRE), the verdicts, and
every case in ``--out``/ultrasound_EXPORT.jsonl.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
CONVERGED_MM = 10.0


def eight_bit(image: sitk.Image) -> sitk.Image:
    """``image`` as uint8: 0 stays 0, the 99.5th percentile of the non-zero voxels maps to
    255 (brighter voxels clip), rounded; same geometry."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    top = float(np.percentile(array[array != 0], 99.5))
    out = sitk.GetImageFromArray(np.clip(np.round(array / top * 255.0), 0, 255)
                                 .astype(np.uint8))
    out.CopyInformation(image)
    return out


def jpeg_ring(image: sitk.Image, seed: int = 0, width: int = 3) -> sitk.Image:
    """``image`` (uint8, zeros outside its fan) with the ring a lossy codec leaves around the
    fan: the ``width`` voxels of padding next to the data hold 0-5 (uniform) instead of 0."""
    from scipy import ndimage

    array = sitk.GetArrayFromImage(image)
    data = array != 0
    ring = ndimage.binary_dilation(data, iterations=width) & ~data
    values = np.random.default_rng(seed).integers(0, 6, int(ring.sum()))
    array[ring] = values.astype(array.dtype)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def thick_slice(image: sitk.Image, sigma_voxels: float = 1.5) -> sitk.Image:
    """``image`` smoothed along its own slice axis (a Gaussian of ``sigma_voxels``, kernel cut
    at 4 sigma), as a thick-slice reconstruction leaves it: the fan's edge becomes a ramp
    over ~6 slices of small non-zero values, the padding beyond stays exact."""
    from scipy import ndimage

    array = sitk.GetArrayFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(ndimage.gaussian_filter1d(array, sigma_voxels, axis=0))
    out.CopyInformation(image)
    return out


#: How the ultrasound is written: 8 bits (a scanner's export), 8 bits with a lossy codec's
#: ring around the fan, or smoothed along its slices before the 8-bit export.
EXPORTS: dict[str, Callable[[sitk.Image], sitk.Image]] = {
    "float": lambda image: image,
    "8bit": eight_bit,
    "jpeg-ring": lambda image: jpeg_ring(eight_bit(image)),
    "thick-slice": lambda image: eight_bit(thick_slice(image)),
}


def shadows_off() -> AbstractContextManager[None]:
    """The engine as before 2026-12-07: no acoustic shadow is taken back from the padding."""
    from common import replaced

    from disa.registration import fov

    return replaced(fov, "acoustic_shadows",
                    lambda padding, spacing: np.zeros(padding.shape, dtype=bool))


def growth_off() -> AbstractContextManager[None]:
    """The engine as before 2026-12-08: padding is exact, never grown through near-equal
    voxels (``fov.grown_padding`` returns the exact padding)."""
    from common import replaced

    from disa.registration import fov

    return replaced(fov, "grown_padding", lambda array, padding, value: padding)


def hull_off() -> AbstractContextManager[None]:
    """The engine as before 2026-12-08: a fan's beam is looked for on its data only, never
    on the data's convex hull first (``fov._hull_points`` returns None)."""
    from common import replaced

    from disa.registration import fov

    return replaced(fov, "_hull_points", lambda data, spacing: None)


#: What a "before" run switches off: by default the feature that handles the export.
SWITCHES = {"shadows": shadows_off, "growth": growth_off, "hull": hull_off}
BEFORE = {"float": "shadows", "8bit": "shadows", "jpeg-ring": "growth",
          "thick-slice": "growth"}


def run_case(case: Any, export: str = "8bit") -> dict[str, Any]:
    """One case with the ultrasound written as ``export`` (``EXPORTS``): TRE (mm), verdict,
    which image was the ultrasound."""
    import capture_range

    from disa.registration.pipeline import register

    written = EXPORTS[export]
    fixed, moving = ((case.fixed, written(case.moving)) if case.pair == "ct-us-moving"
                     else (written(case.fixed), case.moving))
    result = register(fixed, moving)
    summary = result.summary()
    return {"tre_mm": round(capture_range.tre(result.transform, case.truth, case.points), 2),
            "verdict": summary["verdict"], "ultrasound": summary["ultrasound"]}


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from common import comparison_cases, comparison_parser, machine, run_rows, within

    p = comparison_parser(__doc__.splitlines()[0], ("ct-us-moving", "us-ct"),
                          HERE / "results", cases_per_bin=3)
    p.add_argument("--export", choices=sorted(EXPORTS), default="8bit")
    p.add_argument("--before", choices=sorted(SWITCHES), default=None,
                   help="what the before run switches off (default: the export's feature)")
    args = p.parse_args(argv)
    print(f"# ultrasound written as {args.export} — {machine()}; seed {args.seed}")
    pairs, cases = comparison_cases(args, quick_pair="ct-us-moving")
    switch = args.before or BEFORE[args.export]
    rows = run_rows(
        cases, [("before", within(SWITCHES[switch], lambda case: run_case(case, args.export))),
                ("after", lambda case: run_case(case, args.export))],
        {"export": args.export, "switched_off": switch, "seed": args.seed},
        args.out / f"ultrasound_{args.export}.jsonl",
        lambda row: f"TRE {row['tre_mm']} mm, {row['verdict']}")
    for pair in pairs:
        for run in ("before", "after"):
            sel = [r for r in rows if r["pair"] == pair and r["run"] == run]
            converged = sum(r["tre_mm"] < CONVERGED_MM for r in sel)
            wrong_likely = sum(r["verdict"] == "likely" and r["tre_mm"] >= CONVERGED_MM
                               for r in sel)
            print(f"{pair} {run}: {converged} of {len(sel)} converged, "
                  f"{wrong_likely} wrong results called likely")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
