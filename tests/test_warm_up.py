"""`disa warm-up` compiles every kernel that later registrations use (an empty numba cache
first, then registrations that must find everything in it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def _empty_cache(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """(environment, folder holding the cache files, folder of the stamp) of an empty numba
    cache for the test to warm.

    The suite's own default cache when nothing has been compiled into it yet (a clean
    clone, as in CI, where conftest runs this test first): the ~100 s the warm-up spends
    compiling then serve every later test instead of being paid twice. A temporary one
    otherwise, so that the test always starts from an empty cache.
    """
    from disa import warm_up

    if "NUMBA_CACHE_DIR" not in os.environ and not warm_up._index_files():
        return dict(os.environ), warm_up._index_root(), warm_up.cache_folder()
    folder = tmp_path / "numba"
    return {**os.environ, "NUMBA_CACHE_DIR": str(folder)}, folder, folder


@pytest.mark.cold_cache_first
def test_a_warmed_cache_serves_later_registrations_without_compiling(tmp_path: Path) -> None:
    env, root, stamp_folder = _empty_cache(tmp_path)
    assert _cache_files(root) == {}
    done = subprocess.run([sys.executable, "-m", "disa", "warm-up"], env=env, text=True,
                          capture_output=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("warm-up: rigid"), done.stdout
    assert "deformable" in done.stdout and str(stamp_folder) in done.stdout
    warmed = _cache_files(root)
    assert (stamp_folder / "disa-warm-up.json").is_file()
    # A second warm-up on the stamped cache runs nothing.
    again = subprocess.run([sys.executable, "-m", "disa", "warm-up"], env=env, text=True,
                           capture_output=True, timeout=600, check=False)
    assert again.returncode == 0 and "already warm" in again.stdout, again.stdout
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
    after = _cache_files(root)
    compiled_later = sorted(name for name in after if warmed.get(name) != after[name])
    assert compiled_later == []


def _fake_engine(tmp_path: Path, monkeypatch) -> Path:
    """An engine folder with one source and its cache index, the default cache layout."""
    from disa import warm_up

    engine = tmp_path / "engine"
    (engine / "__pycache__").mkdir(parents=True)
    (engine / "kernels.py").write_text("x = 1\n")
    (engine / "__pycache__" / "kernels.k-1.py311.nbi").write_bytes(b"index")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(warm_up, "_engine_folder", lambda: engine)
    return engine


def test_the_stamp_holds_while_nothing_it_depends_on_changes(tmp_path: Path, monkeypatch) -> None:
    from disa import warm_up

    engine = _fake_engine(tmp_path, monkeypatch)
    assert not warm_up.is_warm()  # no stamp yet
    assert warm_up.write_stamp() == engine / "__pycache__" / warm_up.STAMP_NAME
    assert warm_up.is_warm()
    # an engine source edited: numba recompiles it, so the cache is no longer warm
    source = engine / "kernels.py"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert not warm_up.is_warm()
    warm_up.write_stamp()
    assert warm_up.is_warm()
    # a NUMBA_* setting that changes code generation
    monkeypatch.setenv("NUMBA_OPT", "0")
    assert not warm_up.is_warm()
    monkeypatch.delenv("NUMBA_OPT")
    assert warm_up.is_warm()
    # the cache cleared under the stamp
    (engine / "__pycache__" / "kernels.k-1.py311.nbi").unlink()
    assert not warm_up.is_warm()
    # a damaged stamp is a cold cache, not an error
    (engine / "__pycache__" / warm_up.STAMP_NAME).write_text("{not json")
    assert not warm_up.is_warm()


def test_an_unwritable_cache_folder_is_reported_not_fatal(tmp_path: Path, monkeypatch) -> None:
    from disa import warm_up

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "numba"))  # under a file
    assert warm_up.write_stamp() is None
    assert not warm_up.is_warm()


def test_warm_up_skips_a_warm_cache_unless_forced(monkeypatch, capsys) -> None:
    from disa import warm_up
    from disa.cli import build_parser

    ran: list[str] = []
    monkeypatch.setattr(warm_up, "is_warm", lambda: True)
    monkeypatch.setattr(warm_up, "warm_up", lambda: ran.append("run") or {"rigid": 1.0})
    monkeypatch.setattr(warm_up, "write_stamp", lambda: Path("stamp"))
    for argv, expected in ((["warm-up"], []), (["warm-up", "--force"], ["run"])):
        ran.clear()
        args = build_parser().parse_args(argv)
        assert args.handler(args) == 0
        assert ran == expected
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warm-up: cache already warm")
    assert out[1].startswith("warm-up: rigid 1.0 s")
