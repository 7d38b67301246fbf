"""run_registration's voxel cap: one `InputLimits.max_voxels` caps the inputs and the
working grids (issue 21: the cap reaches the engine one way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from disa.core.errors import InputError
from disa.core.io.limits import InputLimits
from disa.core.preprocess import MAX_WORKING_VOXELS, check_working_grid
from disa.registration.options import RegistrationOptions
from disa.registration.runner import run_registration

#: The pair's grid: 24^3 voxels of 4 mm.
VOXELS = 24**3


def test_an_input_over_the_cap_is_refused_naming_the_image_and_the_limit(
        pair_files: tuple[Path, Path], tmp_path: Path) -> None:
    fixed, moving = pair_files
    with pytest.raises(InputError) as caught:
        run_registration(fixed, moving, tmp_path / "out",
                         RegistrationOptions(similarity="mind", starts=10),
                         limits=InputLimits(max_voxels=VOXELS - 1))
    assert str(caught.value) == ("fixed.nii.gz: header claims 24x24x24 voxels (13.8 k), "
                                 "above the limit of 13.8 k voxels")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_same_cap_holds_the_working_grids(pair_files: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    """Inputs at the cap pass; a finer working spacing would make a larger grid, which the
    engine refuses with the flag's name (no second way of handing the cap over)."""
    fixed, moving = pair_files
    with pytest.raises(InputError) as caught:
        run_registration(fixed, moving, tmp_path / "out",
                         RegistrationOptions(similarity="mind", starts=10,
                                             working_spacing=3.0),
                         limits=InputLimits(max_voxels=VOXELS))
    assert str(caught.value).startswith(
        "--working-spacing 3 mm makes a working grid of 32 x 32 x 32 voxels (32,768)")
    assert f"above the limit of {VOXELS:,} voxels" in str(caught.value)
    assert not (tmp_path / "out").exists()
    # The cap applied to that run only: afterwards the engine's default holds again.
    check_working_grid((512, 512, 512), 1.0)
    with pytest.raises(InputError):
        check_working_grid((512, 512, 513), 1.0)
    assert MAX_WORKING_VOXELS == 512**3


def test_the_engine_starts_without_pydicom() -> None:
    """A NIfTI or MetaImage registration never imports pydicom (~0.2 s of every cold
    `disa register`): the DICOM readers and the DICOM REG writer are imported on use."""
    import subprocess
    import sys

    code = ("import sys, disa.registration.runner, disa.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydicom'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
