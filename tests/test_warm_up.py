"""`disa warm-up` compiles every kernel that later registrations use (an empty numba cache
first, then registrations that must find everything in it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from disa.sample import sample_paths


def _cache_files(folder: Path) -> dict[str, int]:
    """numba's cache index and data files under ``folder`` and their modification times."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


def _partial_view(moving: Path, out: Path) -> Path:
    """The sample's moving image cropped to its middle 60 % per axis (a slab-like view on
    its own grid: the smaller image is sampled, placements are drawn)."""
    image = sitk.ReadImage(str(moving))
    size = np.array(image.GetSize())
    lo = (0.2 * size).astype(int)
    cropped = sitk.RegionOfInterest(image, [int(v) for v in (0.6 * size).astype(int)],
                                    [int(v) for v in lo])
    path = out / "moving_partial.nii.gz"
    sitk.WriteImage(cropped, str(path))
    return path


def test_a_warmed_cache_serves_later_registrations_without_compiling(tmp_path: Path) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run([sys.executable, "-m", "disa", "warm-up"], env=env, text=True,
                          capture_output=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("warm-up: rigid"), done.stdout
    assert "deformable" in done.stdout and str(tmp_path / "numba") in done.stdout
    warmed = _cache_files(tmp_path / "numba")
    # what the engine compiles lives in these modules: each must have been reached
    for module in ("mind", "kernels", "descriptor_map", "contrast", "discrete"):
        assert any(module in name for name in warmed), (module, sorted(warmed)[:20])

    fixed, moving, _ = sample_paths()
    partial = _partial_view(moving, tmp_path)
    for k, extra in enumerate((["--starts", "60"], ["--starts", "30", "--mode", "deformable"])):
        ran = subprocess.run([sys.executable, "-m", "disa", "register", str(fixed), str(partial),
                              "-o", str(tmp_path / f"out{k}"), "--quiet", *extra],
                             env=env, text=True, capture_output=True, timeout=600, check=False)
        assert ran.returncode == 0, ran.stderr[-2000:]
    after = _cache_files(tmp_path / "numba")
    compiled_later = sorted(name for name in after if warmed.get(name) != after[name])
    assert compiled_later == []
