"""Gantry tilt and variable slice spacing: corrected by resampling, or refused naming why.

The tilted series are built the way a tilted gantry acquires them: slice planes
tilted about the patient's left-right axis (ImageOrientationPatient), the table
stepping along the patient's head-foot axis (ImagePositionPatient), so the
positions drift in the slice plane by tan(tilt) mm per mm along the normal.
highdicom's `get_series_volume_positions` is the independent oracle of which
stacks are regular volumes as stored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.spatial import get_series_volume_positions

from disa.core.errors import InputError
from disa.core.io.images import inspect_image, read_dicom_headers, read_image
from disa.registration.options import RegistrationOptions
from disa.registration.results import dicom_reg as dr
from disa.registration.runner import run_registration

from . import dicom_fixtures as dx
from .io_fixtures import oblique_direction, phantom


def _grid(direction: np.ndarray, spacing: tuple[float, float, float],
          size: tuple[int, int, int], centre: np.ndarray) -> sitk.Image:
    """An empty float32 image of `size` centred on `centre` (LPS mm); `direction` may shear."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    extent = np.asarray(spacing) * (np.asarray(size) - 1) / 2.0
    image.SetOrigin(tuple(centre - np.asarray(direction).reshape(3, 3) @ extent))
    return image


def tilted_axes(tilt_deg: float) -> np.ndarray:
    """Direction columns of a tilted acquisition: row (L), column tilted about L by
    `tilt_deg` towards the head, and the table axis (S), which is not the normal."""
    t = math.radians(tilt_deg)
    return np.column_stack([(1.0, 0.0, 0.0), (0.0, math.cos(t), math.sin(t)), (0.0, 0.0, 1.0)])


def tilted_series(volume: sitk.Image, folder: Path, tilt_deg: float, step_mm: float,
                  size: tuple[int, int, int], centre: np.ndarray) -> list[pydicom.Dataset]:
    """`volume` sampled on a tilted acquisition's slices (the step along the slice normal is
    `step_mm`), written as a CT series; returns the datasets."""
    table_step = step_mm / math.cos(math.radians(tilt_deg))
    sheared = _grid(tilted_axes(tilt_deg), (step_mm, step_mm, table_step), size, centre)
    stack = sitk.Resample(volume, sheared, sitk.Transform(), sitk.sitkLinear, -30.0)
    datasets, _ = dx.write_series(stack, folder, slope=1.0, intercept=-1024.0)
    return datasets


def _positions_and_volume(folder: Path) -> tuple[float | None, list[int] | None]:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    return get_series_volume_positions(datasets)


# ------------------------------------------------------------- real CT anatomy


@pytest.fixture(scope="module")
def head_ct() -> sitk.Image:
    """The real CT head template (totalsegmentator, 1 mm), float32 HU."""
    from disa.training.sources import source_files

    paths = source_files("ct-brain-atlas")
    assert paths is not None, "totalsegmentator not installed (scripts/install_training_data.sh)"
    return sitk.ReadImage(str(paths[0]), sitk.sitkFloat32)


def _assert_matches_volume(volume: sitk.Image, image: sitk.Image):
    """Where the stored slices have data, `image` holds `volume`'s values (within 1 on average)."""
    ideal = sitk.GetArrayFromImage(sitk.Resample(volume, image, sitk.Transform(),
                                                 sitk.sitkLinear, np.nan))
    got = sitk.GetArrayFromImage(image)
    inside = np.isfinite(ideal) & (got > float(got.min()) + 1e-3)
    assert inside.mean() > 0.5
    assert float(np.abs(got - ideal)[inside].mean()) < 1.0
    return ideal, got, inside


def test_tilted_ct_registers_as_the_untilted_one(head_ct: sitk.Image, tmp_path: Path) -> None:
    """A 20 degree tilted series of a real CT, read, registered and written: the result
    matches the untilted series' within 1 mm, and result.json and the REG say so."""
    spacing, size = 4.0, (50, 50, 42)
    centre = np.asarray(head_ct.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in head_ct.GetSize()]))
    straight = sitk.Resample(head_ct, _grid(np.eye(3), (spacing,) * 3, size, centre),
                             sitk.Transform(), sitk.sitkLinear, -30.0)
    study = pydicom.uid.generate_uid()
    dx.write_series(straight, tmp_path / "untilted", slope=1.0, intercept=-1024.0,
                    study_uid=study)
    tilted_series(head_ct, tmp_path / "tilted", 20.0, spacing, size, centre)
    for ds_path in (tmp_path / "tilted").iterdir():  # same study as the others
        ds = pydicom.dcmread(ds_path)
        ds.StudyInstanceUID = study
        ds.save_as(ds_path)
    # The moving CT: the same anatomy moved by a known rigid transform in its header.
    truth = sitk.Euler3DTransform(centre.tolist(), *np.deg2rad([6.0, -4.0, 5.0]),
                                  (7.0, -5.0, 6.0))
    moving = sitk.Image(straight)
    moving.SetOrigin(truth.TransformPoint(moving.GetOrigin()))
    moving.SetDirection(truth.GetMatrix())
    dx.write_series(moving, tmp_path / "moving", slope=1.0, intercept=-1024.0,
                    study_uid=study, series_number=2)

    # highdicom agrees that the tilted stack, as stored, is no regular volume.
    assert _positions_and_volume(tmp_path / "tilted") == (None, None)
    assert _positions_and_volume(tmp_path / "untilted")[0] == pytest.approx(spacing)

    options = RegistrationOptions(starts=40, seed=1)
    runs = {}
    for name in ("untilted", "tilted"):
        runs[name] = run_registration(tmp_path / name, tmp_path / "moving",
                                      tmp_path / f"out-{name}", options)
    correction = runs["tilted"]["inputs"]["fixed"]["geometry_correction"]
    assert correction["corrected"] == ["gantry tilt"]
    assert correction["gantry_tilt_deg"] == pytest.approx(20.0, abs=0.05)
    assert runs["untilted"]["inputs"]["fixed"]["geometry_correction"] is None
    assert runs["tilted"]["inputs"]["moving"]["geometry_correction"] is None
    on_disk = json.loads((tmp_path / "out-tilted" / "result.json").read_text())
    assert on_disk["inputs"]["fixed"]["geometry_correction"] == correction

    body = np.argwhere(sitk.GetArrayFromImage(straight) > 20.0)[::25, ::-1].astype(float)
    points = [straight.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in body]
    transforms = {name: sitk.ReadTransform(str(tmp_path / f"out-{name}" / "transform.tfm"))
                  for name in runs}

    def distance(a: sitk.Transform, b: sitk.Transform) -> np.ndarray:
        return np.array([np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p)))
                         for p in points])

    between = distance(transforms["tilted"], transforms["untilted"])
    assert between.max() < 1.0, f"tilted vs untilted: max {between.max():.2f} mm"
    assert distance(transforms["tilted"], truth).mean() < 1.0

    # The REG references the stored (tilted) instances and names the correction.
    reg = pydicom.dcmread(tmp_path / "out-tilted" / "registration.dcm")
    fixed_item = reg.RegistrationSequence[0]
    comment = fixed_item.MatrixRegistrationSequence[0].FrameOfReferenceTransformationComment
    assert "gantry tilt 20.0 deg resampled" in comment
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
              for p in (tmp_path / "tilted").iterdir()}
    assert {i.ReferencedSOPInstanceUID for i in fixed_item.ReferencedImageSequence} == stored
    moving_item = reg.RegistrationSequence[1]
    assert "resampled" not in \
        moving_item.MatrixRegistrationSequence[0].FrameOfReferenceTransformationComment
    matrix = dr.read_registration_matrix(tmp_path / "out-tilted" / "registration.dcm",
                                         source_series_uid=str(
                                             pydicom.dcmread(next((tmp_path / "moving")
                                                                  .iterdir())).SeriesInstanceUID))
    np.testing.assert_allclose(matrix, np.linalg.inv(runs["tilted"]["matrix_fixed_to_moving"]),
                               atol=1e-8)


# ------------------------------------------------------------ synthetic stacks


def _truth_volume() -> tuple[sitk.Image, np.ndarray]:
    """A smooth 1 mm volume (a blob on a ramp) and its centre (LPS mm)."""
    size = (60, 60, 60)
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in size), indexing="ij")
    array = 200.0 * np.exp(-((x / 0.5) ** 2 + (y / 0.4) ** 2 + (z / 0.6) ** 2)) + 30.0 * y
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetOrigin((-29.5, -29.5, -29.5))
    return image, np.zeros(3)


@pytest.mark.parametrize("tilt", [-15.0, 12.0, 30.0])
def test_tilted_stack_is_resampled_exactly_onto_an_orthogonal_grid(tmp_path: Path,
                                                                    tilt: float) -> None:
    volume, centre = _truth_volume()
    tilted_series(volume, tmp_path / "ct", tilt, 2.0, (20, 20, 16), centre)
    image = read_image(tmp_path / "ct")
    info = inspect_image(tmp_path / "ct")
    assert info.geometry_correction["gantry_tilt_deg"] == pytest.approx(abs(tilt), abs=0.01)
    assert info.geometry_correction["stored_size"] == [20, 20, 16]
    assert tuple(image.GetSize()) == info.size and image.GetSize()[1] > 20  # covers the shear
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(d[:, 2], np.cross(*tilted_axes(tilt)[:, :2].T), atol=1e-5)
    assert image.GetSpacing()[2] == pytest.approx(2.0, abs=1e-4)  # the step along the normal
    # Where the stored slices have data, the values are the volume's at those points
    # (within the int16 storage and one bilinear interpolation of a smooth field).
    ideal, got, inside = _assert_matches_volume(volume, image)
    # Voxels the tilt uncovers hold the background (the stack's minimum), not zeros.
    assert float(got.min()) == pytest.approx(float(np.round(ideal[inside].min())), abs=2.0)


def test_variable_slice_spacing_is_resampled_near_the_median_step(tmp_path: Path) -> None:
    """Steps of 2.5 mm, then of 2.7 mm: not one grid, but no slice is missing."""
    volume, centre = _truth_volume()
    datasets, _ = dx.series_datasets(_sample(volume, (20, 20, 16), 2.5, centre))
    k = np.arange(len(datasets))
    shift = np.where(k > 7, 0.2 * (k - 7), 0.0)  # mm along the normal (S)
    folder = tmp_path / "ct"
    folder.mkdir()
    for j, ds in enumerate(datasets):
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        position[2] += shift[j]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        # The slice shows the anatomy at its own (shifted) place.
        plane = _sample(volume, (20, 20, 1), 2.5, None, origin=position)
        stored = np.round(sitk.GetArrayFromImage(plane)[0] + 1024.0).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"{j:03d}.dcm", enforce_file_format=True)
    assert _positions_and_volume(folder) == (None, None)
    image = read_image(folder)
    correction = inspect_image(folder).geometry_correction
    assert correction["corrected"] == ["variable slice spacing"]
    assert correction["slice_steps_mm"] == pytest.approx([2.5, 2.7], abs=1e-3)
    # 39.1 mm (7 steps of 2.5, 8 of 2.7) at about the median step, 2.7 mm; ends kept.
    assert image.GetSize()[2] == 15
    assert image.GetSpacing()[2] == pytest.approx(39.1 / 14, abs=1e-3)
    ideal = sitk.GetArrayFromImage(sitk.Resample(volume, image, sitk.Transform(),
                                                 sitk.sitkLinear, np.nan))
    got = sitk.GetArrayFromImage(image)
    assert float(np.nanmean(np.abs(got - ideal))) < 1.5


def _sample(volume: sitk.Image, size: tuple[int, int, int], spacing: float,
            centre: np.ndarray | None, origin: np.ndarray | None = None) -> sitk.Image:
    grid = _grid(np.eye(3), (spacing,) * 3, size, np.zeros(3) if centre is None else centre)
    if origin is not None:
        grid.SetOrigin(tuple(float(v) for v in origin))
    return sitk.Resample(volume, grid, sitk.Transform(), sitk.sitkLinear, -30.0)


def test_regular_series_matches_the_highdicom_oracle(tmp_path: Path) -> None:
    """On a regular stack (oblique, stored in shuffled file order) our slice spacing and
    order equal highdicom's, and nothing is resampled."""
    names = [f"{k:03d}.dcm" for k in np.random.default_rng(1).permutation(16)]
    datasets, _ = dx.write_series(phantom(), tmp_path / "ct", names=names)
    spacing, indices = get_series_volume_positions(datasets)
    info = inspect_image(tmp_path / "ct")
    assert info.geometry_correction is None
    assert info.spacing[2] == pytest.approx(spacing, abs=1e-5)
    # highdicom numbers the slices along -n (its default handedness); ours go along +n.
    ours = [int(h.InstanceNumber) - 1 for h in read_dicom_headers(tmp_path / "ct")]
    assert [indices[k] for k in ours] == list(range(15, -1, -1))


def test_a_missing_slice_is_refused_where_highdicom_sees_a_gap(tmp_path: Path) -> None:
    """highdicom finds the stack regular only when missing positions are allowed: a gap,
    which resampling cannot fill, so it is refused naming it."""
    datasets, _ = dx.series_datasets(phantom())
    kept = datasets[:7] + datasets[8:]
    assert get_series_volume_positions(kept) == (None, None)
    spacing, _ = get_series_volume_positions(kept, allow_missing_positions=True)
    assert spacing == pytest.approx(2.5, abs=1e-4)
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(kept):
        ds.save_as(tmp_path / "ct" / f"{k:03d}.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"5 mm between slices 7 and 8, 2.5 mm elsewhere "
                                         r"\(missing slices\?\); a step over 1.5 x"):
        inspect_image(tmp_path / "ct")


def test_disa_info_names_the_correction(tmp_path: Path) -> None:
    from disa.core.io.images import format_info

    volume, centre = _truth_volume()
    tilted_series(volume, tmp_path / "ct", 15.0, 2.0, (20, 20, 16), centre)
    text = format_info(inspect_image(tmp_path / "ct"))
    assert "gantry tilt 15.0 deg resampled onto this grid (stored as 20x20x16 voxels)" in text


def _drifting(tmp: Path, lateral: np.ndarray) -> Path:
    datasets, _ = dx.series_datasets(phantom())
    d = np.asarray(oblique_direction()).reshape(3, 3)
    folder = tmp / "ct"
    folder.mkdir()
    for k, ds in enumerate(datasets):
        position = np.asarray([float(v) for v in ds.ImagePositionPatient]) + lateral[k] * d[:, 1]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def test_sideways_drift_that_is_no_tilt_is_refused(tmp_path: Path) -> None:
    k = np.arange(16)
    folder = _drifting(tmp_path, np.where(k % 2 == 0, 0.0, 1.5))  # zig-zag
    with pytest.raises(InputError, match=r"off a straight line .*not a gantry tilt"):
        inspect_image(folder)


def test_tilt_beyond_a_gantry_is_refused(tmp_path: Path) -> None:
    folder = _drifting(tmp_path, 2.5 * 1.5 * np.arange(16))  # atan(1.5) = 56 deg
    with pytest.raises(InputError, match="a tilt of 56 deg"):
        read_image(folder)


def test_a_tilt_below_a_quarter_pixel_is_no_tilt(tmp_path: Path) -> None:
    folder = _drifting(tmp_path, 0.01 * np.arange(16))  # 0.15 mm over the series
    assert inspect_image(folder).geometry_correction is None


def test_a_tilted_enhanced_multiframe_series_is_corrected(tmp_path: Path) -> None:
    """Frame positions from the functional groups, stored in shuffled order, tilted."""
    volume, centre = _truth_volume()
    table_step = 2.0 / math.cos(math.radians(18.0))
    sheared = _grid(tilted_axes(18.0), (2.0, 2.0, table_step), (20, 20, 12), centre)
    stack = sitk.Resample(volume, sheared, sitk.Transform(), sitk.sitkLinear, -30.0)
    (tmp_path / "mr").mkdir()
    order = list(np.random.default_rng(2).permutation(12))
    dx.write_enhanced_mr(stack, tmp_path / "mr" / "e.dcm", order=order, slope=1.0,
                         intercept=-100.0)
    image = read_image(tmp_path / "mr")
    correction = inspect_image(tmp_path / "mr").geometry_correction
    assert correction["gantry_tilt_deg"] == pytest.approx(18.0, abs=0.01)
    _assert_matches_volume(volume, image)
