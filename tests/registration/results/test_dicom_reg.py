"""DICOM outputs: Spatial Registration, Deformable Spatial Registration, registered series.

Every object written is checked with dciodvfy (Debian dicom3tools) for errors;
those checks skip only where dciodvfy is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from disa.cli import EXIT_OK, main
from disa.core.io.images import read_dicom_headers, read_image
from disa.registration.results import dicom_reg as dr
from disa.training import phantom as ph

from ...core import dicom_fixtures as dx
from ...core.io_fixtures import phantom

FIXED_STUDY = "1.2.826.0.1.3680043.9.7777.6.1"
OTHER_STUDY = "1.2.826.0.1.3680043.9.7777.6.2"


@pytest.fixture(autouse=True)
def strict_writing():
    """Values that break their VR (length, characters) raise instead of warning."""
    settings = pydicom.config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = saved


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dciodvfy for one file (warnings are allowed)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def rigid_matrix(angles_deg: tuple[float, float, float], t: tuple[float, float, float]
                 ) -> np.ndarray:
    """4x4 of an Euler rigid transform (fixed -> moving), ITK ZYX convention, centre 0."""
    tx = ph.rigid_truth(angles_deg, t)
    m = np.eye(4)
    m[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    m[:3, 3] = tx.GetTranslation()
    return m


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, Path]:
    """A CT fixed series and an MR moving series (other frame of reference) of one study,
    and an MR series in another study."""
    root = tmp_path_factory.mktemp("series")
    image = phantom()
    dx.write_series(image, root / "ct", modality="CT", study_uid=FIXED_STUDY)
    dx.write_series(image, root / "mr", modality="MR", study_uid=FIXED_STUDY, series_number=2,
                    slope=0.5, intercept=0.0)
    dx.write_series(image, root / "mr_other", modality="MR", study_uid=OTHER_STUDY,
                    series_number=3)
    return {"ct": root / "ct", "mr": root / "mr", "mr_other": root / "mr_other"}


# ------------------------------------------------------------------ spatial


def test_rigid_registration_object(series, tmp_path: Path) -> None:
    fixed, moving = read_dicom_headers(series["ct"]), read_dicom_headers(series["mr"])
    a = rigid_matrix((10.0, -5.0, 20.0), (12.0, -3.0, 7.5))
    ds = dr.build_spatial_registration(a, fixed, moving, description="test rigid")
    path = tmp_path / "reg.dcm"
    dr.write_dataset(ds, path)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == dr.SPATIAL_REGISTRATION_STORAGE
    assert back.Modality == "REG"
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.SOPInstanceUID.startswith(dr.UID_PREFIX)
    assert back.SeriesInstanceUID.startswith(dr.UID_PREFIX)
    assert back.SeriesInstanceUID not in (fixed[0].SeriesInstanceUID, moving[0].SeriesInstanceUID)
    # Patient and study of the fixed series; registered frame = fixed frame.
    assert (back.PatientName, back.PatientID) == (dx.PATIENT_NAME, dx.PATIENT_ID)
    assert back.StudyInstanceUID == FIXED_STUDY
    assert back.FrameOfReferenceUID == fixed[0].FrameOfReferenceUID
    assert back.Manufacturer == "DISA" and back.ManufacturerModelName
    assert back.DeviceSerialNumber and back.SoftwareVersions
    assert back.ContentLabel == "DISA_REG" and back.InstanceNumber == 1
    # Two items: fixed frame with identity, moving frame with the moving -> fixed matrix.
    first, second = back.RegistrationSequence
    assert first.FrameOfReferenceUID == fixed[0].FrameOfReferenceUID
    assert second.FrameOfReferenceUID == moving[0].FrameOfReferenceUID
    assert len(second.ReferencedImageSequence) == len(moving)
    assert {r.ReferencedSOPInstanceUID for r in first.ReferencedImageSequence} == {
        h.SOPInstanceUID for h in fixed}
    identity = first.MatrixRegistrationSequence[0].MatrixSequence[0]
    np.testing.assert_allclose(
        np.asarray(identity.FrameOfReferenceTransformationMatrix, float).reshape(4, 4), np.eye(4))
    one = second.MatrixRegistrationSequence[0].MatrixSequence[0]
    assert one.FrameOfReferenceTransformationMatrixType == "RIGID"
    # The method: DCM 125024 (taken from pydicom's code dictionary), in both items.
    for item in (first, second):
        (code,) = item.MatrixRegistrationSequence[0].RegistrationTypeCodeSequence
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
            "125024", "DCM", "Image Content-based Alignment")
    matrix = dr.read_registration_matrix(path)
    np.testing.assert_allclose(matrix, np.linalg.inv(a), atol=1e-9)
    # Both series are in the REG's own study: referenced there, nowhere else.
    assert {s.SeriesInstanceUID for s in back.ReferencedSeriesSequence} == {
        fixed[0].SeriesInstanceUID, moving[0].SeriesInstanceUID}
    assert "StudiesContainingOtherReferencedInstancesSequence" not in back


def test_matrix_maps_moving_points_onto_fixed_points(series) -> None:
    """The REG matrix undoes the engine's transform: fixed x -> moving A x -> fixed x."""
    a = rigid_matrix((-12.0, 8.0, 4.0), (-20.0, 5.0, 33.0))
    fixed, moving = read_dicom_headers(series["ct"]), read_dicom_headers(series["mr"])
    ds = dr.build_spatial_registration(a, fixed, moving)
    m = np.asarray(ds.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0]
                   .FrameOfReferenceTransformationMatrix, float).reshape(4, 4)
    points = np.random.default_rng(0).uniform(-100, 100, (20, 3))
    homogeneous = np.c_[points, np.ones(20)]
    moving_points = homogeneous @ a.T
    np.testing.assert_allclose((moving_points @ m.T)[:, :3], points, atol=1e-6)


def test_affine_matrix_type_and_other_study(series, tmp_path: Path) -> None:
    fixed, moving = read_dicom_headers(series["ct"]), read_dicom_headers(series["mr_other"])
    a = rigid_matrix((5.0, 0.0, 0.0), (1.0, 2.0, 3.0))
    a[:3, :3] = a[:3, :3] @ np.diag([1.1, 0.95, 1.0])
    path = tmp_path / "affine.dcm"
    dr.write_dataset(dr.build_spatial_registration(a, fixed, moving), path)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    one = back.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0]
    assert one.FrameOfReferenceTransformationMatrixType == "AFFINE"
    np.testing.assert_allclose(dr.read_registration_matrix(path), np.linalg.inv(a), atol=1e-9)
    # The moving series lives in another study: referenced through that study.
    assert [s.SeriesInstanceUID for s in back.ReferencedSeriesSequence] == [
        fixed[0].SeriesInstanceUID]
    (other,) = back.StudiesContainingOtherReferencedInstancesSequence
    assert other.StudyInstanceUID == OTHER_STUDY
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == moving[0].SeriesInstanceUID


def test_matrix_type() -> None:
    assert dr.matrix_type(np.eye(4)) == "RIGID"
    assert dr.matrix_type(rigid_matrix((30.0, 20.0, -10.0), (5.0, 6.0, 7.0))) == "RIGID"
    reflection = np.diag([1.0, 1.0, -1.0, 1.0])
    assert dr.matrix_type(reflection) == "AFFINE"
    assert dr.matrix_type(np.diag([1.0, 1.0, 1.01, 1.0])) == "AFFINE"


def test_same_frame_of_reference_reads_the_moving_item(tmp_path: Path) -> None:
    """Two series of one session share a frame: the matrix asked for by frame or by series
    is the moving item's, not the fixed item's identity."""
    frame = "1.2.826.0.1.3680043.9.7777.6.9"
    dx.write_series(phantom(), tmp_path / "t1", modality="MR", study_uid=FIXED_STUDY,
                    frame_uid=frame)
    dx.write_series(phantom(), tmp_path / "t2", modality="MR", study_uid=FIXED_STUDY,
                    frame_uid=frame, series_number=2)
    fixed, moving = read_dicom_headers(tmp_path / "t1"), read_dicom_headers(tmp_path / "t2")
    a = rigid_matrix((4.0, -3.0, 2.0), (5.0, -3.0, 2.0))
    path = tmp_path / "reg.dcm"
    dr.write_dataset(dr.build_spatial_registration(a, fixed, moving), path)
    expected = np.linalg.inv(a)
    np.testing.assert_allclose(dr.read_registration_matrix(path), expected, atol=1e-9)
    np.testing.assert_allclose(dr.read_registration_matrix(path, source_frame_uid=frame),
                               expected, atol=1e-9)
    moving_uid = str(moving[0].SeriesInstanceUID)
    fixed_uid = str(fixed[0].SeriesInstanceUID)
    np.testing.assert_allclose(dr.read_registration_matrix(path, source_series_uid=moving_uid),
                               expected, atol=1e-9)
    np.testing.assert_allclose(
        dr.read_registration_matrix(path, source_frame_uid=frame, source_series_uid=moving_uid),
        expected, atol=1e-9)
    np.testing.assert_allclose(dr.read_registration_matrix(path, source_series_uid=fixed_uid),
                               np.eye(4))
    with pytest.raises(ValueError, match="does not reference series"):
        dr.read_registration_matrix(path, source_series_uid="1.2.3.4")
    # A true identity result in one frame still reads as the identity.
    dr.write_dataset(dr.build_spatial_registration(np.eye(4), fixed, moving), path)
    np.testing.assert_allclose(dr.read_registration_matrix(path, source_frame_uid=frame),
                               np.eye(4))


# ------------------------------------------------------------ patient check

OTHER_PATIENT = ("OTHER^PERSON", "OTHER-PATIENT-0002")


def _write_with_patient(folder: Path, patient_id: str, issuer: str | None = None,
                        modality: str = "MR") -> Path:
    datasets, _ = dx.series_datasets(phantom(), modality=modality, study_uid=OTHER_STUDY,
                                     patient=("SOME^ONE", patient_id))
    folder.mkdir()
    for k, ds in enumerate(datasets):
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def test_series_of_two_patients_are_refused(series, tmp_path: Path) -> None:
    fixed = read_dicom_headers(series["ct"])
    other_dir = _write_with_patient(tmp_path / "other", OTHER_PATIENT[1])
    other = read_dicom_headers(other_dir)
    both_ids = rf"'{dx.PATIENT_ID}' \(fixed\) and '{OTHER_PATIENT[1]}' \(moving\)"
    with pytest.raises(ValueError, match=both_ids):
        dr.build_spatial_registration(np.eye(4), fixed, other)
    with pytest.raises(ValueError, match=both_ids):
        dr.build_deformable_registration(_field(read_image(series["ct"])), fixed, other)
    registered = read_image(series["ct"])
    with pytest.raises(ValueError, match=both_ids):
        dr.write_registered_series(registered, series["ct"], tmp_path / "out",
                                   moving_series_dir=other_dir)
    assert not (tmp_path / "out").exists()  # refused before writing anything
    # One instance of another patient in the moving series is enough.
    mixed = list(read_dicom_headers(series["mr"]))
    mixed[-1] = other[0]
    with pytest.raises(dr.PatientMismatch):
        dr.check_same_patient(fixed, mixed)


def test_patient_issuers_and_empty_ids(series, tmp_path: Path) -> None:
    """Same ID from two issuers: two patients. No ID (anonymised) or one issuer: no verdict."""
    fixed_dir = _write_with_patient(tmp_path / "a", "P1", issuer="HOSPITAL-A", modality="CT")
    fixed = read_dicom_headers(fixed_dir)
    other_issuer = read_dicom_headers(_write_with_patient(tmp_path / "b", "P1",
                                                          issuer="HOSPITAL-B"))
    with pytest.raises(ValueError, match=r"'P1' \(issuer 'HOSPITAL-A'\) \(fixed\) and "
                                         r"'P1' \(issuer 'HOSPITAL-B'\) \(moving\)"):
        dr.build_spatial_registration(np.eye(4), fixed, other_issuer)
    no_issuer = read_dicom_headers(_write_with_patient(tmp_path / "c", "P1"))
    anonymous = read_dicom_headers(_write_with_patient(tmp_path / "d", ""))
    for moving in (no_issuer, anonymous):
        assert dr.build_spatial_registration(np.eye(4), fixed, moving).PatientID == "P1"
    assert dr.build_spatial_registration(np.eye(4), anonymous, no_issuer).Modality == "REG"


def test_dicom_outputs_skip_a_pair_of_two_patients(series, tmp_path: Path) -> None:
    """After an engine run on two patients' series: no REG, the reason in result.json
    (without the identifiers, which result.json never carries), the result stands."""
    other_dir = _write_with_patient(tmp_path / "other", OTHER_PATIENT[1])
    data = {"matrix_fixed_to_moving": np.eye(4).tolist()}
    assert dr.write_dicom_outputs(tmp_path, series["ct"], other_dir, data) == []
    assert not (tmp_path / "registration.dcm").exists()
    reason = data["registration_dcm_skipped"]
    assert "different patients" in reason
    assert dx.PATIENT_ID not in reason and OTHER_PATIENT[1] not in reason
    # The same pair of one patient does get its REG.
    data = {"matrix_fixed_to_moving": np.eye(4).tolist(), "mode": "rigid",
            "similarity": "mind", "verdict": "likely", "confidence": 0.12}
    assert dr.write_dicom_outputs(tmp_path, series["ct"], series["mr"], data) == [
        dr.REGISTRATION_FILE]
    # The REG names the verdict that every other view shows, not the agreement figure.
    description = pydicom.dcmread(tmp_path / dr.REGISTRATION_FILE).ContentDescription
    assert description == "DISA rigid registration (mind), verdict likely"


# --------------------------------------------------------------- deformable


def _field(grid_image: sitk.Image) -> sitk.Image:
    """A smooth synthetic displacement (LPS mm) on `grid_image`'s grid."""
    z, y, x = np.meshgrid(*(np.linspace(0, np.pi, n) for n in grid_image.GetSize()[::-1]),
                          indexing="ij")
    vectors = np.stack([2.0 * np.sin(x) * np.cos(z), -1.5 * np.sin(y), 0.7 * np.cos(x + y)],
                       axis=-1).astype(np.float32)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(grid_image)
    return field


def _maps(pre: np.ndarray, post: np.ndarray, field: sitk.Image, points: np.ndarray
          ) -> np.ndarray:
    """post @ (pre @ x + u(x)) for grid points x, u interpolated linearly."""
    u = np.array([field.EvaluateAtPhysicalPoint(tuple(p), sitk.sitkLinear) for p in points])
    inner = np.c_[points, np.ones(len(points))] @ pre.T
    inner[:, :3] += u
    return (inner @ post.T)[:, :3]


def test_deformable_registration_object(series, tmp_path: Path) -> None:
    fixed, moving = read_dicom_headers(series["ct"]), read_dicom_headers(series["mr"])
    grid = read_image(series["ct"])
    field = _field(grid)
    pre = rigid_matrix((3.0, -4.0, 5.0), (2.0, 1.0, -3.0))
    path = tmp_path / "deformable.dcm"
    dr.write_dataset(dr.build_deformable_registration(field, fixed, moving, pre_matrix=pre), path)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == dr.DEFORMABLE_REGISTRATION_STORAGE and back.Modality == "REG"
    assert back.FrameOfReferenceUID == fixed[0].FrameOfReferenceUID
    (item,) = back.DeformableRegistrationSequence
    assert item.SourceFrameOfReferenceUID == moving[0].FrameOfReferenceUID
    assert item.RegistrationTypeCodeSequence[0].CodeValue == "125024"
    grid_item = item.DeformableRegistrationGridSequence[0]
    assert list(grid_item.GridDimensions) == list(grid.GetSize())
    assert len(grid_item.VectorGridData) == 4 * 3 * int(np.prod(grid.GetSize()))
    read = dr.read_deformable_registration(path)
    np.testing.assert_allclose(read.pre, pre, atol=1e-9)
    np.testing.assert_allclose(read.post, np.eye(4))
    np.testing.assert_allclose(sitk.GetArrayFromImage(read.displacement),
                               sitk.GetArrayFromImage(field), atol=1e-6)
    np.testing.assert_allclose(read.displacement.GetOrigin(), grid.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(read.displacement.GetDirection(), grid.GetDirection(), atol=1e-6)
    points = np.array([grid.TransformIndexToPhysicalPoint(i) for i in
                       [(0, 0, 0), (5, 7, 3), (23, 19, 15), (12, 2, 9)]])
    np.testing.assert_allclose(_maps(read.pre, read.post, read.displacement, points),
                               _maps(pre, np.eye(4), field, points), atol=1e-4)


def test_a_resampled_series_is_named_in_both_kinds_of_registration(series) -> None:
    """A gantry-tilt correction is said in the comment of the items that reference the
    stored series (rigid: that series' item; deformable: the one item), within the LO's
    64 characters."""
    fixed, moving = read_dicom_headers(series["ct"]), read_dicom_headers(series["mr"])
    said = "gantry tilt 20.0 deg resampled"
    rigid = dr.build_spatial_registration(np.eye(4), fixed, moving,
                                          corrections={"fixed": said})
    first, second = rigid.RegistrationSequence
    comments = [i.MatrixRegistrationSequence[0].FrameOfReferenceTransformationComment
                for i in (first, second)]
    assert said in comments[0] and said not in comments[1]
    grid = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    deformable = dr.build_deformable_registration(_field(grid), fixed, moving,
                                                  corrections={"moving": said})
    comment = deformable.DeformableRegistrationSequence[0].FrameOfReferenceTransformationComment
    assert said in comment and len(comment) <= 64


def test_deformable_grid_is_made_right_handed(series) -> None:
    """A grid whose z axis is -(x cross y) is flipped: same vectors at the same points."""
    fixed, moving = read_dicom_headers(series["ct"]), read_dicom_headers(series["mr"])
    grid = sitk.Image(10, 8, 6, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.5, 3.0))
    grid.SetOrigin((-5.0, 4.0, 30.0))
    grid.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # left-handed: z runs towards the feet
    field = _field(grid)
    ds = dr.build_deformable_registration(field, fixed, moving)
    grid_item = ds.DeformableRegistrationSequence[0].DeformableRegistrationGridSequence[0]
    np.testing.assert_allclose([float(v) for v in grid_item.ImagePositionPatient],
                               (-5.0, 4.0, 30.0 - 3.0 * 5))
    vectors = np.frombuffer(grid_item.VectorGridData, "<f4").reshape(6, 8, 10, 3)
    original = sitk.GetArrayFromImage(field)
    np.testing.assert_allclose(vectors, original[::-1], atol=1e-6)


# -------------------------------------------------------- registered series


@pytest.mark.parametrize("moving_key", ["mr", None])
def test_registered_series(series, tmp_path: Path, moving_key: str | None) -> None:
    fixed_image = read_image(series["ct"])
    registered = sitk.Resample(read_image(series["mr"]), fixed_image,
                               sitk.TranslationTransform(3, (1.0, -2.0, 0.5)))
    moving_dir = series[moving_key] if moving_key else None
    files = dr.write_registered_series(registered, series["ct"], tmp_path / "out",
                                       moving_series_dir=moving_dir)
    assert len(files) == fixed_image.GetSize()[2]
    assert dciodvfy_errors(files[0]) == []
    assert dciodvfy_errors(files[-1]) == []
    back = read_image(tmp_path / "out")
    np.testing.assert_allclose(back.GetOrigin(), fixed_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), fixed_image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), fixed_image.GetDirection(), atol=1e-5)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    fixed_header = read_dicom_headers(series["ct"])[0]
    assert header.FrameOfReferenceUID == fixed_header.FrameOfReferenceUID
    assert header.StudyInstanceUID == fixed_header.StudyInstanceUID
    assert header.Modality == ("MR" if moving_key else "CT")
    assert list(header.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    values, original = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(registered)
    if moving_key is None:  # CT: rescale keeps the values (rounded to the stored grid)
        np.testing.assert_allclose(values, original, atol=0.01 * np.ptp(original))
    else:  # MR has no rescale: values are linearly related
        assert np.corrcoef(values.ravel(), original.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("timing", [False, True])
def test_registered_series_from_an_enhanced_mr(series, tmp_path: Path, timing: bool) -> None:
    """An Enhanced MR moving series has no top-level RepetitionTime (type 2C in the MR
    Image IOD): it comes from its functional groups, or is written empty."""
    (tmp_path / "emr").mkdir()
    dx.write_enhanced_mr(phantom(), tmp_path / "emr" / "mr.dcm")
    if timing:
        ds = pydicom.dcmread(tmp_path / "emr" / "mr.dcm")
        item = pydicom.Dataset()
        item.RepetitionTime = "12.5"
        item.EchoTrainLength = 3
        ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence = \
            pydicom.Sequence([item])
        echo = pydicom.Dataset()
        echo.EffectiveEchoTime = 4.25
        ds.SharedFunctionalGroupsSequence[0].MREchoSequence = pydicom.Sequence([echo])
        ds.save_as(tmp_path / "emr" / "mr.dcm", enforce_file_format=True)
    files = dr.write_registered_series(read_image(series["ct"]), series["ct"], tmp_path / "out",
                                       moving_series_dir=tmp_path / "emr")
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert header.Modality == "MR" and "RepetitionTime" in header
    if timing:
        assert float(header.RepetitionTime) == 12.5
        assert int(header.EchoTrainLength) == 3
        assert float(header.EchoTime) == 4.25
    else:
        assert header.RepetitionTime in ("", None)
    assert dciodvfy_errors(files[0]) == []


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dicom_pair(tmp_path_factory) -> tuple[Path, Path, ph.PhantomPair]:
    """The phantom pair as two DICOM series with different frames of reference."""
    root = tmp_path_factory.mktemp("pair")
    truth = ph.rigid_truth((8.0, -6.0, 7.0), (10.0, -8.0, 9.0))
    pair = ph.make_pair(truth, fixed_grid=ph.make_grid((40, 40, 40), (4.0, 4.0, 4.0)))
    dx.write_series(pair.fixed, root / "fixed", modality="MR", study_uid=FIXED_STUDY,
                    slope=0.001, intercept=0.0)
    dx.write_series(pair.moving, root / "moving", modality="CT", study_uid=FIXED_STUDY,
                    series_number=2, slope=1.0, intercept=0.0)
    return root / "fixed", root / "moving", pair


def test_cli_writes_registration_dcm_for_dicom_inputs(dicom_pair, tmp_path: Path) -> None:
    fixed_dir, moving_dir, pair = dicom_pair
    out = tmp_path / "out"
    code = main(["register", str(fixed_dir), str(moving_dir), "-o", str(out),
                 "--similarity", "mind", "--starts", "50", "--quiet"])
    assert code == EXIT_OK
    data = json.loads((out / "result.json").read_text())
    assert "registration.dcm" in data["files"]
    assert (out / "registration.dcm").is_file()
    assert dciodvfy_errors(out / "registration.dcm") == []
    reg = pydicom.dcmread(out / "registration.dcm")
    fixed_header = read_dicom_headers(fixed_dir)[0]
    moving_header = read_dicom_headers(moving_dir)[0]
    assert reg.FrameOfReferenceUID == fixed_header.FrameOfReferenceUID
    assert reg.RegistrationSequence[1].FrameOfReferenceUID == moving_header.FrameOfReferenceUID
    matrix = dr.read_registration_matrix(out / "registration.dcm")
    a = np.asarray(data["matrix_fixed_to_moving"])
    np.testing.assert_allclose(matrix, np.linalg.inv(a), atol=1e-8)
    # Moving-frame points of the anatomy land on their fixed-frame points (truth: fixed->moving).
    fixed_points = ph.grid_points(ph.make_grid((5, 5, 5), (15.0, 15.0, 15.0)))
    moving_points = np.array([pair.truth.TransformPoint(tuple(p)) for p in fixed_points])
    mapped = (np.c_[moving_points, np.ones(len(moving_points))] @ matrix.T)[:, :3]
    errors = np.linalg.norm(mapped - fixed_points, axis=1)
    assert errors.mean() < 1.0, errors.mean()
    # The same holds for transform.tfm, which the REG matrix inverts.
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    for p in fixed_points[:5]:
        q = np.r_[tfm.TransformPoint(tuple(p)), 1.0]
        np.testing.assert_allclose((matrix @ q)[:3], p, atol=1e-6)


def test_no_registration_dcm_for_other_formats(tmp_path: Path) -> None:
    assert dr.write_dicom_outputs(tmp_path, tmp_path / "a.nii.gz", tmp_path / "b.nii.gz",
                                  {"matrix_fixed_to_moving": np.eye(4).tolist()}) == []
    assert not (tmp_path / "registration.dcm").exists()


def test_series_without_frame_of_reference_skip_only_the_reg(tmp_path: Path) -> None:
    datasets, _ = dx.series_datasets(phantom())
    (tmp_path / "ct").mkdir()
    for k, ds in enumerate(datasets):
        del ds.FrameOfReferenceUID
        ds.save_as(tmp_path / "ct" / f"{k}.dcm", enforce_file_format=True)
    data = {"matrix_fixed_to_moving": np.eye(4).tolist()}
    assert dr.write_dicom_outputs(tmp_path, tmp_path / "ct", tmp_path / "ct", data) == []
    assert "FrameOfReferenceUID" in data["registration_dcm_skipped"]
    assert not (tmp_path / "registration.dcm").exists()


def test_cli_chooses_series_of_one_folder_by_uid(dicom_pair, tmp_path: Path, capsys) -> None:
    """Both series in one folder: without a choice exit 2 naming the UIDs; with it a REG."""
    fixed_dir, moving_dir, _ = dicom_pair
    both = tmp_path / "both"
    both.mkdir()
    for i, f in enumerate(sorted(fixed_dir.iterdir()) + sorted(moving_dir.iterdir())):
        shutil.copy(f, both / f"{i:04d}.dcm")
    fixed_uid = read_dicom_headers(fixed_dir)[0].SeriesInstanceUID
    moving_uid = read_dicom_headers(moving_dir)[0].SeriesInstanceUID
    out = tmp_path / "out"
    code = main(["register", str(both), str(both), "-o", str(out), "--quiet"])
    assert code == 2 and fixed_uid in capsys.readouterr().err
    code = main(["register", str(both), str(both), "-o", str(out), "--similarity", "mind",
                 "--starts", "30", "--fixed-series-uid", fixed_uid, "--moving-series-uid",
                 moving_uid, "--quiet"])
    assert code == EXIT_OK
    reg = pydicom.dcmread(out / "registration.dcm")
    assert reg.RegistrationSequence[1].FrameOfReferenceUID == \
        read_dicom_headers(moving_dir)[0].FrameOfReferenceUID


def test_deformable_result_writes_a_deformable_registration(dicom_pair, tmp_path: Path) -> None:
    """--mode deformable on DICOM inputs: registration.dcm is a Deformable SRO whose mapping
    equals transform.h5 (the full fixed -> moving mapping)."""
    fixed_dir, moving_dir, _ = dicom_pair
    out = tmp_path / "out"
    code = main(["register", str(fixed_dir), str(moving_dir), "-o", str(out), "--similarity",
                 "mind", "--starts", "30", "--mode", "deformable", "--quiet"])
    assert code == EXIT_OK
    path = out / "registration.dcm"
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).SOPClassUID == dr.DEFORMABLE_REGISTRATION_STORAGE
    read = dr.read_deformable_registration(path)
    full = sitk.ReadTransform(str(out / "transform.h5"))
    grid = read_image(fixed_dir)
    points = np.array([grid.TransformIndexToPhysicalPoint(i) for i in
                       [(5, 5, 5), (20, 20, 20), (30, 12, 25), (12, 28, 9)]])
    expected = np.array([full.TransformPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(_maps(read.pre, read.post, read.displacement, points), expected,
                               atol=0.05)
