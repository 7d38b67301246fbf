"""The PACS workflow and the Orthanc plugin's logic with stand-ins (no Orthanc, no service)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from disa.pacs import orthanc_plugin as plugin
from disa.pacs.dicomweb import SeriesRef
from disa.pacs.retry import PacsUnavailable, RetryPolicy
from disa.pacs.workflow import JobFailed, PatientMismatch, register_series

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.0, max_delay_s=0.0)


class FakeSource:
    def __init__(self) -> None:
        self.stored: list[str] = []

    def find_series(self, series_uid: str, study_uid: str | None = None) -> SeriesRef:
        return SeriesRef("1.2.3", series_uid, "CT", 2)

    def fetch(self, ref: SeriesRef, folder: Path) -> list[Path]:
        folder.mkdir(parents=True)
        files = [folder / f"{i:06d}.dcm" for i in (1, 2)]
        for f in files:
            f.write_bytes(b"x")
        return files

    def store(self, files: Sequence[Path]) -> int:
        self.stored += [f.name for f in files]
        return len(files)


class DicomSource(FakeSource):
    """Fetches real (pixel-less) DICOM files whose PatientID depends on the series UID."""

    def __init__(self, patients: dict[str, tuple[str, str]]) -> None:
        super().__init__()
        self.patients = patients  # series UID -> (PatientID, IssuerOfPatientID or "")

    def fetch(self, ref: SeriesRef, folder: Path) -> list[Path]:
        folder.mkdir(parents=True)
        patient_id, issuer = self.patients[ref.series_uid]
        files = []
        for i in (1, 2):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PatientID = patient_id
            if issuer:
                ds.IssuerOfPatientID = issuer
            ds.SeriesInstanceUID = ref.series_uid
            files.append(folder / f"{i:06d}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        return files


class FakeService:
    def __init__(self, states: list[dict[str, Any]], submit_errors: int = 0) -> None:
        self.states, self.submit_errors = states, submit_errors
        self.submitted: list[tuple[str, str]] = []

    def submit(self, fixed: Any, moving: Any, options: Any = None) -> dict[str, Any]:
        if self.submit_errors:
            self.submit_errors -= 1
            raise httpx.ConnectError("refused")
        self.submitted.append((Path(fixed).name, Path(moving).name))
        return {"id": "job-1", "state": "queued"}

    def job(self, job_id: str) -> dict[str, Any]:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def download(self, job_id: str, outdir: Any, names: list[str] | None = None) -> list[Path]:
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for name in names or []:
            data = json.dumps({"matrix_fixed_to_moving": [[1, 0, 0, 0], [0, 1, 0, 0],
                                                          [0, 0, 1, 0], [0, 0, 0, 1]]})
            (outdir / name).write_text(data if name == "result.json" else "dicom")
        return [outdir / n for n in names or []]


def test_round_trip_submits_role_folders_and_stores_the_registration() -> None:
    source = FakeSource()
    service = FakeService([{"state": "running"},
                           {"state": "succeeded", "files": ["registration.dcm", "result.json"]}],
                          submit_errors=2)
    done = register_series(source, service, "1.2.3.1", "1.2.3.2", retry=FAST_RETRY, poll_s=0.0)
    assert service.submitted == [("fixed", "moving")]  # role names only, after 2 retries
    assert source.stored == ["registration.dcm"]
    assert (done.job_id, done.fixed_instances, done.stored_instances) == ("job-1", 2, 1)


def test_failed_job_is_reported_as_input_or_internal() -> None:
    service = FakeService([{"state": "failed", "error": "fixed.zip: not a DICOM series"}])
    with pytest.raises(JobFailed, match="not a DICOM series") as caught:
        register_series(FakeSource(), service, "1.2", "1.3", retry=FAST_RETRY, poll_s=0.0)
    assert caught.value.input_error
    service = FakeService([{"state": "failed", "error": "internal error: boom"}])
    with pytest.raises(JobFailed) as caught:
        register_series(FakeSource(), service, "1.2", "1.3", retry=FAST_RETRY, poll_s=0.0)
    assert not caught.value.input_error


def test_unreachable_service_gives_up_after_the_retries() -> None:
    service = FakeService([], submit_errors=10)
    with pytest.raises(PacsUnavailable, match=r"DISA service \(submit\): no answer after 3"):
        register_series(FakeSource(), service, "1.2", "1.3", retry=FAST_RETRY, poll_s=0.0)


def test_series_of_two_patients_are_refused_before_submitting() -> None:
    source = DicomSource({"1.2.1": ("PAT-A", ""), "1.2.2": ("PAT-B", "")})
    service = FakeService([{"state": "succeeded", "files": ["registration.dcm", "result.json"]}])
    with pytest.raises(PatientMismatch, match=r"PatientID 'PAT-A' \(fixed\) and 'PAT-B' "
                                              r"\(moving\); nothing was submitted"):
        register_series(source, service, "1.2.1", "1.2.2", retry=FAST_RETRY, poll_s=0.0)
    assert service.submitted == [] and source.stored == []
    # Same ID, two issuers: two patients as well.
    source = DicomSource({"1.2.1": ("PAT-A", "SITE-1"), "1.2.2": ("PAT-A", "SITE-2")})
    with pytest.raises(PatientMismatch, match="issuer 'SITE-1'"):
        register_series(source, service, "1.2.1", "1.2.2", retry=FAST_RETRY, poll_s=0.0)
    assert service.submitted == []


def test_patient_mismatch_is_one_class_for_the_engine_and_the_pacs_commands() -> None:
    """Issue 21: one PatientMismatch, an InputError, under each of its import paths; the
    refusal keeps the engine's identifier-free reason."""
    from disa.core.errors import InputError
    from disa.core.errors import PatientMismatch as engine_mismatch
    from disa.registration.results import dicom_reg

    assert PatientMismatch is engine_mismatch is dicom_reg.PatientMismatch
    assert issubclass(PatientMismatch, InputError)
    source = DicomSource({"1.2.1": ("PAT-A", ""), "1.2.2": ("PAT-B", "")})
    service = FakeService([])
    with pytest.raises(PatientMismatch) as caught:
        register_series(source, service, "1.2.1", "1.2.2", retry=FAST_RETRY, poll_s=0.0)
    assert "PAT-" not in caught.value.reason and "different patients" in caught.value.reason


@pytest.mark.parametrize("moving", [("PAT-A", ""), ("", ""), ("PAT-A", "SITE-2")])
def test_one_patient_or_anonymised_series_go_through(moving: tuple[str, str]) -> None:
    """Same ID, an empty ID (anonymised), or one side without an issuer: no mismatch."""
    source = DicomSource({"1.2.1": ("PAT-A", "") if moving[1] else ("PAT-A", "SITE-1"),
                          "1.2.2": moving})
    service = FakeService([{"state": "succeeded", "files": ["registration.dcm", "result.json"]}])
    register_series(source, service, "1.2.1", "1.2.2", retry=FAST_RETRY, poll_s=0.0)
    assert service.submitted == [("fixed", "moving")]


# ------------------------------------------------------------------ plugin


def _series(id_: str, modality: str, stable: bool = True, disa: bool = False
            ) -> plugin.SeriesFacts:
    return plugin.SeriesFacts(id_, modality, stable, disa)


def test_plugin_pairs_series_by_rule() -> None:
    rules = [plugin.Rule("CT", "MR")]
    ct, mr = _series("ct", "CT"), _series("mr", "MR")
    assert plugin.pairs_for(ct, [mr], rules) == [("ct", "mr")]
    assert plugin.pairs_for(mr, [ct], rules) == [("ct", "mr")]  # fixed stays fixed
    assert plugin.pairs_for(mr, [_series("ct", "CT", stable=False)], rules) == []
    assert plugin.pairs_for(mr, [_series("reg", "REG"), _series("pt", "PT")], rules) == []
    # Series DISA made (registered series, REG) never start or join a pair.
    assert plugin.pairs_for(mr, [_series("ct2", "CT", disa=True)], rules) == []
    assert plugin.pairs_for(_series("mr2", "MR", disa=True), [ct], rules) == []
    assert plugin.pairs_for(ct, [mr, _series("mr3", "MR")], rules) == [("ct", "mr"),
                                                                        ("ct", "mr3")]


def test_plugin_settings_from_the_orthanc_configuration() -> None:
    settings = plugin.Settings.from_configuration({"Disa": {
        "ServiceUrl": "http://disa:8000/", "Rules": [{"Fixed": "mr", "Moving": "ct"}],
        "Options": {"mode": "affine"}, "PollSeconds": 5}})
    assert settings.service_url == "http://disa:8000"
    assert settings.rules == [plugin.Rule("MR", "CT")]
    assert (settings.options, settings.poll_s) == ({"mode": "affine"}, 5.0)
    with pytest.raises(ValueError, match="ServiceUrl"):
        plugin.Settings.from_configuration({})
