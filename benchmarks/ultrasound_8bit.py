"""Realistic CT/ultrasound cases with the ultrasound exported as 8 bits, as scanners write it.

    python benchmarks/ultrasound_8bit.py [--seed 0] [--cases-per-bin 3] [--bins 0,1,2,3]
                                         [--pairs ct-us-moving,us-ct] [--out DIR]
    python benchmarks/ultrasound_8bit.py --quick     # one small case, both runs: the harness works

Cases: the realistic family's CT/ultrasound pairs (``capture_range.make_realistic_cases``,
the ultrasound fixed or moving). The ultrasound is rescaled so that its 99.5th percentile
inside the fan is 255 and rounded to uint8 (``eight_bit``): its acoustic shadows become
exact zeros, as in a scanner's export. Each case runs twice in the same process with
``disa.registration.pipeline.register``'s defaults: as the engine is (``after``), and with
``fov.acoustic_shadows`` switched off (``before``: shadows that touch the padding count as
padding, what the engine did until 2026-12-07). Per pair and run: cases converged (TRE <
10 mm, the capture-range benchmark's TRE), the verdicts, and every case in
``--out``/ultrasound_8bit.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import contextmanager
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


@contextmanager
def shadows_off():
    """The engine as before 2026-12-07: no acoustic shadow is taken back from the padding."""
    from disa.registration import fov

    original = fov.acoustic_shadows
    fov.acoustic_shadows = lambda padding, spacing: np.zeros(padding.shape, dtype=bool)
    try:
        yield
    finally:
        fov.acoustic_shadows = original


def run_case(case: Any) -> dict[str, Any]:
    """One case with the ultrasound in 8 bits: TRE (mm), verdict, which image was the
    ultrasound."""
    import capture_range

    from disa.registration.pipeline import register

    fixed, moving = ((case.fixed, eight_bit(case.moving)) if case.pair == "ct-us-moving"
                     else (eight_bit(case.fixed), case.moving))
    result = register(fixed, moving)
    summary = result.summary()
    return {"tre_mm": round(capture_range.tre(result.transform, case.truth, case.points), 2),
            "verdict": summary["verdict"], "ultrasound": summary["ultrasound"]}


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    import capture_range
    from common import machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases-per-bin", type=int, default=3)
    p.add_argument("--bins", default="0,1,2,3")
    p.add_argument("--pairs", default="ct-us-moving,us-ct")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    per_bin, bins = (1, (0,)) if args.quick else (
        args.cases_per_bin, tuple(int(b) for b in args.bins.split(",")))
    pairs = ["ct-us-moving"] if args.quick else args.pairs.split(",")
    print(f"# ultrasound in 8 bits — {machine()}; seed {args.seed}")
    cases = capture_range.make_realistic_cases(per_bin, pairs, args.seed, bins,
                                               crop=56 if args.quick else None,
                                               log=lambda line: None)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out / "ultrasound_8bit.jsonl", "w") as log:
        for case in cases:
            for run in ("before", "after"):
                if run == "before":
                    with shadows_off():
                        row = run_case(case)
                else:
                    row = run_case(case)
                row = {"case": case.name, "pair": case.pair, "run": run, "seed": args.seed,
                       **row}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                print(f"{case.name} {run}: TRE {row['tre_mm']} mm, {row['verdict']}",
                      flush=True)
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
