"""Two commits of the engine on the same realistic cases, timed back to back.

    python benchmarks/commit_ab.py --base REV [--cases-per-bin N] [--bins 0,1,2,3]
                                   [--pairs a,b,...] [--seed S] [--rounds R] [--out FILE]
    python benchmarks/commit_ab.py --base REV --quick     # one small case: the harness works
    python benchmarks/commit_ab.py --base REV --clinical-ct  # the CT on a scanner's grid
    python benchmarks/commit_ab.py --base REV --mode deformable  # another mode's default run

For a change that no switch undoes (search_ab.py undoes the ones that a constant or a
setting can), speed is measured against the commit before it: REV is checked out in a
temporary git worktree, and each round runs the engine of REV, the working tree's,
the working tree's again and REV's again (ABBA: a machine that slows down or speeds up
during the run weighs on both alike), each in a fresh process that imports the `disa`
packages from its own tree (pyproject.toml's package-dir, read from that tree) and
registers every case once untimed first (numba's cache of a new worktree is compiled
then). The cases are the realistic capture-range family, built once by this process
and written as NIfTI, so both commits read the same files; each run writes its
transform, and TRE is computed here as capture_range.py computes it. ``--clinical-ct``
writes each pair's CT on a scanner's grid (CLINICAL_CT_SPACING_MM, same field of view,
linear): the family's phantoms come at ~2 mm, where the costs that grow with the input
(reading, antialiasing, resampling) hardly show.

Per pair: median seconds of each commit (``register(fixed, moving)``, the default
method or ``--mode``'s, from images in memory to the result), the median of the per-case differences
and the median re-oriented refinement stage; then the cases whose TRE moved by more
than 1 mm. One line per run goes to --out (jsonl, default
results/commit_ab/BASE.jsonl); the table goes to stdout and beside it as .md.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAIRS = ("ct-mr", "t1-t2", "ct-us-moving", "us-ct", "ct-mr-torso")
#: Source cube (voxels) of --quick's one case.
QUICK_CROP = 48
#: TRE changes (mm) below this are the same result.
SAME_TRE_MM = 1.0


class TreeFinder(importlib.abc.MetaPathFinder):
    """Imports the packages named in a tree's pyproject.toml package-dir from that tree
    (an editable install maps them to the checkout it was made from)."""

    def __init__(self, tree: Path) -> None:
        config = tomllib.loads((tree / "pyproject.toml").read_text())
        mapping = config["tool"]["setuptools"]["package-dir"]
        self.packages = {name: tree / folder for name, folder in mapping.items()}

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        folder = self.packages.get(fullname)
        if folder is None:
            return None  # (subpackages are found on their mapped parent's __path__)
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def child(tree: Path, cases_dir: Path, out: Path, mode: str = "rigid") -> None:
    """Register every case of ``cases_dir`` with the engine of ``tree`` in ``mode`` (its
    defaults otherwise); a line per case."""
    sys.meta_path.insert(0, TreeFinder(tree))
    import SimpleITK as sitk

    from disa.registration import pipeline
    from disa.registration.options import RegistrationOptions

    assert Path(pipeline.__file__).resolve().is_relative_to(tree.resolve()), pipeline.__file__
    folders = sorted(p for p in cases_dir.iterdir() if p.is_dir())
    read = {f.name: (sitk.ReadImage(str(f / "fixed.nii.gz")),
                     sitk.ReadImage(str(f / "moving.nii.gz"))) for f in folders}
    options = RegistrationOptions(mode=mode)
    # untimed: compilation, caches, first pages
    pipeline.register(*read[folders[0].name], options)
    for folder in folders:
        fixed, moving = read[folder.name]
        start = time.perf_counter()
        result = pipeline.register(fixed, moving, options)
        seconds = time.perf_counter() - start
        transform_path = out.parent / f"{folder.name}-{time.time_ns()}.tfm"
        sitk.WriteTransform(result.transform, str(transform_path))
        # (The global search as issue 24 times it: the translation scan and the search.)
        search_s = sum(result.timings.get(stage, 0.0) for stage in ("scan", "search"))
        row = {"tree": str(tree), "case": folder.name, "s": seconds,
               "reorient_s": result.timings.get("reorient"), "search_s": search_s,
               "transform": str(transform_path)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def summary(rows: list[dict], trees: dict[str, str]) -> str:
    """The per-pair table and the cases whose TRE moved (rows carry "pair", "tre")."""
    by_case: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_case[row["case"]][row["tree"]].append(row)
    label = {tree: name for name, tree in trees.items()}
    per_pair: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    moved = []
    for case, runs in sorted(by_case.items()):
        base, head = runs.get(trees["base"], []), runs.get(trees["head"], [])
        if not base or not head:
            continue
        mean = statistics.fmean
        per_pair[base[0]["pair"]].append(
            (mean(r["s"] for r in base), mean(r["s"] for r in head),
             mean(r["reorient_s"] or 0.0 for r in base),
             mean(r["reorient_s"] or 0.0 for r in head),
             # (rows of runs before the column existed have no search_s)
             mean(r.get("search_s") or 0.0 for r in base),
             mean(r.get("search_s") or 0.0 for r in head)))
        if abs(base[0]["tre"] - head[0]["tre"]) > SAME_TRE_MM:
            moved.append(f"- {case}: {label[trees['base']]} {base[0]['tre']:.1f} mm, "
                         f"{label[trees['head']]} {head[0]['tre']:.1f} mm")
    lines = ["| pair | cases | base s (median) | head s (median) | head - base, median of the "
             "differences | reorient s, base -> head | scan + search s, base -> head |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    everything = [v for values in per_pair.values() for v in values]
    for pair, values in [*sorted(per_pair.items()), ("all", everything)]:
        if not values:
            continue
        med = statistics.median
        lines.append(f"| {pair} | {len(values)} | {med(v[0] for v in values):.2f} | "
                     f"{med(v[1] for v in values):.2f} | {med(v[1] - v[0] for v in values):+.2f} | "
                     f"{med(v[2] for v in values):.2f} -> {med(v[3] for v in values):.2f} | "
                     f"{med(v[4] for v in values):.2f} -> {med(v[5] for v in values):.2f} |")
    return ("\n".join(lines) + "\n\nTRE moved by more than 1 mm:\n\n"
            + ("\n".join(moved) or "- none"))


def _worktree(rev: str, where: Path) -> Path:
    tree = where / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), rev],
                   check=True, capture_output=True)
    return tree


#: A clinical CT's voxel (mm, x y z): 512 x 512 in-plane over ~36 cm, 1 mm slices.
CLINICAL_CT_SPACING_MM = (0.7, 0.7, 1.0)


def clinical_grid(image, spacing_mm=CLINICAL_CT_SPACING_MM):  # (SimpleITK images)
    """``image`` resampled (linear) onto a grid of ``spacing_mm`` over the same field of view:
    same origin and direction, as many voxels as cover the original extent."""
    import SimpleITK as sitk

    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    size = [max(1, round(e / s)) for e, s in zip(extent, spacing_mm, strict=True)]
    origin_shift = [(s - o) / 2.0 for s, o in zip(spacing_mm, image.GetSpacing(), strict=True)]
    origin = image.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, 0.0])
    direction = [image.GetDirection()[i::3] for i in range(3)]  # (columns: the axes)
    origin = [origin[k] + sum(direction[a][k] * origin_shift[a] for a in range(3))
              for k in range(3)]
    low = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin,
                         tuple(float(s) for s in spacing_mm), image.GetDirection(), low,
                         image.GetPixelID())


def _ct_role(pair: str) -> str | None:
    """Which image of a realistic pair is the CT ("fixed", "moving" or None)."""
    if pair.startswith("ct-"):
        return "fixed"
    return "moving" if pair.endswith("-ct") else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the commit to compare with (git revision)")
    p.add_argument("--pairs", default=",".join(PAIRS))
    p.add_argument("--cases-per-bin", type=int, default=1)
    p.add_argument("--bins", default="0,1,2,3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clinical-ct", action="store_true",
                   help="each pair's CT on a 0.7 x 0.7 x 1.0 mm grid (same field of view)")
    p.add_argument("--mode", default="rigid",
                   choices=("rigid", "affine", "deformable", "rigid+probe"),
                   help="the registration mode both commits run (default rigid)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=4, metavar=("TREE", "CASES", "OUT", "MODE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), Path(args.child[2]), args.child[3])
        return
    if not args.base:
        p.error("--base REV is required")
    sys.path.insert(0, str(HERE))
    import capture_range as cr
    import SimpleITK as sitk
    from common import machine

    pairs = ("ct-mr",) if args.quick else tuple(args.pairs.split(","))
    bins = (0,) if args.quick else tuple(int(b) for b in args.bins.split(","))
    cases = cr.make_realistic_cases(args.cases_per_bin, pairs=pairs, seed=args.seed, bins=bins,
                                    crop=QUICK_CROP if args.quick else None)
    out = args.out or HERE / "results" / "commit_ab" / f"{args.base.replace('/', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="commit-ab-") as tmp:
        work = Path(tmp)
        for case in cases:
            folder = work / "cases" / case.name
            folder.mkdir(parents=True)
            images = {"fixed": case.fixed, "moving": case.moving}
            role = _ct_role(case.pair) if args.clinical_ct else None
            if role is not None:
                images[role] = clinical_grid(images[role])
            for name, image in images.items():
                sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
        trees = {"base": str(_worktree(args.base, work)), "head": str(REPO)}
        raw = work / "runs.jsonl"
        try:
            for _ in range(args.rounds):
                for name in ("base", "head", "head", "base"):
                    subprocess.run([sys.executable, __file__, "--child", trees[name],
                                    str(work / "cases"), str(raw), args.mode], check=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            trees["base"]], capture_output=True)
        by_name = {case.name: case for case in cases}
        rows = []
        for line in raw.read_text().splitlines():
            row = json.loads(line)
            case = by_name[row["case"]]
            transform = sitk.ReadTransform(row.pop("transform"))
            tre = cr.tre(transform, case.truth, case.points)
            rows.append({**row, "pair": case.pair, "tre": tre})
    with out.open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    command = " ".join(["python benchmarks/commit_ab.py", *sys.argv[1:]])
    report = (f"Command: `{command}`. Machine: {machine()}. "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Base {args.base}, head the "
              f"working tree; {args.rounds} ABBA round(s), {len(cases)} cases.\n\n"
              f"{summary(rows, trees)}\n")
    print(report)
    out.with_suffix(".md").write_text(report)


if __name__ == "__main__":
    main()
