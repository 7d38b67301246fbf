"""The result folder's names have one home, disa.core.result_files (issue 21): the engine's
writers, the job core and the PACS commands take them from there."""

from __future__ import annotations

from disa.core import result_files
from disa.jobs import store
from disa.pacs import workflow
from disa.registration.results import dicom_reg, labels, outputs
from disa.registration.transform import initial as initial_transform


def test_the_engine_and_the_job_core_share_one_list() -> None:
    assert outputs.RESULT_NAMES is result_files.RESULT_NAMES
    assert store.RESULT_FILES is result_files.SERVED_FILES
    assert set(store.RESULT_FILES) == result_files.RESULT_NAMES - {"warped_labels.nii.gz"}


def test_the_api_serves_the_same_files_in_the_same_order_as_before() -> None:
    """The REST API lists these in its 404 message and OpenAPI schema: a contract."""
    assert list(store.RESULT_FILES.items()) == [
        ("transform.tfm", "text/plain; charset=utf-8"),
        ("registered.nii.gz", "application/gzip"),
        ("displacement.nii.gz", "application/gzip"),
        ("inverse_displacement.nii.gz", "application/gzip"),
        ("transform.h5", "application/x-hdf5"),
        ("qa.png", "image/png"),
        ("result.json", "application/json"),
        ("registration.dcm", "application/dicom"),
    ]
    assert store.RESULT_JSON == "result.json"


def test_names_still_spelled_elsewhere_agree() -> None:
    """Engine modules that keep a literal of their own (not yet moved) name the same files."""
    assert labels.WARPED_LABELS_FILE == result_files.WARPED_LABELS_FILE
    assert initial_transform.RESULT_TRANSFORM_FILE == result_files.TRANSFORM_FILE
    assert dicom_reg.REGISTRATION_FILE == workflow.REGISTRATION_FILE == "registration.dcm"
