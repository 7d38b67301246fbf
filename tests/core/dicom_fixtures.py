"""Synthetic DICOM series written with pydicom: single-frame CT/MR and enhanced multi-frame.

Geometry follows ITK: an image's direction columns are the x (row), y (column)
and z (slice) axis directions in LPS; slice k lies at origin + k * dz * z-axis.
Patient and study modules are filled with made-up values, so objects derived
from them (Spatial Registration, registered series) have something to copy and
a PACS (Orthanc) accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
TEST_ROOT = "1.2.826.0.1.3680043.9.7777.5."

PATIENT_NAME = "PHANTOM^DISA"
PATIENT_ID = "DISA-PHANTOM-0001"


def _axes(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return d[:, 0], d[:, 1], d[:, 2]


def _stored(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return np.clip(np.round((values - intercept) / slope), -32768, 32767).astype(np.int16)


def _ds_text(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def base_dataset(
    sop_class: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    patient: tuple[str, str] = (PATIENT_NAME, PATIENT_ID),
) -> Dataset:
    """Patient, study, series, equipment and frame-of-reference modules of one image."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=TEST_ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "DISA phantom study"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"phantom {modality}"
    ds.Laterality = ""
    if sop_class in (CT_IMAGE, MR_IMAGE, ENHANCED_MR_IMAGE):
        ds.PatientPosition = "HFS"
    ds.Manufacturer = "DISA test"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _pixel_module(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1


def series_datasets(
    image: sitk.Image,
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    series_number: int = 1,
    slope: float = 1.0,
    intercept: float = -1024.0,
    patient: tuple[str, str] = (PATIENT_NAME, PATIENT_ID),
) -> tuple[list[Dataset], np.ndarray]:
    """One single-frame CT or MR image per z slice; returns the datasets and the rescaled values.

    The values a reader should return (stored * slope + intercept, numpy z, y, x)
    differ from the image's by the rounding of the int16 storage.
    """
    study_uid = study_uid or generate_uid(prefix=TEST_ROOT)
    series_uid = series_uid or generate_uid(prefix=TEST_ROOT)
    frame_uid = frame_uid or generate_uid(prefix=TEST_ROOT)
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    stored = _stored(values, slope, intercept)
    row, col, normal = _axes(image)
    spacing = image.GetSpacing()
    datasets = []
    for k in range(stored.shape[0]):
        ds = base_dataset(sop_class, modality, study_uid, series_uid, frame_uid, series_number,
                          patient)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ""
        position = np.asarray(image.GetOrigin()) + normal * spacing[2] * k
        ds.ImagePositionPatient = [_ds_text(v) for v in position]
        ds.ImageOrientationPatient = [_ds_text(v) for v in (*row, *col)]
        ds.PixelSpacing = [_ds_text(spacing[1]), _ds_text(spacing[0])]
        ds.SliceThickness = _ds_text(spacing[2])
        ds.SliceLocation = _ds_text(float(position @ normal))
        _pixel_module(ds, stored.shape[1], stored.shape[2])
        ds.RescaleSlope = _ds_text(slope)
        ds.RescaleIntercept = _ds_text(intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.AcquisitionNumber = 1
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = "5"
            ds.EchoTrainLength = 1
            ds.RepetitionTime = "10"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets, stored.astype(np.float64) * slope + intercept


def write_series(
    image: sitk.Image,
    folder: Path,
    names: Sequence[str] | None = None,
    **kwargs: object,
) -> tuple[list[Dataset], np.ndarray]:
    """Write `series_datasets(image, **kwargs)` into `folder`, one file per slice.

    `names` gives each slice's file name (default slice000.dcm, ...); pass them
    shuffled to check that the reader orders slices by position, not by name.
    """
    datasets, expected = series_datasets(image, **kwargs)  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"slice{k:03d}.dcm" for k in range(len(datasets))]
    for ds, file_name in zip(datasets, names, strict=True):
        ds.save_as(folder / file_name, enforce_file_format=True)
    return datasets, expected


def write_enhanced_mr(
    image: sitk.Image,
    path: Path,
    order: Sequence[int] | None = None,
    slope: float = 2.0,
    intercept: float = -50.0,
    per_frame_rescale: Sequence[tuple[float, float]] | None = None,
    slice_thickness: float | None = None,
) -> np.ndarray:
    """Write `image` as one Enhanced MR Image file; return the values a reader should return.

    `order[j]` is the slice stored as frame j (default: slice order), each frame's
    position in its PlanePositionSequence. Rescale sits in the shared functional
    groups, or per frame when `per_frame_rescale` gives (slope, intercept) per
    stored frame. `slice_thickness` defaults to the slice spacing; set it to
    something else to show the spacing comes from the positions.
    """
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    nz = values.shape[0]
    order = list(range(nz)) if order is None else [int(k) for k in order]
    row, col, normal = _axes(image)
    spacing = image.GetSpacing()
    ds = base_dataset(ENHANCED_MR_IMAGE, "MR", generate_uid(prefix=TEST_ROOT),
                      generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT), 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = nz
    _pixel_module(ds, values.shape[1], values.shape[2])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [_ds_text(spacing[1]), _ds_text(spacing[0])]
    measures.SliceThickness = _ds_text(slice_thickness or spacing[2])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds_text(v) for v in (*row, *col)]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    if per_frame_rescale is None:
        shared.PixelValueTransformationSequence = DicomSequence(
            [_rescale_item(slope, intercept)])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    stored = np.empty((nz, *values.shape[1:]), dtype=np.int16)
    expected = np.empty_like(values)
    for j, k in enumerate(order):
        item = Dataset()
        plane = Dataset()
        position = np.asarray(image.GetOrigin()) + normal * spacing[2] * k
        plane.ImagePositionPatient = [_ds_text(v) for v in position]
        item.PlanePositionSequence = DicomSequence([plane])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        item.FrameContentSequence = DicomSequence([content])
        s, b = (slope, intercept) if per_frame_rescale is None else per_frame_rescale[j]
        if per_frame_rescale is not None:
            item.PixelValueTransformationSequence = DicomSequence([_rescale_item(s, b)])
        frames.append(item)
        stored[j] = _stored(values[k], s, b)
        expected[k] = stored[j] * s + b
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return expected


def _rescale_item(slope: float, intercept: float) -> Dataset:
    item = Dataset()
    item.RescaleSlope = _ds_text(slope)
    item.RescaleIntercept = _ds_text(intercept)
    item.RescaleType = "US"
    return item
