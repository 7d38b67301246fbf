"""DICOM input: slice order, geometry from positions, rescale, multi-frame, inconsistent series."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.io.images import inspect_image, read_dicom_headers, read_image

from . import dicom_fixtures as dx
from .io_fixtures import oblique_direction, phantom

SIZE = (24, 20, 16)  # phantom() size, x y z
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (-10.0, 20.0, 5.0)


def assert_grid(image: sitk.Image | object, origin=ORIGIN, direction=None) -> None:
    """Size, spacing, origin and direction of the phantom (positions decimals: 1e-5 mm)."""
    direction = oblique_direction() if direction is None else direction
    get = (lambda k: getattr(image, f"Get{k}")()) if isinstance(image, sitk.Image) \
        else (lambda k: getattr(image, k.lower()))
    assert tuple(get("Size")) == SIZE
    np.testing.assert_allclose(get("Spacing"), SPACING, atol=1e-5)
    np.testing.assert_allclose(get("Origin"), origin, atol=1e-5)
    np.testing.assert_allclose(get("Direction"), direction, atol=1e-5)


# ---------------------------------------------------------------- single frame


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path: Path) -> None:
    names = [f"im{k:03d}.dcm" for k in range(SIZE[2])][::-1]  # last slice first by name
    _, expected = dx.write_series(phantom(), tmp_path / "ct", names=names, slope=0.5,
                                  intercept=-100.0)
    image = read_image(tmp_path / "ct")
    assert_grid(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)
    headers = read_dicom_headers(tmp_path / "ct")
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, SIZE[2] + 1))


def test_slice_spacing_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    datasets, _ = dx.series_datasets(phantom())
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(datasets):
        ds.SliceThickness = "5"  # overlapping reconstruction: thickness > spacing
        ds.SpacingBetweenSlices = "7"
        ds.save_as(tmp_path / "ct" / f"{k}.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "ct")
    assert_grid(image)
    assert inspect_image(tmp_path / "ct").spacing[2] == pytest.approx(2.5, abs=1e-5)


def test_rescale_is_applied_slice_by_slice(tmp_path: Path) -> None:
    datasets, _ = dx.series_datasets(phantom())
    values = sitk.GetArrayFromImage(phantom()).astype(np.float64)
    (tmp_path / "pet").mkdir()
    expected = np.empty_like(values)
    for k, ds in enumerate(datasets):
        slope, intercept = 0.25 * (k + 1), -3.0 * k  # as PET writes: one scale per slice
        stored = np.round((values[k] - intercept) / slope).astype(np.int16)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored.tobytes()
        expected[k] = stored * slope + intercept
        ds.save_as(tmp_path / "pet" / f"{k}.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "pet")
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)


def test_axial_series_written_head_first_keeps_a_proper_rotation(tmp_path: Path) -> None:
    """Slices listed top to bottom: the z axis still points along row x column."""
    source = phantom()
    source.SetDirection(tuple(np.eye(3).ravel()))
    dx.write_series(source, tmp_path / "ct", names=[f"{k}.dcm" for k in range(SIZE[2])][::-1])
    image = read_image(tmp_path / "ct")
    assert np.linalg.det(np.asarray(image.GetDirection()).reshape(3, 3)) == pytest.approx(1.0)
    assert_grid(image, direction=tuple(np.eye(3).ravel()))


def test_non_image_objects_beside_the_series_are_ignored(tmp_path: Path) -> None:
    dx.write_series(phantom(), tmp_path / "ct")
    other = dx.base_dataset("1.2.840.10008.5.1.4.1.1.66.1", "REG", "1.2.3", "1.2.3.4", "1.2.3.5", 9)
    other.save_as(tmp_path / "ct" / "registration.dcm", enforce_file_format=True)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM\n")
    assert_grid(read_image(tmp_path / "ct"))


def _save_raw(ds: pydicom.Dataset, path: Path) -> None:
    """Write `ds` as a bare dataset: no 128-byte preamble, no 'DICM', no file meta (implicit
    VR little endian), as some PACS exports and old archives hold them."""
    ds = pydicom.Dataset(ds)
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"


@pytest.mark.parametrize("raw", ["first_and_last", "all"])
def test_files_without_preamble_are_read(tmp_path: Path, raw: str) -> None:
    """A slice stored without the preamble is a slice, not a file to skip: dropping the
    first or last one would pass every gap check and shift or shorten the volume."""
    datasets, expected = dx.series_datasets(phantom(), slope=0.5, intercept=-100.0)
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(datasets):
        path = tmp_path / "ct" / f"{k:03d}.dcm"
        if raw == "all" or k in (0, len(datasets) - 1):
            _save_raw(ds, path)
        else:
            ds.save_as(path, enforce_file_format=True)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM\n")  # still skipped
    image = read_image(tmp_path / "ct")
    assert_grid(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)
    assert len(read_dicom_headers(tmp_path / "ct")) == SIZE[2]


def test_folder_without_a_series_names_the_files_it_skipped(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not DICOM\n")
    datasets, _ = dx.series_datasets(phantom())
    del datasets[0].Rows  # parses as DICOM, but is no image
    _save_raw(datasets[0], tmp_path / "in" / "scan.dcm")
    with pytest.raises(InputError) as caught:
        read_image(tmp_path / "in")
    message = str(caught.value)
    assert message.startswith("in: no DICOM series found (skipped 2 file(s)")
    assert "notes.txt" in message and "scan.dcm" in message and "\n" not in message


def test_file_of_the_series_without_preamble_or_image_attributes_is_refused(
        tmp_path: Path) -> None:
    """A bare dataset of the series lacking SOPClassUID is not silently one slice short."""
    datasets, _ = dx.series_datasets(phantom())
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(datasets[:-1]):
        ds.save_as(tmp_path / "ct" / f"{k:03d}.dcm", enforce_file_format=True)
    del datasets[-1].SOPClassUID
    _save_raw(datasets[-1], tmp_path / "ct" / "last.dcm")
    with pytest.raises(InputError, match=r"1 file\(s\) of DICOM series .* lack the DICM "
                                         r"preamble and SOPClassUID, Rows or Columns: last.dcm"):
        read_image(tmp_path / "ct")


def test_metadata_tags_come_from_the_series(tmp_path: Path) -> None:
    datasets, _ = dx.write_series(phantom(), tmp_path / "mr", modality="MR")
    image = read_image(tmp_path / "mr")
    assert image.GetMetaData("0008|0060") == "MR"
    assert image.GetMetaData("0020|000e") == datasets[0].SeriesInstanceUID
    assert image.GetMetaData("0020|000d") == datasets[0].StudyInstanceUID
    assert image.GetMetaData("0020|0052") == datasets[0].FrameOfReferenceUID
    assert not image.HasMetaDataKey("0010|0010")  # no patient name on the image


# ----------------------------------------------------------------- multi-frame


@pytest.mark.parametrize("order", ["stored", "reversed", "shuffled"])
def test_enhanced_multiframe_geometry_and_frame_order(tmp_path: Path, order: str) -> None:
    nz = SIZE[2]
    frames = {"stored": list(range(nz)), "reversed": list(range(nz))[::-1],
              "shuffled": list(np.random.default_rng(3).permutation(nz))}[order]
    path = tmp_path / "mr" / "enhanced.dcm"
    path.parent.mkdir()
    expected = dx.write_enhanced_mr(phantom(), path, order=frames, slice_thickness=4.0)
    image = read_image(path.parent)
    assert_grid(image)  # slice spacing 2.5 from the positions, not the 4 mm thickness
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)
    info = inspect_image(path.parent)
    assert_grid(info)
    assert info.modality == "MR"


def test_enhanced_multiframe_in_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "enhanced.dcm"
    expected = dx.write_enhanced_mr(phantom(), path, order=list(range(SIZE[2]))[::-1])
    archive = tmp_path / "mr.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(path, "DICOM/IM0001")
    image = read_image(archive)
    assert_grid(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)


def test_enhanced_multiframe_with_equal_per_frame_rescale(tmp_path: Path) -> None:
    path = tmp_path / "mr" / "enhanced.dcm"
    path.parent.mkdir()
    expected = dx.write_enhanced_mr(phantom(), path, per_frame_rescale=[(0.5, 10.0)] * SIZE[2])
    image = read_image(path.parent)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)


def test_legacy_multiframe_uses_spacing_between_slices(tmp_path: Path) -> None:
    datasets, expected = dx.series_datasets(phantom(), modality="MR")
    ds = datasets[0]
    ds.NumberOfFrames = SIZE[2]
    ds.SpacingBetweenSlices = "2.5"
    ds.SliceThickness = "3"
    ds.PixelData = b"".join(d.PixelData for d in datasets)
    (tmp_path / "nm").mkdir()
    ds.save_as(tmp_path / "nm" / "volume.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "nm")
    assert_grid(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-3)


# ------------------------------------------------------------ refused series


def _series(tmp: Path) -> tuple[Path, list[pydicom.Dataset]]:
    datasets, _ = dx.series_datasets(phantom())
    (tmp / "ct").mkdir()
    return tmp / "ct", datasets


def _save(folder: Path, datasets: list[pydicom.Dataset]) -> Path:
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def _missing_slice(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    return _save(folder, datasets[:7] + datasets[8:])


def _duplicate_slice(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    copy = pydicom.Dataset(datasets[5])
    copy.file_meta = datasets[5].file_meta
    copy.SOPInstanceUID = pydicom.uid.generate_uid()
    return _save(folder, [*datasets, copy])


def _mixed_orientation(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return _save(folder, datasets)


def _mixed_size(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    datasets[4].Rows, datasets[4].Columns = 10, 12
    datasets[4].PixelData = bytes(2 * 10 * 12)
    return _save(folder, datasets)


def _mixed_pixel_spacing(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    datasets[2].PixelSpacing = ["1.2", "0.8"]
    return _save(folder, datasets)


def _shift_along_normal(datasets: list[pydicom.Dataset], offsets: np.ndarray) -> None:
    """Move slice k by offsets[k] mm along the slice normal."""
    normal = np.asarray(oblique_direction()).reshape(3, 3)[:, 2]
    for ds, offset in zip(datasets, offsets, strict=True):
        position = np.asarray([float(v) for v in ds.ImagePositionPatient]) + offset * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]


def _no_position(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    del datasets[0].ImagePositionPatient
    return _save(folder, datasets)


def _mixed_frames_of_reference(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    datasets[0].FrameOfReferenceUID = "1.2.3.4.5"
    return _save(folder, datasets)


def _multiframe_and_single(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    dx.write_enhanced_mr(phantom(), folder / "enhanced.dcm")
    multi = pydicom.dcmread(folder / "enhanced.dcm")
    multi.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    multi.save_as(folder / "enhanced.dcm")
    return _save(folder, datasets[:4])


def _per_frame_rescale_differs(tmp: Path) -> Path:
    (tmp / "mr").mkdir()
    dx.write_enhanced_mr(phantom(), tmp / "mr" / "e.dcm",
                         per_frame_rescale=[(1.0, float(k)) for k in range(SIZE[2])])
    return tmp / "mr"


def _enhanced_without_positions(tmp: Path) -> Path:
    (tmp / "mr").mkdir()
    dx.write_enhanced_mr(phantom(), tmp / "mr" / "e.dcm")
    ds = pydicom.dcmread(tmp / "mr" / "e.dcm")
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    ds.save_as(tmp / "mr" / "e.dcm")
    return tmp / "mr"


def _enhanced_two_volumes(tmp: Path) -> Path:
    """A dynamic series: the same 8 positions twice in one file."""
    (tmp / "mr").mkdir()
    dx.write_enhanced_mr(phantom(), tmp / "mr" / "e.dcm", order=[k % 8 for k in range(SIZE[2])])
    return tmp / "mr"


def _truncated_pixels(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    _save(folder, datasets)
    data = (folder / "003.dcm").read_bytes()
    (folder / "003.dcm").write_bytes(data[:-300])
    return folder


def _unparsable_meta(tmp: Path) -> Path:
    folder, datasets = _series(tmp)
    _save(folder, datasets)
    data = bytearray((folder / "003.dcm").read_bytes())
    data[132:140] = b"\x02\x00\x10\x00ZZ\xff\xff"  # preamble, then a broken meta element
    (folder / "003.dcm").write_bytes(bytes(data))
    return folder


REFUSED = {
    "missing_slice": (_missing_slice, "not evenly spaced: 5 mm between slices 7 and 8, 2.5 mm "
                                      "elsewhere (missing slices?)"),
    "duplicate_slice": (_duplicate_slice, "share the position"),
    "mixed_orientation": (_mixed_orientation, "mixes slice orientations"),
    "mixed_size": (_mixed_size, "mixes image sizes (12x10 and 24x20 pixels)"),
    "mixed_pixel_spacing": (_mixed_pixel_spacing, "mixes pixel spacings"),
    "no_position": (_no_position, "lacks a valid ImagePositionPatient"),
    "mixed_frames_of_reference": (_mixed_frames_of_reference, "mixes frames of reference"),
    "multiframe_and_single": (_multiframe_and_single, "mixes multi-frame files with others"),
    "per_frame_rescale_differs": (_per_frame_rescale_differs, "differently frame by frame"),
    "enhanced_without_positions": (_enhanced_without_positions,
                                   "lacks a valid ImagePositionPatient"),
    "enhanced_two_volumes": (_enhanced_two_volumes, "several volumes in one series"),
    "truncated_pixels": (_truncated_pixels, "cannot read the pixel data"),
    "unparsable_meta": (_unparsable_meta, "cannot be parsed"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inconsistent_series_is_refused_naming_the_problem(tmp_path: Path, case: str) -> None:
    build, phrase = REFUSED[case]
    path = build(tmp_path)
    with pytest.raises(InputError) as caught:
        read_image(path)
    message = str(caught.value)
    assert phrase in message
    assert message.startswith(f"{path.name}: ") and "\n" not in message
    assert str(tmp_path) not in message
    if case != "truncated_pixels":  # the headers alone show every other problem
        with pytest.raises(InputError):
            inspect_image(path)


def test_positions_slightly_off_the_grid_are_accepted(tmp_path: Path) -> None:
    """Positions off the grid by less than max(0.1 x step, 0.2 mm) still form a grid: here a
    0.2 mm bow in the middle of the stack, plus up to 0.03 mm jitter."""
    folder, datasets = _series(tmp_path)
    k = np.arange(len(datasets))
    offsets = 0.2 * np.sin(np.pi * k / (len(k) - 1))
    offsets[1:-1] += np.random.default_rng(3).uniform(-0.03, 0.03, len(k) - 2)
    _shift_along_normal(datasets, offsets)  # the ends stay: the mean step is 2.5 mm exactly
    image = read_image(_save(folder, datasets))
    assert_grid(image)


def test_read_dicom_headers_refuses_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(phantom(), str(path))
    with pytest.raises(InputError, match="not a DICOM series"):
        read_dicom_headers(path)
