"""`disa descriptors` restarts itself with glibc's huge-page tunable (fewer page faults in
the first inference, issue 24) only where that changes something, and only as the
`disa` command itself; the descriptors are the same either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.preprocess import working_grid_size
from disa.model import cli as model_cli
from disa.model.cli import (
    HUGE_PAGE_MIN_VOXELS,
    HUGE_PAGE_TUNABLE,
    huge_page_environment,
    nifti_working_voxels,
)


def _thp(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / "enabled"
    path.write_text({"always": "[always] madvise never\n", "madvise": "always [madvise] never\n",
                     "never": "always madvise [never]\n"}[mode])
    return path


def _glibc_with_tunable() -> bool:
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, OSError, ValueError):
        return False
    return libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_with_tunable(),
                                 reason="glibc >= 2.35 on Linux only")


@needs_glibc
def test_the_tunable_is_added_only_in_madvise_mode(tmp_path: Path) -> None:
    env = huge_page_environment({"PATH": "/bin"}, _thp(tmp_path, "madvise"))
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{HUGE_PAGE_TUNABLE}=1"}
    # Other tunables the user set are kept.
    kept = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                 _thp(tmp_path, "madvise"))
    assert kept is not None
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGE_TUNABLE}=1"
    assert huge_page_environment({}, _thp(tmp_path, "always")) is None
    assert huge_page_environment({}, _thp(tmp_path, "never")) is None
    assert huge_page_environment({}, tmp_path / "missing") is None


def test_a_user_setting_of_the_tunable_is_left_alone(tmp_path: Path) -> None:
    for value in (f"{HUGE_PAGE_TUNABLE}=0", f"glibc.malloc.arena_max=2:{HUGE_PAGE_TUNABLE}=1"):
        assert huge_page_environment({"GLIBC_TUNABLES": value}, _thp(tmp_path, "madvise")) is None


def test_no_restart_from_a_process_that_calls_main_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("exec from inside a test process")

    monkeypatch.setattr(os, "execve", refuse)
    # sys.argv[0] is pytest here: nothing happens
    model_cli._restart_with_huge_pages(Path("in.nii.gz"), None)


def _nifti(path: Path, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_the_working_grid_is_read_from_the_nifti_header(tmp_path: Path) -> None:
    for name in ("a.nii", "b.nii.gz"):
        size, spacing = (50, 41, 33), (0.7, 1.3, 3.1)
        path = _nifti(tmp_path / name, size, spacing)
        assert nifti_working_voxels(path, 2.0) == np.prod(working_grid_size(size, spacing, 2.0))
    assert nifti_working_voxels(_nifti(tmp_path / "c.mha", (4, 4, 4), (1, 1, 1)), 2.0) is None
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    assert nifti_working_voxels(tmp_path / "broken.nii.gz", 2.0) is None


@pytest.mark.parametrize("large", [True, False])
def test_the_disa_command_restarts_itself_for_large_grids_only(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, large: bool) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    env = {"GLIBC_TUNABLES": f"{HUGE_PAGE_TUNABLE}=1"}
    monkeypatch.setattr(model_cli, "huge_page_environment", lambda: env)
    monkeypatch.setattr(os, "execve", lambda exe, argv, e: calls.append((exe, argv, e)))
    side = round(HUGE_PAGE_MIN_VOXELS ** (1 / 3)) + (8 if large else -8)
    image = _nifti(tmp_path / "in.nii.gz", (side, side, side // 4), (2.0, 2.0, 8.0))
    argv = ["descriptors", str(image), "-o", "out.nii.gz"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/disa", *argv])
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "/venv/bin/disa", *argv])
    model_cli._restart_with_huge_pages(image, None)
    assert calls == ([(sys.executable, [sys.executable, "/venv/bin/disa", *argv], env)]
                     if large else [])


def test_descriptors_are_the_same_with_and_without_huge_pages(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from disa.model.card import default_model_path

    if default_model_path() is None:
        pytest.skip("no shipped model")
    rng = np.random.default_rng(0)
    # Above HUGE_PAGE_MIN_VOXELS at 2 mm from its header (8 mm voxels), so that the first
    # run restarts, yet a 48 x 44 x 40 volume to read.
    volume = rng.normal(0.0, 1.0, (40, 44, 48)).astype(np.float32)
    volume[10:30, 12:34, 8:28] += 5.0
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((8.0, 8.0, 8.0))
    source = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(source))
    outputs = []
    for tunables in (None, f"{HUGE_PAGE_TUNABLE}=0"):
        env = dict(os.environ)
        env.pop("GLIBC_TUNABLES", None)
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        target = tmp_path / f"out-{len(outputs)}.nii.gz"
        done = subprocess.run([sys.executable, "-m", "disa", "descriptors", str(source), "-o",
                               str(target)], capture_output=True, text=True, env=env,
                              check=False, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("wrote") == 1  # one process's output, not two
        outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(target))))
    np.testing.assert_array_equal(outputs[0], outputs[1])
