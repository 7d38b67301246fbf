"""End-to-end time per case: process start to result folder, DISA and its peers.

    python benchmarks/end_to_end.py [--cases-per-bin N] [--bins 0,2] [--pairs a,b,...]
                                    [--methods disa,sitk-mi,elastix,ants] [--no-warm]
    python benchmarks/end_to_end.py --quick      # one small case: the harness works

Cases: the realistic capture-range family (``capture_range.make_realistic_cases``,
benchmarks/realistic_cases.py): each image on its own grid, partial views, head and
torso; default pairs ct-mr, t1-t2, ct-mr-torso, us-ct. Each case's images are written
as NIfTI (``fixed.nii.gz``, ``moving.nii.gz``), what a user has on disk.

Methods (the peers' recipes are capture_range.py's, from the header pose):

    disa     ``disa register FIXED MOVING -o OUT``: the CLI with its defaults (rigid);
             the folder holds transform.tfm, registered.nii.gz, qa.png, result.json
    sitk-mi  SimpleITK Mattes MI (``capture_range.sitk_mi``)
    elastix  itk-elastix default rigid map (``capture_range.elastix``)
    ants     ANTsPy rigid, Mattes MI (``capture_range.ants``)

A peer's run reads both files with SimpleITK, registers, and writes transform.tfm and
registered.nii.gz (the moving image resampled on the fixed grid, linear) to OUT.

Cold: a fresh process per case and method, timed from its start to its exit (the
result folder complete); cases in turn, the methods one after the other on each
case. Caches on disk are as they are (numba's, the OS's file cache): what every new
``disa register`` pays (interpreter, imports, numba cache load, first-call costs), not
the first run after an install (benchmarks/stage_profile.py measures that). A peer's
process also imports this harness (capture_range.py's module, ~0.6 s); the time it
takes is measured in that process and subtracted.

Warm: one process per method runs the first case once untimed, then every case,
timing each from reading the files to the complete folder: a service worker's steady
state. DISA's warm runs are split into read, register and write.

Per pair and method: median cold and warm seconds and their ratio to SimpleITK MI's
median in the same run (target: DISA <= 1x on every pair, no case over 2x); the
highest per-case ratio; TRE (mm, the capture-range benchmark's, over the overlap at
the true pose) of the folder's transform.tfm. Output: stdout and
``--out``/end_to_end.md (default benchmarks/results/), with command and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ("disa", "sitk-mi", "elastix", "ants")
PAIRS = ("ct-mr", "t1-t2", "ct-mr-torso", "us-ct")
DEFAULT_BINS = (0, 2)
BASELINE = "sitk-mi"
#: Source cube (voxels) of --quick's one case.
QUICK_CROP = 56
#: The peers' packages (capture_range._PACKAGE): a method without its package is skipped.
PACKAGES = {"elastix": "itk", "ants": "ants"}


@dataclass
class Timing:
    """One method on one case: cold and warm wall seconds, TRE and what went wrong."""

    case: str
    pair: str
    method: str
    cold_s: float | None = None
    warm_s: float | None = None
    tre_mm: float | None = None
    error: str | None = None
    #: Warm DISA runs: seconds reading, registering and writing the folder.
    phases: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------- in the children


def peer_folder(method: str, fixed_path: str, moving_path: str, out: str) -> None:
    """A peer's end-to-end run: read, register (capture_range's recipe), write OUT."""
    import capture_range
    import SimpleITK as sitk

    fixed, moving = sitk.ReadImage(fixed_path), sitk.ReadImage(moving_path)
    transform, *_ = capture_range.METHODS[method](fixed, moving)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(folder / "transform.tfm"))
    registered = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    sitk.WriteImage(registered, str(folder / "registered.nii.gz"))


def disa_folder(fixed_path: str, moving_path: str, out: str) -> dict[str, float]:
    """``disa register FIXED MOVING -o OUT`` in this process (what the CLI calls), with
    the seconds spent reading, registering and writing the folder."""
    from disa.registration.results.outputs import check_output_folder
    from disa.registration.runner import run_registration

    marks: dict[str, float] = {"start": time.perf_counter()}

    def progress(stage: str, fraction: float) -> None:
        if stage != "read":
            marks.setdefault("registering", time.perf_counter())
        if stage in ("write", "done"):
            marks.setdefault(stage, time.perf_counter())

    check_output_folder(Path(out))
    run_registration(fixed_path, moving_path, out, progress=progress)
    return {"read": marks["registering"] - marks["start"],
            "register": marks["write"] - marks["registering"],
            "write": marks["done"] - marks["write"]}


def peer_child(method: str, fixed_path: str, moving_path: str, out: str) -> float:
    """The cold peer process: its own imports, then the harness's (timed, returned so
    the parent subtracts it), then the run."""
    import numpy  # noqa: F401  (the peer's own imports come first)
    import SimpleITK  # noqa: F401

    t0 = time.perf_counter()
    import capture_range  # noqa: F401

    harness = time.perf_counter() - t0
    peer_folder(method, fixed_path, moving_path, out)
    return harness


def warm_child(method: str, jobs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Warm runs: the first job once untimed (to a scratch folder), then every job."""
    def one(job: dict[str, str], out: str) -> dict[str, float]:
        if method == "disa":
            return disa_folder(job["fixed"], job["moving"], out)
        peer_folder(method, job["fixed"], job["moving"], out)
        return {}

    scratch = tempfile.mkdtemp(prefix="e2e-warmup-")
    try:
        one(jobs[0], str(Path(scratch, "out")))
    except Exception as exc:  # the timed runs report failures
        print(f"warm-up {method} failed: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            phases, error = one(job, job["out"]), None
        except Exception as exc:
            phases, error = {}, f"{type(exc).__name__}: {exc}"
        rows.append({"case": job["case"], "seconds": time.perf_counter() - t0,
                     "phases": phases, "error": error})
    return rows


# ------------------------------------------------------------------ parent


def disa_command() -> list[str]:
    """How a user starts the CLI from this environment."""
    exe = Path(sys.executable).parent / "disa"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "disa"]


def cold_run(method: str, fixed: Path, moving: Path, out: Path) -> tuple[float, str | None]:
    """One fresh process: (wall seconds start to exit, less the harness's import for a
    peer; the error or None)."""
    if method == "disa":
        command = [*disa_command(), "register", str(fixed), str(moving), "-o", str(out)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--peer-child", method,
                   str(fixed), str(moving), str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return wall, f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    if method != "disa":
        wall -= json.loads(_tagged(done.stdout)[-1])["harness_s"]
    return wall, None


def warm_runs(method: str, jobs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``warm_child`` in one fresh process for ``method``."""
    jobs_file = Path(jobs[0]["out"]).parent.parent / f"jobs-{method}.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--warm-child",
                           method, str(jobs_file)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"warm runs of {method} failed: {done.stderr[-2000:]}")
    return json.loads(_tagged(done.stdout)[-1])


def _tagged(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("@@")]


def folder_tre(out: Path, case: Any) -> float | None:
    """TRE (mm) of ``out``/transform.tfm against the case's truth, None without the file."""
    import capture_range
    import SimpleITK as sitk

    path = out / "transform.tfm"
    if not path.is_file():
        return None
    return capture_range.tre(sitk.ReadTransform(str(path)), case.truth, case.points)


def floor_seconds(command: list[str], repeats: int = 3) -> float:
    """Median wall seconds of a command that only starts up (the process floor)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(statistics.median(kept)) if kept else None


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def summary_table(timings: Sequence[Timing], methods: Sequence[str], pairs: Sequence[str],
                  baseline: str = BASELINE) -> str:
    """Markdown: per pair and method median cold / warm seconds, their ratios to the
    baseline's medians on that pair, the highest per-case cold ratio, TRE median, failures.
    """
    lines = ["| pair | method | cold s (median) | warm s (median) | cold vs "
             f"{baseline} | warm vs {baseline} | worst case cold vs {baseline} | "
             "TRE median mm | failed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pair in [*pairs, "all"]:
        mine = [t for t in timings if pair in ("all", t.pair)]
        base = {t.case: t for t in mine if t.method == baseline}
        base_cold = _median([t.cold_s for t in base.values()])
        base_warm = _median([t.warm_s for t in base.values()])
        for method in methods:
            rows = [t for t in mine if t.method == method]
            if not rows:
                continue
            cold, warm = _median([t.cold_s for t in rows]), _median([t.warm_s for t in rows])
            worst = [t.cold_s / base[t.case].cold_s for t in rows
                     if t.cold_s and t.case in base and base[t.case].cold_s]
            lines.append(
                f"| {pair} | {method} | {_fmt(cold)} | {_fmt(warm)} | "
                f"{_fmt(ratio(cold, base_cold), '.2f', 'x')} | "
                f"{_fmt(ratio(warm, base_warm), '.2f', 'x')} | "
                f"{_fmt(max(worst) if worst else None, '.2f', 'x')} | "
                f"{_fmt(_median([t.tre_mm for t in rows]), '.1f')} | "
                f"{sum(t.error is not None for t in rows)}/{len(rows)} |")
    return "\n".join(lines) + "\n"


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, None when either is missing or base is 0."""
    return None if value is None or not base else value / base


def case_table(timings: Sequence[Timing], methods: Sequence[str]) -> str:
    """Markdown: every case, cold / warm seconds per method."""
    cases = list(dict.fromkeys(t.case for t in timings))
    by = {(t.case, t.method): t for t in timings}
    lines = ["| case | " + " | ".join(f"{m} cold / warm s" for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for case in cases:
        cells = []
        for m in methods:
            t = by.get((case, m))
            cells.append("–" if t is None else
                         f"{_fmt(t.cold_s)} / {_fmt(t.warm_s)}" + (" (failed)" if t.error else ""))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def phase_line(timings: Sequence[Timing]) -> str:
    """DISA's warm runs: median read / register / write seconds."""
    rows = [t.phases for t in timings if t.method == "disa" and t.phases]
    if not rows:
        return ""
    parts = [f"{k} {_fmt(_median([r.get(k) for r in rows]))} s"
             for k in ("read", "register", "write")]
    return "DISA warm runs, median: " + ", ".join(parts) + ".\n"


def available(method: str) -> bool:
    """Whether the method's package is installed here."""
    import importlib.util

    package = PACKAGES.get(method)
    return package is None or importlib.util.find_spec(package) is not None


def _command(args: argparse.Namespace) -> str:
    from common import case_command

    parts = case_command("end_to_end.py", args, "--methods", args.methods)
    if args.no_warm:
        parts.append("--no-warm")
    return " ".join(parts)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> str:
    """Build the cases, time every method cold and warm, return the markdown report."""
    import capture_range
    import SimpleITK as sitk
    from common import case_selection, machine, report_header

    wanted = [m for m in args.methods.split(",") if m]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    methods = [m for m in wanted if available(m)]
    skipped = [m for m in wanted if m not in methods]
    pairs, bins, crop, per_bin = case_selection(args, QUICK_CROP)
    log(f"# end to end — {machine()}")
    cases = capture_range.make_realistic_cases(per_bin, pairs, args.seed, bins, crop=crop,
                                               log=log)
    timings: dict[tuple[str, str], Timing] = {}
    with tempfile.TemporaryDirectory(prefix="end-to-end-") as tmp:
        work = Path(tmp)
        paths = {}
        for case in cases:
            folder = work / "cases" / case.name
            folder.mkdir(parents=True)
            paths[case.name] = (folder / "fixed.nii.gz", folder / "moving.nii.gz")
            sitk.WriteImage(case.fixed, str(paths[case.name][0]))
            sitk.WriteImage(case.moving, str(paths[case.name][1]))
        floors = {"`disa --version`": floor_seconds([*disa_command(), "--version"]),
                  "`python -c 'import SimpleITK'`": floor_seconds(
                      [sys.executable, "-c", "import SimpleITK"])}
        log("process floor: " + ", ".join(f"{k} {v:.2f} s" for k, v in floors.items()))
        for case in cases:
            fixed, moving = paths[case.name]
            for method in methods:
                out = work / "cold" / method / case.name
                seconds, error = cold_run(method, fixed, moving, out)
                t = Timing(case.name, case.pair, method, cold_s=seconds, error=error,
                           tre_mm=folder_tre(out, case))
                timings[(case.name, method)] = t
                log(f"{case.name} {method} cold: {seconds:.2f} s, TRE {_fmt(t.tre_mm, '.1f')} mm"
                    + (f" [{error}]" if error else ""))
        if not args.no_warm:
            for method in methods:
                jobs = [{"case": c.name, "fixed": str(paths[c.name][0]),
                         "moving": str(paths[c.name][1]),
                         "out": str(work / "warm" / method / c.name)} for c in cases]
                (work / "warm" / method).mkdir(parents=True, exist_ok=True)
                for row in warm_runs(method, jobs):
                    t = timings[(row["case"], method)]
                    t.warm_s, t.phases = row["seconds"], row["phases"]
                    t.error = t.error or row["error"]
                    log(f"{row['case']} {method} warm: {row['seconds']:.2f} s"
                        + (f" {row['phases']}" if row["phases"] else "")
                        + (f" [{row['error']}]" if row["error"] else ""))
    rows = list(timings.values())
    header = (report_header(_command(args)) + f"Cases: {len(cases)} "
              f"realistic ({', '.join(pairs)}; bins {bins}; {per_bin} per bin"
              f"{f', {crop}-voxel crop' if crop else ''}). Process floor: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in floors.items()) + "."
              + (f" Skipped (not installed): {', '.join(skipped)}." if skipped else "") + "\n")
    return (header + "\n" + summary_table(rows, methods, pairs) + "\n" + phase_line(rows)
            + "\n" + case_table(rows, methods))


def main(argv: Sequence[str] | None = None) -> int:
    from common import add_case_arguments, write_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_arguments(p, PAIRS, DEFAULT_BINS)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warm", action="store_true", help="cold runs only")
    p.add_argument("--quick", action="store_true", help="one ct-mr case of a 56-voxel crop")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--peer-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--warm-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_child:
        print("@@" + json.dumps({"harness_s": peer_child(*args.peer_child)}))
        return 0
    if args.warm_child:
        method, jobs_file = args.warm_child
        jobs = json.loads(Path(jobs_file).read_text(encoding="utf-8"))
        print("@@" + json.dumps(warm_child(method, jobs)))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    text = run(args, log=lambda line: print(line, flush=True))
    write_report(args.out, "end_to_end.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
