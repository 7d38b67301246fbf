"""`disa pacs pull` / `disa pacs dimse` and the Orthanc plugin, end to end: series in a
real Orthanc, registered by a running DISA service, the REG object stored back in
Orthanc, read back, and its matrix checked against the job's transform and the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from disa.cli import main
from disa.registration.results import dicom_reg as dr

from ..support import wait_until
from .conftest import (
    DICOMWEB_PLUGIN,
    ORTHANC_AET,
    PLUGIN_SCRIPT,
    PYTHON_PLUGIN,
    TEST_AET,
    DisaService,
    OrthancServer,
    PhantomStudy,
    _need_orthanc,
    free_port,
    load_dicom_fixtures,
    orthanc_config,
    truth_error_mm,
)

JOB_OPTIONS = ["--similarity", "mind", "--starts", "50"]
FAST = ["--retries", "2", "--retry-delay", "0.05", "--poll", "0.2", "--timeout", "20"]


def _stored_registration(orthanc: OrthancServer, tmp_path: Path) -> Path:
    (reg,) = orthanc.series_by_modality("REG")
    (instance,) = reg["Instances"]
    path = tmp_path / "from-orthanc.dcm"
    path.write_bytes(httpx.get(f"{orthanc.url}/instances/{instance}/file", timeout=30).content)
    return path


def _check_registration(path: Path, result: dict, study: PhantomStudy) -> None:
    """The REG in the PACS is the job's transform, inverted, and matches the truth."""
    matrix = dr.read_registration_matrix(path)
    a = np.asarray(result["matrix_fixed_to_moving"])
    np.testing.assert_allclose(matrix, np.linalg.inv(a), atol=1e-8)
    assert truth_error_mm(matrix, study.truth) < 1.5
    ds = pydicom.dcmread(path)
    fixed = pydicom.dcmread(sorted(study.fixed_dir.iterdir())[0], stop_before_pixels=True)
    moving = pydicom.dcmread(sorted(study.moving_dir.iterdir())[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == study.study_uid
    assert ds.FrameOfReferenceUID == fixed.FrameOfReferenceUID
    assert ds.RegistrationSequence[1].FrameOfReferenceUID == moving.FrameOfReferenceUID


def test_pull_over_dicomweb(empty_orthanc: OrthancServer, disa_service: DisaService,
                            phantom_study: PhantomStudy, tmp_path: Path, capsys) -> None:
    orthanc, study = empty_orthanc, phantom_study
    orthanc.upload(study.files())
    out = tmp_path / "result"
    code = main(["pacs", "pull", "--dicomweb", orthanc.dicomweb, "--fixed", study.fixed_uid,
                 "--moving", study.moving_uid, "--service", disa_service.url,
                 "--store-registered", "-o", str(out), *FAST, *JOB_OPTIONS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "stored registration.dcm" in captured.out and "verdict: " in captured.out
    result = json.loads((out / "result.json").read_text())
    _check_registration(_stored_registration(orthanc, tmp_path), result, study)
    # The registered moving image came back as a CT series in the fixed frame.
    fixed_for = pydicom.dcmread(sorted(study.fixed_dir.iterdir())[0]).FrameOfReferenceUID
    made = [s for s in orthanc.series_by_modality("CT")
            if s["MainDicomTags"].get("Manufacturer") == "DISA"]
    assert len(made) == 1 and len(made[0]["Instances"]) == 32
    tags = orthanc.get(f"/instances/{made[0]['Instances'][0]}/simplified-tags")
    assert tags["FrameOfReferenceUID"] == fixed_for
    # No patient identifiers in what we printed or in the service's log.
    dx = load_dicom_fixtures()
    for text in (captured.out, captured.err, disa_service.log.read_text()):
        assert dx.PATIENT_ID not in text and "PHANTOM" not in text


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_dimse_round_trip(empty_orthanc: OrthancServer, disa_service: DisaService,
                          phantom_study: PhantomStudy, tmp_path: Path, capsys,
                          retrieve: str) -> None:
    orthanc, study = empty_orthanc, phantom_study
    orthanc.upload(study.files())
    out = tmp_path / "result"
    code = main(["pacs", "dimse", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
                 "--called-aet", ORTHANC_AET, "--calling-aet", TEST_AET,
                 "--retrieve", retrieve, "--listen-port", str(orthanc.scp_port),
                 "--fixed", study.fixed_uid, "--moving", study.moving_uid,
                 "--study", study.study_uid, "--service", disa_service.url, "-o", str(out),
                 *FAST, *JOB_OPTIONS])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    _check_registration(_stored_registration(orthanc, tmp_path), result, study)


# ---------------------------------------------------------------- failures


def _pacs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "disa", "pacs", *args], capture_output=True,
                          text=True, timeout=120)


def test_unreachable_pacs_exits_1_with_one_line() -> None:
    run = _pacs("pull", "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web",
                "--fixed", "1.2.3", "--moving", "1.2.4", "--service", "http://127.0.0.1:9",
                "--retries", "2", "--retry-delay", "0.05")
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    # Two retry notes, then the failure on one line.
    assert [line.startswith("disa: QIDO-RS series query: attempt") for line in lines] == [
        True, True, False]
    assert lines[-1] == ("disa: error: QIDO-RS series query: no answer after 3 attempt(s) "
                         "(ConnectError)")
    quiet = _pacs("pull", "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web",
                  "--fixed", "1.2.3", "--moving", "1.2.4", "--service", "http://127.0.0.1:9",
                  "--retries", "1", "--retry-delay", "0.05", "--quiet")
    assert quiet.returncode == 1 and quiet.stderr.count("\n") == 1


def test_bad_arguments_exit_2() -> None:
    run = _pacs("pull", "--dicomweb", "http://x/dicom-web", "--fixed", "1.2.x",
                "--moving", "1.2.4", "--service", "http://127.0.0.1:9")
    assert run.returncode == 2 and "not a DICOM UID" in run.stderr
    run = _pacs("dimse", "--host", "h", "--port", "70000", "--called-aet", "A",
                "--fixed", "1.2", "--moving", "1.3", "--service", "http://s")
    assert run.returncode == 2 and "port out of range" in run.stderr


def test_the_service_key_comes_from_a_file_or_warns_on_the_command_line(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """As disa submit: --api-key-file (or DISA_API_KEY_FILE), and an unreadable one exits 2
    before the PACS or the service is asked anything; --api-key works but warns."""
    monkeypatch.delenv("DISA_API_KEY", raising=False)
    monkeypatch.delenv("DISA_API_KEY_FILE", raising=False)
    pull = ["pacs", "pull", "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web",
            "--fixed", "1.2.3", "--moving", "1.2.4", "--service", "http://127.0.0.1:9",
            "--retries", "0", "--quiet"]
    assert main([*pull, "--api-key-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("disa: error: API key file ") and "QIDO-RS" not in err
    monkeypatch.setenv("DISA_API_KEY_FILE", str(tmp_path / "missing"))
    assert main(pull) == 2 and "API key file" in capsys.readouterr().err
    monkeypatch.delenv("DISA_API_KEY_FILE")
    assert main([*pull, "--api-key", "secret-key"]) == 1  # the PACS is unreachable
    err = capsys.readouterr().err
    assert "--api-key shows the key to other users" in err and "secret-key" not in err


def test_unknown_series_exits_2(empty_orthanc: OrthancServer) -> None:
    run = _pacs("pull", "--dicomweb", empty_orthanc.dicomweb, "--fixed", "1.2.3",
                "--moving", "1.2.4", "--service", "http://127.0.0.1:9", "--retries", "0")
    assert run.returncode == 2
    assert "no series with that SeriesInstanceUID" in run.stderr


def test_series_of_two_patients_exit_2_before_any_job(empty_orthanc: OrthancServer,
                                                      phantom_study: PhantomStudy,
                                                      tmp_path: Path, capsys) -> None:
    """A moving UID of another patient's series (a typo): refused with one line naming both
    patient IDs, before the service is asked (here none listens, which would be exit 1),
    and nothing is stored in the PACS."""
    orthanc, study = empty_orthanc, phantom_study
    dx = load_dicom_fixtures()
    image = sitk.Image(16, 16, 8, sitk.sitkFloat32)
    image.SetSpacing((2.0, 2.0, 4.0))
    other, _ = dx.write_series(image, tmp_path / "other", modality="CT",
                               patient=("OTHER^PERSON", "OTHER-PATIENT-0002"))
    orthanc.upload(sorted(study.fixed_dir.iterdir()) + sorted((tmp_path / "other").iterdir()))
    for command in (["pull", "--dicomweb", orthanc.dicomweb],
                    ["dimse", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
                     "--called-aet", ORTHANC_AET, "--calling-aet", TEST_AET]):
        code = main(["pacs", *command, "--fixed", study.fixed_uid,
                     "--moving", str(other[0].SeriesInstanceUID),
                     "--service", f"http://127.0.0.1:{free_port()}", "--store-registered",
                     "--quiet", *FAST])
        err = capsys.readouterr().err
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith("disa: error: fixed and moving series belong to different "
                               "patients")
        assert f"'{dx.PATIENT_ID}' (fixed)" in line and "'OTHER-PATIENT-0002' (moving)" in line
        assert "nothing was submitted" in line
    assert orthanc.series_by_modality("REG") == []
    assert len(orthanc.get("/series")) == 2  # nothing stored back


# ------------------------------------------------------------------ plugin


def test_orthanc_plugin_registers_a_pair_as_it_arrives(
        tmp_path_factory: pytest.TempPathFactory, disa_service: DisaService,
        phantom_study: PhantomStudy, tmp_path: Path) -> None:
    from .conftest import OrthancServer as Server

    _need_orthanc(DICOMWEB_PLUGIN, PYTHON_PLUGIN)
    folder = tmp_path_factory.mktemp("orthanc-plugin")
    ports = free_port(), free_port(), free_port()
    server = Server(folder, *ports)
    server.config = orthanc_config(folder, *ports, plugins=[DICOMWEB_PLUGIN, PYTHON_PLUGIN], extra={
        "PythonScript": str(PLUGIN_SCRIPT),
        "Disa": {"ServiceUrl": disa_service.url, "Rules": [{"Fixed": "MR", "Moving": "CT"}],
                 "Options": {"similarity": "mind", "starts": 50}, "PollSeconds": 0.3},
    })
    server.start()
    try:
        server.upload(phantom_study.files())
        wait_until(lambda: server.series_by_modality("REG"), 120, "the plugin's REG object",
                 interval=0.5)
        path = _stored_registration(server, tmp_path)
        jobs = httpx.get(f"{disa_service.url}/v1/jobs", params={"limit": 50}).json()
        matrices = []
        for job in jobs["items"]:
            if job["state"] == "succeeded":
                matrices.append(np.asarray(httpx.get(
                    f"{disa_service.url}/v1/jobs/{job['id']}/files/result.json"
                ).json()["matrix_fixed_to_moving"]))
        matrix = dr.read_registration_matrix(path)
        assert any(np.allclose(matrix, np.linalg.inv(a), atol=1e-8) for a in matrices)
        assert truth_error_mm(matrix, phantom_study.truth) < 1.5
        log = server.log.read_text()
        assert "DISA plugin: watching stable series (rules MR->CT)" in log
        assert "registration stored" in log
        assert "PHANTOM" not in log
    finally:
        server.stop()
