"""The PACS round trip both transports share: find and fetch two series, register them
with a DISA service, store registration.dcm (and optionally the registered series)
back into the PACS.

The service sees only role names (fixed.zip, moving.zip) and job ids; series
are fetched into a private temporary folder under counter names. Two series of
different patients (a mistyped UID) are refused before anything is submitted.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

# The engine's error, one class for both layers; imported here so that
# `disa.pacs.workflow.PatientMismatch` still names it.
from disa.core.errors import PatientMismatch
from disa.core.result_files import REGISTERED_FILE, REGISTRATION_FILE, RESULT_FILE
from disa.pacs.dicomweb import SeriesRef
from disa.pacs.retry import PacsError, RetryPolicy, call_with_retries

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class SeriesSource(Protocol):
    """A PACS seen through one transport (DICOMweb or DIMSE)."""

    def find_series(self, series_uid: str, study_uid: str | None = None) -> SeriesRef: ...

    def fetch(self, ref: SeriesRef, folder: Path) -> list[Path]: ...

    def store(self, files: Sequence[Path]) -> int: ...


class RegistrationService(Protocol):
    """What the workflow needs of a DISA service (disa.service.client.DisaClient has it)."""

    def submit(self, fixed: str | Path, moving: str | Path,
               options: Mapping[str, Any] | None = None) -> dict[str, Any]: ...

    def job(self, job_id: str) -> dict[str, Any]: ...

    def download(self, job_id: str, outdir: str | Path,
                 names: list[str] | None = None) -> list[Path]: ...


class JobFailed(PacsError):
    """The registration job ended without success; `input_error` when the inputs were at fault."""

    def __init__(self, message: str, input_error: bool) -> None:
        super().__init__(message)
        self.input_error = input_error


@dataclass
class PullResult:
    """What one round trip did (no identifiers: counts, the job id and the matrix)."""

    job_id: str
    result: dict[str, Any]
    fixed_instances: int
    moving_instances: int
    stored_instances: int
    files: list[str] = field(default_factory=list)

    @property
    def matrix_fixed_to_moving(self) -> np.ndarray:
        return np.asarray(self.result["matrix_fixed_to_moving"], dtype=np.float64)


def service_transient(exc: BaseException) -> bool:
    """Failures of the DISA service worth retrying: no connection, a timeout, 502-504."""
    if isinstance(exc, httpx.TransportError):
        return True
    return getattr(exc, "status_code", None) in (502, 503, 504)


def submit_transient(exc: BaseException) -> bool:
    """Submitting is not idempotent: retry only when the request surely never arrived."""
    return isinstance(exc, httpx.ConnectError) or getattr(exc, "status_code", None) == 503


def register_series(
    source: SeriesSource,
    service: RegistrationService,
    fixed_uid: str,
    moving_uid: str,
    study_uid: str | None = None,
    options: Mapping[str, Any] | None = None,
    store_registered: bool = False,
    output: Path | None = None,
    retry: RetryPolicy | None = None,
    poll_s: float = 1.0,
    job_timeout_s: float = 3600.0,
    report: Callable[[str], None] = lambda message: None,
) -> PullResult:
    """Fetch, register, store back; return what happened.

    `output` keeps the downloaded result files (registration.dcm, result.json,
    registered.nii.gz when asked) in that folder; otherwise they live in a
    temporary folder removed at the end. Raises SeriesNotFound, PacsUnavailable,
    JobFailed or PacsError; PatientMismatch, before a job is submitted, when
    the fetched series name two different patients (PatientID, and
    IssuerOfPatientID where both state one; an empty ID matches anything).
    """
    retry = retry or RetryPolicy()
    with tempfile.TemporaryDirectory(prefix="disa-pacs-") as tmp:
        work = Path(tmp)
        refs = {role: source.find_series(uid, study_uid)
                for role, uid in (("fixed", fixed_uid), ("moving", moving_uid))}
        counts = {}
        for role, ref in refs.items():
            counts[role] = len(source.fetch(ref, work / role))
            report(f"{role} series: {counts[role]} instance(s) retrieved")
        # A mistyped moving UID can name another patient's series: registering it would
        # file that patient's pixels (registered series) and references under the fixed
        # patient. Checked here, before the job, on the headers just fetched.
        _check_same_patient(work / "fixed", work / "moving")
        job = call_with_retries(
            lambda: service.submit(work / "fixed", work / "moving", dict(options or {})),
            retry, submit_transient, "DISA service (submit)")
        job_id = str(job["id"])
        report(f"job {job_id} {job.get('state', 'queued')}")
        job = _wait(service, job_id, retry, poll_s, job_timeout_s)
        if job["state"] != "succeeded":
            message = str(job.get("error") or job["state"])
            raise JobFailed(f"job {job_id} {job['state']}: {message}",
                            input_error=job["state"] == "failed"
                            and not message.startswith("internal error"))
        files = list(job.get("files") or [])
        if REGISTRATION_FILE not in files:
            raise PacsError(f"job {job_id} wrote no {REGISTRATION_FILE} "
                            "(are both series DICOM images?)")
        wanted = [REGISTRATION_FILE, RESULT_FILE]
        if store_registered:
            wanted.append(REGISTERED_FILE)
        result_dir = output if output is not None else work / "result"
        call_with_retries(lambda: service.download(job_id, result_dir, wanted), retry,
                          service_transient, "DISA service (download)")
        to_store = [result_dir / REGISTRATION_FILE]
        if store_registered:
            to_store += _registered_series(result_dir / REGISTERED_FILE, work)
        stored = source.store(to_store)
        report(f"stored {stored} instance(s) in the PACS")
        result = json.loads((result_dir / "result.json").read_text())
        return PullResult(job_id, result, counts["fixed"], counts["moving"], stored,
                          [p.name for p in to_store])


def _wait(service: RegistrationService, job_id: str, retry: RetryPolicy, poll_s: float,
          timeout_s: float) -> dict[str, Any]:
    """Poll the job until it ends; each poll retries transient service failures."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = call_with_retries(lambda: service.job(job_id), retry, service_transient,
                                "DISA service (job status)")
        if job["state"] in TERMINAL_STATES:
            return job
        if time.monotonic() > deadline:
            raise PacsError(f"job {job_id} still {job['state']} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _check_same_patient(fixed: Path, moving: Path) -> None:
    """Raise PatientMismatch when the two fetched series name different patients."""
    from disa.registration.results.dicom_reg import check_same_patient

    try:
        check_same_patient(_patient_headers(fixed), _patient_headers(moving))
    except PatientMismatch as exc:
        # The same type, with what the operator needs to know here: nothing left the host.
        raise PatientMismatch(f"{exc}; nothing was submitted (check the series UIDs)",
                              exc.reason) from None


def _patient_headers(folder: Path) -> list[Any]:
    """PatientID and IssuerOfPatientID of every fetched file (pydicom datasets).

    force=True: a PACS may hand out datasets without the preamble (the
    service's reader accepts those). A file that does not parse at all is left
    to the service, which refuses it with a proper message.
    """
    from pydicom import dcmread

    headers = []
    for file in sorted(folder.iterdir()):
        try:
            headers.append(dcmread(file, stop_before_pixels=True, force=True,
                                   specific_tags=["PatientID", "IssuerOfPatientID"]))
        except Exception:  # pydicom raises many kinds on bytes that are no dataset
            continue
    return headers


def _registered_series(registered: Path, work: Path) -> list[Path]:
    """The registered moving image as a DICOM series in the fixed frame (for plain viewers)."""
    from disa.core.io.images import read_image
    from disa.registration.results.dicom_reg import write_registered_series

    return write_registered_series(read_image(registered), work / "fixed", work / "registered",
                                   moving_series_dir=work / "moving")
