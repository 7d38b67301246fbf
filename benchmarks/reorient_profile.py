"""Where the rigid registration's time goes inside the map-building stages (issue 24).

    python benchmarks/reorient_profile.py [--pairs ct-mr,ct-mr-torso] [--bins 0]
                                          [--repeats 2] [--save before.json]
                                          [--compare before.json]

Cases: one realistic case per pair and bin (``capture_range.make_realistic_cases``,
benchmarks/realistic_cases.py), built once and kept as .mha under --cache so that
before/after runs read the same images. Per case: one untimed warm-up ``register``
(numba compiles, lazy imports), then --repeats timed calls with the engine's defaults
(rigid, MIND-SSC, int8). Besides ``result.timings`` the script wraps the functions the
issue-24 profile named and reports their seconds summed over one call (median over the
repeats) and their call counts: ``DescriptorMap.smoothed``, ``DescriptorMap.quantised``,
``mind_ssc``, ``regrid``, ``fixed_weights``, ``antialias``.

--save writes each case's final 4x4 matrix and TRE (mm) to a JSON file; --compare reads
such a file and prints how far this run's transform lies from that one (mean distance
of the case's overlap points, mm): the "results unchanged" check of a speed change.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from common import machine

HERE = Path(__file__).resolve().parent
#: (module, attribute) of the functions timed; wrapped where the pipeline looks them up.
WRAPPED = (
    ("disa.registration.similarity.descriptor_map", "DescriptorMap.smoothed"),
    ("disa.registration.similarity.descriptor_map", "DescriptorMap.quantised"),
    ("disa.registration.similarity.mind", "mind_ssc"),
    ("disa.registration.pipeline", "regrid"),
    ("disa.registration.pipeline", "fixed_weights"),
    ("disa.registration.pipeline", "antialias"),
)


def install_timers(seconds: dict[str, float], calls: dict[str, int]) -> None:
    """Wrap every WRAPPED function so that each call adds its wall seconds (and 1) under
    its name. ``mind_ssc`` is imported inside the pipeline's functions, so wrapping the
    module attribute reaches it."""
    import importlib

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    for module_name, attr in WRAPPED:
        module = importlib.import_module(module_name)
        owner: Any = module
        parts = attr.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part)
        setattr(owner, parts[-1], timed(parts[-1], getattr(owner, parts[-1])))


def load_cases(pairs: list[str], bins: tuple[int, ...], cache: Path) -> list[dict[str, Any]]:
    """The cases as dicts (name, fixed, moving, truth matrix, points), from ``cache`` when
    there, else built (minutes) and stored there."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    missing = []
    for pair in pairs:
        for b in bins:
            name = f"{pair}-bin{b}-0"
            if not (cache / f"{name}.json").exists():
                missing.append((pair, b))
    if missing:
        import capture_range

        for pair, b in missing:
            case = capture_range.make_realistic_cases(1, [pair], 0, (b,))[0]
            sitk.WriteImage(case.fixed, str(cache / f"{case.name}-fixed.mha"))
            sitk.WriteImage(case.moving, str(cache / f"{case.name}-moving.mha"))
            sitk.WriteTransform(case.truth, str(cache / f"{case.name}-truth.tfm"))
            (cache / f"{case.name}.json").write_text(json.dumps(
                {"points": case.points.tolist()}))
    for pair in pairs:
        for b in bins:
            name = f"{pair}-bin{b}-0"
            out.append({
                "name": name,
                "fixed": sitk.ReadImage(str(cache / f"{name}-fixed.mha")),
                "moving": sitk.ReadImage(str(cache / f"{name}-moving.mha")),
                "truth": sitk.ReadTransform(str(cache / f"{name}-truth.tfm")),
                "points": np.array(json.loads((cache / f"{name}.json").read_text())["points"]),
            })
    return out


def mapped(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) under a 4x4 matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="ct-mr,ct-mr-torso")
    p.add_argument("--bins", default="0")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/disa-reorient-cases"))
    p.add_argument("--save", type=Path, default=None)
    p.add_argument("--compare", type=Path, default=None)
    args = p.parse_args()

    from capture_range import tre

    from disa.registration.options import RegistrationOptions
    from disa.registration.pipeline import register

    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    install_timers(seconds, calls)
    cases = load_cases([s for s in args.pairs.split(",") if s],
                       tuple(int(b) for b in args.bins.split(",") if b), args.cache)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    print(f"# reorient profile — {machine()}; commit {head}; "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC", flush=True)
    saved: dict[str, Any] = {}
    before = json.loads(args.compare.read_text()) if args.compare else {}
    for case in cases:
        register(case["fixed"], case["moving"], RegistrationOptions(mode="rigid"))  # warm-up
        totals, stages, parts, counts = [], defaultdict(list), defaultdict(list), {}
        result = None
        for _ in range(args.repeats):
            seconds.clear()
            calls.clear()
            load = Path("/proc/loadavg").read_text().split()[0]
            t0 = time.perf_counter()
            result = register(case["fixed"], case["moving"], RegistrationOptions(mode="rigid"))
            totals.append(time.perf_counter() - t0)
            print(f"  {case['name']}: {totals[-1]:.2f} s (load {load})", flush=True)
            for k, v in result.timings.items():
                stages[k].append(v)
            for k, v in seconds.items():
                parts[k].append(v)
            counts = dict(calls)
        assert result is not None
        matrix = np.asarray(result.matrix)
        error = tre(result.transform, case["truth"], case["points"])
        saved[case["name"]] = {"matrix": matrix.tolist(), "tre_mm": error}
        print(f"{case['name']}: total median {statistics.median(totals):.2f} s, "
              f"TRE {error:.3f} mm")
        print("  stages: " + ", ".join(f"{k} {statistics.median(v):.2f}"
                                       for k, v in stages.items()))
        print("  parts:  " + ", ".join(f"{k} {statistics.median(v):.2f} ({counts.get(k, 0)}x)"
                                       for k, v in sorted(parts.items())))
        if case["name"] in before:
            other = np.asarray(before[case["name"]]["matrix"])
            shift = np.linalg.norm(mapped(matrix, case["points"])
                                   - mapped(other, case["points"]), axis=1)
            print(f"  vs --compare: mean {shift.mean():.4f} mm, max {shift.max():.4f} mm "
                  f"between the two transforms; TRE then {before[case['name']]['tre_mm']:.3f}"
                  f" mm, now {error:.3f} mm")
    if args.save:
        args.save.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
