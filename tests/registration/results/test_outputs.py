"""The result folder: written whole into a staging sibling, then swapped into place.

The results here are built by hand (a known translation, a zero displacement
field) so that every case writes real files in seconds; test_cli covers a
registration end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.registration.pipeline import RegistrationResult
from disa.registration.results import outputs
from disa.registration.results.outputs import check_output_folder, write_result_folder

from ...core.io_fixtures import phantom

RIGID_FILES = ["transform.tfm", "registered.nii.gz", "qa.png", "result.json"]
DEFORMABLE_FILES = ["transform.tfm", "transform.h5", "displacement.nii.gz",
                    "inverse_displacement.nii.gz", "registered.nii.gz", "qa.png", "result.json"]


def _result(shift_mm: float, deformable: bool = False) -> RegistrationResult:
    """A result mapping fixed x to moving x + (shift_mm, 0, 0); with ``deformable`` also a
    (zero) displacement field and the composite transform of the non-linear modes."""
    transform = sitk.TranslationTransform(3, (shift_mm, 0.0, 0.0))
    matrix = np.eye(4)
    matrix[0, 3] = shift_mm
    field_transform = displacement = None
    if deformable:
        reference = phantom()
        displacement = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat32, 3)
        displacement.CopyInformation(reference)
        field_transform = sitk.CompositeTransform(3)
        field_transform.AddTransform(transform)
        field_transform.AddTransform(sitk.DisplacementFieldTransform(
            sitk.Cast(displacement, sitk.sitkVectorFloat64)))
    return RegistrationResult(
        mode="deformable" if deformable else "rigid", similarity="mind",
        theta=np.array([0.0, 0.0, 0.0, shift_mm, 0.0, 0.0]), transform=transform,
        initial_transform=sitk.Transform(), matrix=matrix, cost=-0.5, similarity_value=0.5,
        evaluations=10, starts=1, confidence=1.0, agreeing=1, refined=1, ambiguous=False,
        overlap=1.0, working_spacing_mm=1.0, descriptor_spacing_mm=2.0, timings={"total": 1.0},
        field_transform=field_transform, displacement=displacement)


def _write(result: RegistrationResult, out: Path, **kwargs) -> dict:
    image = phantom()
    return write_result_folder(result, image, image, out, **kwargs)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_new_result_replaces_the_previous_one_whole(tmp_path: Path) -> None:
    """A rigid run into a deformable run's folder leaves no transform.h5 of the old run."""
    out = tmp_path / "out"
    _write(_result(7.0, deformable=True), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(DEFORMABLE_FILES)
    data = _write(_result(2.0), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(RIGID_FILES) == sorted(data["files"])
    written = json.loads((out / "result.json").read_text())
    assert written["mode"] == "rigid" and written["parameters"][3] == 2.0
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    np.testing.assert_allclose(tfm.TransformPoint((0.0, 0.0, 0.0)), (2.0, 0.0, 0.0))
    # No staging or set-aside folder is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_leaves_the_previous_result_as_it_was(tmp_path: Path,
                                                             monkeypatch) -> None:
    out = tmp_path / "out"
    _write(_result(7.0, deformable=True), out)
    before = _snapshot(out)

    def full_disk(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    # transform.tfm and registered.nii.gz of the new run are written by then.
    monkeypatch.setattr(outputs, "render_qa", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write(_result(2.0), out)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_existing_folder_takes_the_result(tmp_path: Path) -> None:
    """The worker creates its job's outputs/ folder empty before the run."""
    out = tmp_path / "outputs"
    out.mkdir()
    _write(_result(1.0), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(RIGID_FILES)
    assert out.stat().st_mode & 0o777 == 0o755  # readable by an API running as another user


def test_extra_files_are_written_into_the_staged_folder(tmp_path: Path) -> None:
    """The DICOM REG writer reads displacement.nii.gz back from the folder it is given."""
    out = tmp_path / "out"
    seen: list[Path] = []

    def extra(data: dict, folder: Path) -> list[str]:
        seen.append(folder)
        assert (folder / "displacement.nii.gz").is_file() and not out.exists()
        (folder / "registration.dcm").write_bytes(b"DICM")
        return ["registration.dcm"]

    data = _write(_result(1.0, deformable=True), out, extra=extra)
    assert seen and seen[0] != out and "registration.dcm" in data["files"]
    assert (out / "registration.dcm").read_bytes() == b"DICM"


@pytest.mark.parametrize("check", [check_output_folder,
                                   lambda out: _write(_result(1.0), out)])
def test_a_folder_holding_other_files_is_refused_not_deleted(tmp_path: Path, check) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "result.json").write_text("{}")
    with pytest.raises(InputError, match=r"study: folder holds 1 file\(s\) .*\(notes.txt\)"):
        check(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "result.json"]


def test_check_output_folder_refuses_files_and_creates_parents(tmp_path: Path,
                                                               monkeypatch) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile: is an existing file, not a folder"):
        check_output_folder(tmp_path / "afile")
    with pytest.raises(InputError, match="cannot create the result folder: afile is a file"):
        check_output_folder(tmp_path / "afile" / "sub")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for current in (".", "../here", ".."):
        with pytest.raises(InputError, match="is the current folder"):
            check_output_folder(current)
    monkeypatch.chdir(tmp_path)
    target = check_output_folder(Path("new") / "deeper" / "out")
    assert target == tmp_path / "new" / "deeper" / "out"
    assert target.parent.is_dir() and not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == []  # the probe is gone


def test_result_json_records_the_point_the_views_centre_on(tmp_path: Path) -> None:
    """qa.png's planes and the web viewer start at result.json's view_point_mm."""
    from disa.registration.results.qa import fixed_centre

    image = phantom()
    _write(_result(2.0), tmp_path / "a")
    written = json.loads((tmp_path / "a" / "result.json").read_text())
    assert written["view_point"] == "overlap"
    index = image.TransformPhysicalPointToContinuousIndex(written["view_point_mm"])
    assert all(-0.5 <= i <= n - 0.5 for i, n in zip(index, image.GetSize(), strict=True))
    # A moving image nowhere near the fixed one: the fixed centre.
    data = _write(_result(5000.0), tmp_path / "b")
    assert data["view_point"] == "fixed centre"
    np.testing.assert_allclose(data["view_point_mm"], fixed_centre(image))
