"""Deformable and rigid+probe modes on partial views: the rigid pose found as the rigid
search finds it.

    python benchmarks/deformable_views.py [--seed 0] [--cases-per-bin 1] [--bins 0,1,2,3]
                                          [--pairs ct-mr,t1-t2,ct-mr-torso]
                                          [--mode deformable|rigid+probe] [--out DIR]
    python benchmarks/deformable_views.py --quick     # one small case: the harness works

Cases: the realistic family (``capture_range.make_realistic_cases``): each image on its own
grid, the moving image a cropped view or a slab, a rigid truth drawn per initial-error
bin (``--pairs ct-us-moving`` for rigid+probe: an ultrasound fan moving). Each case runs
three times in one process with ``register``'s defaults: ``rigid`` (``--mode rigid``),
``before`` (``--mode`` MODE sampling the fixed image throughout, ``pipeline._linear_first``
switched off: the engine until 2026-12-07) and ``after`` (MODE as the engine is: on a
smaller moving view, the rigid search first, then MODE refined from its pose on the fixed
points that pose maps inside the moving data). A run that raises is recorded with its
message and an infinite TRE.
Per case: the TRE (mm) of the linear part (``transform``) and of the full mapping
(``field_transform``) against the rigid truth, which image the search sampled, the
verdict and the time; every row in ``--out``/deformable_views.jsonl.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONVERGED_MM = 10.0


def linear_first_off() -> AbstractContextManager[None]:
    """The engine before 2026-12-07: a deformable run samples the fixed image throughout."""
    from common import replaced

    from disa.registration import pipeline

    return replaced(pipeline, "_linear_first", lambda options, pair: False)


def run_case(case: Any, mode: str) -> dict[str, Any]:
    """One registration of ``case`` in ``mode``: TREs (mm), sampled image, verdict, time."""
    import capture_range

    from disa.registration.options import RegistrationOptions
    from disa.registration.pipeline import register

    t0 = time.perf_counter()
    try:
        result = register(case.fixed, case.moving, RegistrationOptions(mode=mode))
    except Exception as error:  # (a benchmark row, not a crash: the message says what)
        return {"tre_mm": float("inf"), "field_tre_mm": float("inf"), "sampled": None,
                "verdict": f"raised: {error}", "seconds": round(time.perf_counter() - t0, 2)}
    seconds = time.perf_counter() - t0
    full = result.field_transform or result.transform
    return {"tre_mm": round(capture_range.tre(result.transform, case.truth, case.points), 2),
            "field_tre_mm": round(capture_range.tre(full, case.truth, case.points), 2),
            "sampled": result.sampled, "verdict": result.summary()["verdict"],
            "seconds": round(seconds, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from common import comparison_cases, comparison_parser, machine, run_rows, within

    p = comparison_parser(__doc__.splitlines()[0], ("ct-mr", "t1-t2", "ct-mr-torso"),
                          HERE / "results")
    p.add_argument("--mode", choices=("deformable", "rigid+probe"), default="deformable")
    args = p.parse_args(argv)
    print(f"# {args.mode} mode on partial views — {machine()}; seed {args.seed}")
    pairs, cases = comparison_cases(args, quick_pair="t1-t2")
    name = "deformable_views" if args.mode == "deformable" else "probe_views"
    rows = run_rows(
        cases, [("rigid", lambda case: run_case(case, "rigid")),
                ("before", within(linear_first_off, lambda case: run_case(case, args.mode))),
                ("after", lambda case: run_case(case, args.mode))],
        {"mode": args.mode, "seed": args.seed}, args.out / f"{name}.jsonl",
        lambda row: (f"linear TRE {row['tre_mm']} mm, full {row['field_tre_mm']} mm, "
                     f"sampled {row['sampled']}, {row['verdict']}, {row['seconds']} s"))
    for pair in pairs:
        for run in ("rigid", "before", "after"):
            sel = [r for r in rows if r["pair"] == pair and r["run"] == run]
            converged = sum(r["field_tre_mm"] < CONVERGED_MM for r in sel)
            wrong_likely = sum(r["verdict"] == "likely" and r["field_tre_mm"] >= CONVERGED_MM
                               for r in sel)
            seconds = sorted(r["seconds"] for r in sel)
            print(f"{pair} {run}: {converged} of {len(sel)} converged (full mapping), "
                  f"{wrong_likely} wrong results called likely, median "
                  f"{seconds[len(seconds) // 2]} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
