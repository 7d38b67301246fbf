"""Cold `disa descriptors` on a 256^3 volume, per descriptor engine, and where it goes.

    python benchmarks/cold_descriptors.py [--size 256] [--repeats 3]
                                          [--engines onnxruntime,auto,openvino-fp32]
    python benchmarks/cold_descriptors.py --quick     # a 64^3 volume, one repeat

The volume: the held-out CT head (``capture_range._volume("ct-brain-atlas")``, a
phantom without its package) zoomed to SIZE^3 voxels at the model's input spacing
(2 mm), so that the network runs on SIZE^3 (the issue's 256^3), stored as int16
NIfTI (``.nii.gz``) like a CT on disk.

Cold: ``disa descriptors VOLUME -o OUT.nii.gz`` in a fresh process with
``DISA_DESCRIPTOR_ENGINE=ENGINE``, timed from process start to exit; engines in turn,
REPEATS rounds (median and least). ``auto`` is the engine a user gets without the
setting; the table names what it resolved to here (``default_engine``).

Phases (one fresh process per engine, the same steps as the command, in process):
importing, reading, resampling to the model's spacing, normalising, creating the
extractor and its session (model load, compile), the first inference, a second
inference (the network warm), building and writing the output image.
Output: stdout and ``--out``/cold_descriptors.md (default benchmarks/results/).
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


def engine_env(engine: str) -> dict[str, str]:
    """The environment of a run with ``engine`` (``auto``: the setting as a user has it)."""
    env = dict(os.environ)
    env.pop("DISA_DESCRIPTOR_ENGINE", None)
    if engine != "auto":
        env["DISA_DESCRIPTOR_ENGINE"] = engine
    return env


def cold_seconds(engine: str, volume: Path, out: Path) -> float:
    """Wall seconds of one fresh ``disa descriptors`` process (start to exit)."""
    t0 = time.perf_counter()
    done = subprocess.run([*disa_command(), "descriptors", str(volume), "-o", str(out)],
                          capture_output=True, text=True, env=engine_env(engine), check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"disa descriptors ({engine}) failed: {done.stderr[-2000:]}")
    return wall


def phases_child(volume: str, out: str) -> dict[str, Any]:
    """The command's steps in this (fresh) process, each timed (seconds)."""
    marks = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.append(time.perf_counter())
        seconds[name] = marks[-1] - marks[-2]

    import SimpleITK as sitk

    from disa.model.card import card_path_for, default_model_path, load_model_card
    from disa.model.descriptors import descriptor_geometry
    from disa.model.runtime import DescriptorExtractor, default_engine
    from disa.registration.io import read_image, write_image
    from disa.registration.preprocess import normalise_intensities, resample_to_spacing

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
    write_image(result, out)
    mark("write")
    return {"engine": engine, "shape": list(array.shape), "seconds": seconds}


def run_phases(engine: str, volume: Path, out: Path) -> dict[str, Any]:
    """``phases_child`` in a fresh process with ``engine``."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phases-child",
                           str(volume), str(out)], capture_output=True, text=True,
                          env=engine_env(engine), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"phases ({engine}) failed: {done.stderr[-2000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


def markdown(cold: dict[str, list[float]], phases: dict[str, dict[str, Any]],
             header: str) -> str:
    """The cold table (median, least, vs onnxruntime) and the phase table."""
    base = statistics.median(cold["onnxruntime"]) if cold.get("onnxruntime") else None
    lines = [header, "", "| engine (resolved) | cold s, median | least | vs onnxruntime |",
             "|---|---:|---:|---:|"]
    for engine, times in cold.items():
        median = statistics.median(times)
        resolved = phases.get(engine, {}).get("engine", "")
        label = engine if resolved in ("", engine) else f"{engine} ({resolved})"
        versus = f"{base / median:.2f}x faster" if base else "–"
        lines.append(f"| {label} | {median:.2f} | {min(times):.2f} | {versus} |")
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
    p.add_argument("--phases-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phases_child:
        print("@@" + json.dumps(phases_child(*args.phases_child)))
        return 0
    from common import machine, report_header, write_report

    size, repeats = (64, 1) if args.quick else (args.size, args.repeats)
    engines = [e for e in args.engines.split(",") if e]
    cold: dict[str, list[float]] = {e: [] for e in engines}
    phases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cold-descriptors-") as tmp:
        volume = Path(tmp, f"ct-{size}.nii.gz")
        make_volume(size, volume)
        print(f"# cold disa descriptors, {size}^3 at 2 mm — {machine()}", flush=True)
        for r in range(repeats):
            for engine in engines:
                seconds = cold_seconds(engine, volume, Path(tmp, f"out-{engine}.nii.gz"))
                cold[engine].append(seconds)
                print(f"round {r + 1} {engine}: {seconds:.2f} s", flush=True)
        if not args.no_phases:
            for engine in engines:
                phases[engine] = run_phases(engine, volume, Path(tmp, f"phases-{engine}.nii.gz"))
                print(f"phases {engine}: {json.dumps(phases[engine])}", flush=True)
    command = "python benchmarks/cold_descriptors.py" + (
        " --quick" if args.quick else f" --size {size} --repeats {repeats} --engines "
        f"{','.join(engines)}")
    header = (report_header(command) + "`disa descriptors` on "
              f"a {size}^3 int16 CT (.nii.gz) at 2 mm, fresh process per run.")
    text = markdown(cold, phases, header)
    write_report(args.out, "cold_descriptors.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
