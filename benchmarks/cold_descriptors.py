"""Cold `disa descriptors` on a 256^3 volume, per descriptor engine, and where it goes.

    python benchmarks/cold_descriptors.py [--size 256] [--repeats 3]
                                          [--engines onnxruntime,auto,openvino-fp32,auto:4k]
    python benchmarks/cold_descriptors.py --quick     # a 64^3 volume, one repeat
    python benchmarks/cold_descriptors.py --previous TREE     # plus the row "previous"

The volume: the held-out CT head (``capture_range._volume("ct-brain-atlas")``, a
phantom without its package) zoomed to SIZE^3 voxels at the model's input spacing
(2 mm), so that the network runs on SIZE^3 (the issue's 256^3), stored as int16
NIfTI (``.nii.gz``) like a CT on disk.

Cold: ``disa descriptors VOLUME -o OUT.nii.gz`` in a fresh process with
``DISA_DESCRIPTOR_ENGINE=ENGINE``, timed from process start to exit; engines in turn,
REPEATS rounds (median and least). ``auto`` is the engine a user gets without the
setting; the table names what it resolved to here (``default_engine``). ``ENGINE:4k``
runs it with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``: without the transparent huge
pages that ``disa descriptors`` asks for (``disa.model.cli.huge_page_environment``),
i.e. the command as it was before it did. Beside the wall time: the child's CPU
seconds (user + system, steadier than wall time on a shared machine) and minor page
faults, medians. ``--previous TREE``: also the ``disa descriptors`` of an older commit,
engine auto, in the same rounds (the row "previous"), for before/after figures from one
run; TREE holds that commit's packages, e.g. ``mkdir TREE && git archive COMMIT disa
model registration jobs service training worker | tar -x -C TREE``, imported in place of
this checkout's (``PREVIOUS_BOOTSTRAP``).

Phases (one fresh process per engine, the same steps as the command, in process):
importing, reading, resampling to the model's spacing, normalising, creating the
extractor and its session (model load, compile), the first inference, a second
inference (the network warm), building and writing the output image. The phase child
gets the environment the command would give itself (huge pages unless ``:4k``).
Output: stdout and ``--out``/cold_descriptors.md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENGINES = ("onnxruntime", "auto", "openvino-fp32")
PHASES = ("import", "read", "resample", "normalise", "extractor", "inference",
          "inference (warm, again)", "write")


def make_volume(size: int, path: Path) -> None:
    """The CT head zoomed to ``size``^3 voxels at 2 mm, int16 HU, written to ``path``."""
    import capture_range
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    native = capture_range._volume("ct-brain-atlas").native.astype(np.float32)
    zoomed = ndimage.zoom(native, [size / n for n in native.shape], order=1)
    image = sitk.GetImageFromArray(np.clip(np.round(zoomed), -1024, 3071).astype(np.int16))
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(path), True)


def disa_command() -> list[str]:
    """How a user starts the CLI from this environment."""
    exe = Path(sys.executable).parent / "disa"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "disa"]


SMALL_PAGES = ":4k"


def engine_env(engine: str) -> dict[str, str]:
    """The environment of a run with ``engine`` (``auto``: the setting as a user has it;
    a ``:4k`` suffix: glibc's huge-page tunable off, as the user may set it)."""
    env = dict(os.environ)
    env.pop("DISA_DESCRIPTOR_ENGINE", None)
    env.pop("GLIBC_TUNABLES", None)
    name = engine.removesuffix(SMALL_PAGES)
    if name != "auto":
        env["DISA_DESCRIPTOR_ENGINE"] = name
    if engine.endswith(SMALL_PAGES):
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
    return env


PREVIOUS = "previous"
# `python -c PREVIOUS_BOOTSTRAP TREE ARGS...`: `disa ARGS...` with the disa packages of TREE
# (the layout of pyproject.toml's package-dir), found before this checkout's editable install.
PREVIOUS_BOOTSTRAP = """
import sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location
from pathlib import Path

ROOT = Path(sys.argv.pop(1))
DIRS = {"disa": "disa", "disa.jobs": "jobs", "disa.model": "model",
        "disa.registration": "registration", "disa.service": "service",
        "disa.training": "training", "disa.worker": "worker"}


class Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in DIRS:
            package = ROOT / DIRS[name]
            return spec_from_file_location(name, package / "__init__.py",
                                           submodule_search_locations=[str(package)])
        parent = name.rpartition(".")[0]
        if parent in DIRS:
            return PathFinder.find_spec(name, path=[str(ROOT / DIRS[parent])])
        return None


sys.meta_path.insert(0, Finder)
from disa.cli import main

sys.exit(main())
"""


def cold_run(engine: str, volume: Path, out: Path,
             previous: Path | None = None) -> tuple[float, float, int]:
    """One fresh ``disa descriptors`` process (start to exit): wall seconds, CPU seconds
    (user + system) and minor page faults of the child. Engine "previous": the command
    of the older tree ``previous`` (engine auto)."""
    command = ([sys.executable, "-c", PREVIOUS_BOOTSTRAP, str(previous)]
               if engine == PREVIOUS else disa_command())
    env = engine_env("auto" if engine == PREVIOUS else engine)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([*command, "descriptors", str(volume), "-o", str(out)],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"disa descriptors ({engine}) failed: {done.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, after.ru_minflt - before.ru_minflt


def phases_child(volume: str, out: str) -> dict[str, Any]:
    """The command's steps in this (fresh) process, each timed (seconds)."""
    marks = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.append(time.perf_counter())
        seconds[name] = marks[-1] - marks[-2]

    import SimpleITK as sitk

    from disa.core.io.images import read_image
    from disa.core.preprocess import normalise_intensities, resample_to_spacing
    from disa.model.card import card_path_for, default_model_path, load_model_card
    from disa.model.descriptors import descriptor_geometry, write_descriptor_image
    from disa.model.runtime import DescriptorExtractor, default_engine

    mark("import")
    onnx_path = default_model_path()
    assert onnx_path is not None, "no shipped model"
    card = load_model_card(card_path_for(onnx_path))
    image = read_image(volume)
    mark("read")
    resampled = resample_to_spacing(image, card.input_spacing_mm)
    mark("resample")
    array = normalise_intensities(sitk.GetArrayFromImage(resampled))
    mark("normalise")
    engine = default_engine("auto", onnx_path)
    extractor = DescriptorExtractor(card.onnx_path(onnx_path.parent), engine=engine)
    _ = extractor.session
    mark("extractor")
    descriptors = extractor.extract(array)
    mark("inference")
    extractor.extract(array)
    mark("inference (warm, again)")
    result = sitk.GetImageFromArray(descriptors, isVector=True)
    origin, spacing, direction = descriptor_geometry(resampled, card)
    result.SetOrigin(origin)
    result.SetSpacing(spacing)
    result.SetDirection(direction)
    write_descriptor_image(result, out)
    mark("write")
    return {"engine": engine, "shape": list(array.shape), "seconds": seconds,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def run_phases(engine: str, volume: Path, out: Path) -> dict[str, Any]:
    """``phases_child`` in a fresh process with ``engine``, in the environment that
    ``disa descriptors`` would restart itself with."""
    from disa.model.card import INPUT_SPACING_MM
    from disa.model.cli import HUGE_PAGE_MIN_VOXELS, huge_page_environment, nifti_working_voxels

    env = engine_env(engine)
    voxels = nifti_working_voxels(volume, INPUT_SPACING_MM)
    if voxels is None or voxels >= HUGE_PAGE_MIN_VOXELS:  # as the command decides
        env = huge_page_environment(env) or env
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phases-child",
                           str(volume), str(out)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"phases ({engine}) failed: {done.stderr[-2000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


def markdown(cold: dict[str, list[tuple[float, float, int]]],
             phases: dict[str, dict[str, Any]], header: str) -> str:
    """The cold table (wall median, least, vs onnxruntime, CPU s, page faults) and the
    phase table."""
    def median(runs: list[tuple[float, float, int]], field: int) -> float:
        return statistics.median(run[field] for run in runs)

    base = median(cold["onnxruntime"], 0) if cold.get("onnxruntime") else None
    lines = [header, "", "| engine (resolved) | cold s, median | least | vs onnxruntime "
             "| CPU s, median | minor page faults |", "|---|---:|---:|---:|---:|---:|"]
    for engine, runs in cold.items():
        wall = median(runs, 0)
        resolved = phases.get(engine, {}).get("engine", "")
        name = engine.removesuffix(SMALL_PAGES)
        label = name if resolved in ("", name) else f"{name} ({resolved})"
        if engine.endswith(SMALL_PAGES):
            label += ", 4 KiB pages"
        if engine == PREVIOUS:
            label = "auto, previous commit"
        versus = f"{base / wall:.2f}x faster" if base else "–"
        lines.append(f"| {label} | {wall:.2f} | {min(r[0] for r in runs):.2f} | {versus} "
                     f"| {median(runs, 1):.2f} | {median(runs, 2):,.0f} |")
    if phases:
        names = list(phases)
        lines += ["", "| phase (s, one fresh process) | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for phase in PHASES:
            cells = [f"{p['seconds'].get(phase, float('nan')):.2f}" for p in phases.values()]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="voxels per axis at 2 mm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--no-phases", action="store_true")
    p.add_argument("--quick", action="store_true", help="64^3, one repeat")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--previous", type=Path, default=None,
                   help="a tree of an older commit's packages (git archive): row 'previous'")
    p.add_argument("--phases-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phases_child:
        print("@@" + json.dumps(phases_child(*args.phases_child)))
        return 0
    from common import machine, report_header, write_report

    size, repeats = (64, 1) if args.quick else (args.size, args.repeats)
    engines = [e for e in args.engines.split(",") if e]
    if args.previous is not None:
        engines.append(PREVIOUS)
    cold: dict[str, list[tuple[float, float, int]]] = {e: [] for e in engines}
    phases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cold-descriptors-") as tmp:
        volume = Path(tmp, f"ct-{size}.nii.gz")
        make_volume(size, volume)
        print(f"# cold disa descriptors, {size}^3 at 2 mm — {machine()}", flush=True)
        for r in range(repeats):
            for engine in engines:
                run = cold_run(engine, volume, Path(tmp, f"out-{engine}.nii.gz"),
                               args.previous)
                cold[engine].append(run)
                print(f"round {r + 1} {engine}: {run[0]:.2f} s, CPU {run[1]:.2f} s, "
                      f"{run[2]} minor faults, load {os.getloadavg()[0]:.2f}", flush=True)
        if not args.no_phases:
            for engine in (e for e in engines if e != PREVIOUS):
                phases[engine] = run_phases(engine, volume, Path(tmp, f"phases-{engine}.nii.gz"))
                print(f"phases {engine}: {json.dumps(phases[engine])}", flush=True)
    command = "python benchmarks/cold_descriptors.py" + (
        " --quick" if args.quick else f" --size {size} --repeats {repeats} --engines "
        f"{','.join(e for e in engines if e != PREVIOUS)}") + (
        f" --previous {args.previous}" if args.previous else "")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    header = (report_header(command) + "`disa descriptors` on "
              f"a {size}^3 int16 CT (.nii.gz) at 2 mm, fresh process per run. "
              f"Load average at the end (1, 5, 15 min): {load}.")
    text = markdown(cold, phases, header)
    write_report(args.out, "cold_descriptors.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
