"""Per-stage profile of the default rigid, affine and deformable registrations.

    python benchmarks/stage_profile.py [--cases-per-bin N] [--bins 0,2] [--pairs a,b,...]
                                       [--modes rigid,affine,deformable] [--no-cold]
                                       [--similarity S] [--working-spacing MM]
                                       [--reorient-passes N]   # settings to try
    python benchmarks/stage_profile.py --quick      # one small case: the harness works

Cases: the realistic capture-range family (benchmarks/realistic_cases.py through
``capture_range.make_realistic_cases``): each image on its own grid, partial views
(a cropped MR, a T2 slab, an ultrasound fan), head and torso. Default pairs: ct-mr,
t1-t2, ct-mr-torso, us-ct. Every run is ``register(fixed, moving,
RegistrationOptions(mode=MODE))``: the engine's defaults, nothing else.

Warm runs (this process): after one untimed call per mode on the first case (it pays
the one-off costs below), every case in every mode; per stage of ``result.timings``
(seconds: preprocess, descriptors, search with its parts coarse / fine / refine,
reorient, affine, deformable with its parts, field) the median over the cases, the
median wall time of ``register`` ("total") and of what no stage covers ("other").
Sub-stages are part of the stage above them, not added to the total.

Cold costs (fresh processes, rigid mode, the first case): seconds to import the
engine, to create the descriptor extractor (model load and session compile; DISA
similarity only), and per stage the first ``register`` call minus the second one in
the same process (numba's cache load or compile, first-inference page faults, lazy
imports). Measured twice: with numba's on-disk cache as it is (what every new process
pays) and with an empty cache (``NUMBA_CACHE_DIR`` a fresh folder: the first run
after an install).

Output: the tables on stdout and in ``--out``/stage_profile.md (default
benchmarks/results/), with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from common import (
    add_case_arguments,
    case_command,
    case_selection,
    machine,
    report_header,
    write_report,
)

HERE = Path(__file__).resolve().parent
MODES = ("rigid", "affine", "deformable")
PAIRS = ("ct-mr", "t1-t2", "ct-mr-torso", "us-ct")
DEFAULT_BINS = (0, 2)
#: Sub-stage prefixes: ``search_coarse`` is part of ``search``, ``deformable_adam`` of
#: ``deformable``.
PARENTS = ("search", "deformable")
#: Source cube (voxels) of --quick's one case.
QUICK_CROP = 56


# ----------------------------------------------------------------- measuring


@dataclass
class Run:
    """One registration: wall seconds of ``register``, its per-stage seconds, facts."""

    total: float
    timings: dict[str, float]
    similarity: str
    transform: sitk.Transform | None = None
    pair: str = ""
    tre_mm: float = float("nan")
    working_spacing_mm: float = float("nan")


def profile_one(fixed: sitk.Image, moving: sitk.Image, mode: str,
                similarity: str | None = None, working_spacing: float | None = None) -> Run:
    """One default registration in ``mode`` (``similarity``, ``working_spacing`` in mm:
    None for the engine's default)."""
    from disa.registration.options import RegistrationOptions
    from disa.registration.pipeline import register

    t0 = time.perf_counter()
    result = register(fixed, moving, RegistrationOptions(
        mode=mode, similarity=similarity, working_spacing=working_spacing))
    total = time.perf_counter() - t0
    return Run(total, dict(result.timings), result.similarity, result.transform,
               working_spacing_mm=float(result.working_spacing_mm))


def is_substage(name: str) -> bool:
    """Whether a timing key is part of another stage (``search_fine`` of ``search``; a
    deformable run on a smaller moving view prefixes its rigid run's keys ``linear_``)."""
    name = name.removeprefix("linear_")
    return any(name.startswith(f"{p}_") for p in PARENTS)


def other_seconds(total: float, timings: dict[str, float]) -> float:
    """Wall seconds of ``register`` that no top-level stage covers (options, result)."""
    return total - sum(v for k, v in timings.items() if not is_substage(k))


def stage_order(runs: Sequence[dict[str, float]]) -> list[str]:
    """Every stage key of ``runs`` in pipeline order, each sub-stage after its parent."""
    seen: list[str] = []
    for timings in runs:
        for key in timings:
            if key not in seen:
                seen.append(key)
    top = [k for k in seen if not is_substage(k)]
    ordered: list[str] = []
    for key in top:
        ordered.append(key)
        ordered.extend(sorted((k for k in seen if k.startswith(f"{key}_")),
                              key=seen.index))
    ordered.extend(k for k in seen if k not in ordered)  # a sub-stage without its parent
    return ordered


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def stage_table(runs: dict[str, list[Run]], modes: Sequence[str]) -> str:
    """Markdown: per stage (rows) and mode (columns) the median seconds over the cases;
    a stage a case did not run counts as absent, not as zero."""
    keys = stage_order([r.timings for m in modes for r in runs.get(m, [])])
    lines = ["| stage (median s) | " + " | ".join(modes) + " |",
             "|---|" + "---:|" * len(modes)]
    for key in keys:
        parent, _, part = key.partition("_")
        label = f"· {part} (in {parent})" if is_substage(key) else key
        cells = [_fmt(_median([r.timings[key] for r in runs.get(m, []) if key in r.timings]))
                 for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    others = [_fmt(_median([other_seconds(r.total, r.timings) for r in runs.get(m, [])]))
              for m in modes]
    lines.append("| other (not in a stage) | " + " | ".join(others) + " |")
    totals = [_fmt(_median([r.total for r in runs.get(m, [])])) for m in modes]
    lines.append("| **total (wall)** | " + " | ".join(f"**{t}**" for t in totals) + " |")
    lines.append("| cases | " + " | ".join(str(len(runs.get(m, []))) for m in modes) + " |")
    return "\n".join(lines) + "\n"


def pair_table(runs: dict[str, list[Run]], modes: Sequence[str], pairs: Sequence[str]) -> str:
    """Markdown: per pair the median wall seconds per mode (max in brackets) and the
    median TRE (mm) of the result's linear transform per mode."""
    lines = ["| pair | " + " | ".join(f"{m} total s (max)" for m in modes)
             + " | linear TRE median mm (" + ", ".join(modes) + ") | working spacing mm |",
             "|---|" + "---:|" * (len(modes) + 2)]
    for pair in pairs:
        cells, tres = [], []
        spacings = [r.working_spacing_mm for m in modes for r in runs.get(m, []) if r.pair == pair]
        for m in modes:
            mine = [r for r in runs.get(m, []) if r.pair == pair]
            totals = [r.total for r in mine]
            cells.append(f"{_fmt(_median(totals))} ({_fmt(max(totals) if totals else None)})")
            tres.append(_fmt(_median([r.tre_mm for r in mine]), ".1f"))
        lines.append(f"| {pair} | " + " | ".join(cells) + " | " + " / ".join(tres) + " | "
                     + (f"{min(spacings):.2f}-{max(spacings):.2f}" if spacings else "–") + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------- cold child


def cold_child(fixed_path: str, moving_path: str, mode: str,
               similarity: str | None = None) -> dict[str, Any]:
    """In a fresh process: import, extractor creation (DISA similarity), then the same
    registration twice. Seconds; the caller prints the dict as JSON."""
    t0 = time.perf_counter()
    from disa.registration.options import RegistrationOptions
    from disa.registration.pipeline import disa_extractor, resolve_similarity

    imported = time.perf_counter() - t0
    fixed, moving = sitk.ReadImage(fixed_path), sitk.ReadImage(moving_path)
    similarity = resolve_similarity(RegistrationOptions(mode=mode, similarity=similarity))
    t1 = time.perf_counter()
    if similarity == "disa":
        extractor, _ = disa_extractor()
        _ = extractor.session  # the lazily created session (model load, compile)
    model_load = time.perf_counter() - t1 if similarity == "disa" else None
    first = profile_one(fixed, moving, mode, similarity)
    second = profile_one(fixed, moving, mode, similarity)
    return {"import_s": imported, "model_load_s": model_load, "similarity": similarity,
            "first": {"total": first.total, "timings": first.timings},
            "second": {"total": second.total, "timings": second.timings}}


def run_cold(fixed_path: Path, moving_path: Path, mode: str, numba_cache: str | None,
             similarity: str | None = None) -> dict[str, Any]:
    """``cold_child`` in a subprocess; ``numba_cache``: NUMBA_CACHE_DIR (None: as it is).
    Adds "process_s", the subprocess's wall seconds from start to exit."""
    env = dict(os.environ)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = numba_cache
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cold-child",
                           str(fixed_path), str(moving_path), mode,
                           similarity or "default"],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"cold child failed ({done.returncode}): {done.stderr[-2000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("@@")][-1]
    data = json.loads(line[2:])
    data["process_s"] = wall
    return data


def cold_table(colds: dict[str, dict[str, Any]]) -> str:
    """Markdown: per cold condition (columns) import, model load, first-call extra per
    stage (first minus second call in the same process) and the whole process."""
    names = list(colds)
    keys = [k for k in stage_order([c["first"]["timings"] for c in colds.values()])
            if not is_substage(k) or k.startswith("search_")]
    lines = ["| cold cost (s) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]

    def row(label: str, get: Callable[[dict[str, Any]], float | None]) -> None:
        lines.append(f"| {label} | " + " | ".join(_fmt(get(c)) for c in colds.values()) + " |")

    def extra(c: dict[str, Any], key: str) -> float:
        return float(c["first"]["timings"].get(key, 0.0) - c["second"]["timings"].get(key, 0.0))

    row("import the engine", lambda c: c["import_s"])
    row("create the descriptor extractor (model load)", lambda c: c["model_load_s"])
    for key in keys:
        row(f"first call extra: {key}", lambda c, k=key: extra(c, k))
    row("first call extra: total", lambda c: c["first"]["total"] - c["second"]["total"])
    row("first `register` call (wall)", lambda c: c["first"]["total"])
    row("second `register` call (wall, warm)", lambda c: c["second"]["total"])
    row("whole process (start to exit, both calls)", lambda c: c["process_s"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def _command(args: argparse.Namespace) -> str:
    parts = case_command("stage_profile.py", args, "--modes", args.modes)
    if args.similarity:
        parts.append(f"--similarity {args.similarity}")
    if args.working_spacing:
        parts.append(f"--working-spacing {args.working_spacing:g}")
    if args.reorient_passes is not None:
        parts.append(f"--reorient-passes {args.reorient_passes}")
    if args.no_cold:
        parts.append("--no-cold")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_arguments(p, PAIRS, DEFAULT_BINS)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cost processes")
    p.add_argument("--quick", action="store_true",
                   help="one ct-mr case of a 56-voxel crop; cold costs with the cache as it is")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--similarity", choices=("disa", "mind", "lc2"), default=None,
                   help="default: the engine's own choice (what a user gets)")
    p.add_argument("--working-spacing", type=float, default=None,
                   help="mm; default: the engine's choice from the images")
    p.add_argument("--reorient-passes", type=int, default=None,
                   help="experiment: re-oriented refinement passes for every similarity "
                        "(replaces the entries of similarity.spec.SIMILARITIES in this "
                        "process; default: the engine's)")
    p.add_argument("--cold-child", nargs=4, metavar=("FIXED", "MOVING", "MODE", "SIMILARITY"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_child:
        fixed, moving, mode, sim = args.cold_child
        print("@@" + json.dumps(cold_child(fixed, moving, mode, None if sim == "default" else sim)))
        return 0

    import capture_range

    if args.reorient_passes is not None:
        from dataclasses import replace

        from disa.registration.similarity import spec

        for key in ("mind", "disa"):
            spec.SIMILARITIES[key] = replace(spec.SIMILARITIES[key],
                                             reorient_passes=args.reorient_passes)
    modes = [m for m in args.modes.split(",") if m]
    pairs, bins, crop, per_bin = case_selection(args, QUICK_CROP)
    print(f"# stage profile — {machine()}", flush=True)
    cases = capture_range.make_realistic_cases(per_bin, pairs, args.seed, bins, crop=crop,
                                               log=print)
    runs: dict[str, list[Run]] = {m: [] for m in modes}
    colds: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="stage-profile-") as tmp:
        if not args.no_cold:
            fixed_path, moving_path = Path(tmp, "fixed.mha"), Path(tmp, "moving.mha")
            sitk.WriteImage(cases[0].fixed, str(fixed_path))
            sitk.WriteImage(cases[0].moving, str(moving_path))
            conditions = {"numba cache on disk": None}
            if not args.quick:
                conditions["empty numba cache (first run)"] = str(Path(tmp, "numba"))
            for name, cache in conditions.items():
                colds[name] = run_cold(fixed_path, moving_path, "rigid", cache, args.similarity)
                print(f"cold ({name}): {json.dumps(colds[name])}", flush=True)
    for mode in modes:  # warm-up: the one-off costs, untimed
        t0 = time.perf_counter()
        profile_one(cases[0].fixed, cases[0].moving, mode, args.similarity,
                    args.working_spacing)
        print(f"warm-up {mode}: {time.perf_counter() - t0:.1f} s", flush=True)
    similarity = ""
    for case in cases:
        for mode in modes:
            run = profile_one(case.fixed, case.moving, mode, args.similarity,
                              args.working_spacing)
            similarity, run.pair = run.similarity, case.pair
            run.tre_mm = capture_range.tre(run.transform, case.truth, case.points)
            run.transform = None
            runs[mode].append(run)
            print(f"{case.name} {mode}: {run.total:.2f} s, TRE {run.tre_mm:.1f} mm, "
                  f"working spacing {run.working_spacing_mm:.2f} mm, "
                  + ", ".join(f"{k} {v:.2f}" for k, v in run.timings.items()), flush=True)
    header = (report_header(_command(args))
              + f"Cases: {len(cases)} realistic ({', '.join(pairs)}; bins {bins}; "
              f"{per_bin} per bin{f', {crop}-voxel crop' if crop else ''}); similarity "
              f"{similarity} ({'chosen' if args.similarity else 'the default'}); `register(fixed, "
              f"moving, RegistrationOptions(mode=MODE))`.\n")
    text = (header + "\n### Warm runs: median seconds per stage\n\n" + stage_table(runs, modes)
            + "\n### Per pair: median wall seconds per mode (max)\n\n"
            + pair_table(runs, modes, pairs))
    if colds:
        text += ("\n### Cold costs (fresh process, rigid, first case)\n\n" + cold_table(colds))
    write_report(args.out, "stage_profile.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
