"""DICOMweb and DIMSE round trips against a real Orthanc, with DISA's PACS clients."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from disa.core.io.images import read_dicom_headers, read_image
from disa.pacs.dicomweb import DicomWebClient, SeriesRef, split_multipart
from disa.pacs.dimse import DimseClient, Peer
from disa.pacs.retry import PacsError, PacsUnavailable, RetryPolicy, SeriesNotFound
from disa.registration.results import dicom_reg as dr

from .conftest import ORTHANC_AET, TEST_AET, OrthancServer, PhantomStudy, free_port

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)


def _same_image(folder: Path, original: Path) -> None:
    got, want = read_image(folder), read_image(original)
    assert got.GetSize() == want.GetSize()
    np.testing.assert_allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))


def test_upload_query_retrieve_store_with_dicomweb(empty_orthanc: OrthancServer,
                                                   phantom_study: PhantomStudy,
                                                   tmp_path: Path) -> None:
    orthanc, study = empty_orthanc, phantom_study
    orthanc.upload(sorted(study.fixed_dir.iterdir()))  # Orthanc's REST API
    with DicomWebClient(orthanc.dicomweb, retry=FAST_RETRY) as client:
        moving_files = sorted(study.moving_dir.iterdir())
        assert client.store(moving_files) == len(moving_files)  # STOW-RS
        # QIDO-RS, with and without the study.
        fixed_ref = client.find_series(study.fixed_uid)
        assert fixed_ref == SeriesRef(study.study_uid, study.fixed_uid, "MR", len(moving_files))
        moving_ref = client.find_series(study.moving_uid, study.study_uid)
        assert moving_ref.modality == "CT"
        with pytest.raises(SeriesNotFound):
            client.find_series("1.2.3.4.5.6")
        # WADO-RS: the series come back whole, pixels and geometry intact.
        got = client.retrieve_series(fixed_ref, tmp_path / "fixed")
        assert [p.name for p in got][:2] == ["000001.dcm", "000002.dcm"]
        _same_image(tmp_path / "fixed", study.fixed_dir)
        client.retrieve_series(moving_ref, tmp_path / "moving")
        _same_image(tmp_path / "moving", study.moving_dir)
        # A Spatial Registration object goes in with STOW-RS and comes back unchanged.
        a = np.eye(4)
        a[:3, 3] = (4.0, -2.0, 1.5)
        reg = dr.build_spatial_registration(a, read_dicom_headers(study.fixed_dir),
                                            read_dicom_headers(study.moving_dir))
        dr.write_dataset(reg, tmp_path / "reg.dcm")
        assert client.store([tmp_path / "reg.dcm"]) == 1
        reg_ref = client.find_series(str(reg.SeriesInstanceUID))
        assert reg_ref.study_uid == study.study_uid and reg_ref.modality == "REG"
        (back,) = client.retrieve_series(reg_ref, tmp_path / "reg")
    np.testing.assert_allclose(dr.read_registration_matrix(back), np.linalg.inv(a), atol=1e-9)
    assert pydicom.dcmread(back).SOPInstanceUID == reg.SOPInstanceUID


def test_find_get_move_store_with_dimse(empty_orthanc: OrthancServer,
                                        phantom_study: PhantomStudy, tmp_path: Path) -> None:
    orthanc, study = empty_orthanc, phantom_study
    orthanc.upload(study.files())
    peer = Peer("127.0.0.1", orthanc.dicom_port, ORTHANC_AET, TEST_AET, timeout_s=10)
    client = DimseClient(peer, retry=FAST_RETRY, listen=("127.0.0.1", orthanc.scp_port))
    client.echo()
    fixed_ref = client.find_series(study.fixed_uid)
    assert (fixed_ref.study_uid, fixed_ref.modality) == (study.study_uid, "MR")
    with pytest.raises(SeriesNotFound):
        client.find_series("1.2.3.4.5.6")
    client.get_series(fixed_ref, tmp_path / "fixed")  # C-GET
    _same_image(tmp_path / "fixed", study.fixed_dir)
    moving_ref = client.find_series(study.moving_uid, study.study_uid)
    client.move_series(moving_ref, tmp_path / "moving", "127.0.0.1", orthanc.scp_port)
    _same_image(tmp_path / "moving", study.moving_dir)
    reg = dr.build_spatial_registration(np.eye(4), read_dicom_headers(study.fixed_dir),
                                        read_dicom_headers(study.moving_dir))
    dr.write_dataset(reg, tmp_path / "reg.dcm")
    assert client.store([tmp_path / "reg.dcm"]) == 1  # C-STORE
    (stored,) = orthanc.series_by_modality("REG")
    assert stored["MainDicomTags"]["SeriesInstanceUID"] == reg.SeriesInstanceUID


def test_fetch_refuses_a_folder_with_files_of_its_own(empty_orthanc: OrthancServer,
                                                     phantom_study: PhantomStudy,
                                                     tmp_path: Path) -> None:
    """WADO-RS, C-GET and C-MOVE into a folder that holds anything: refused, nothing touched.
    An empty existing folder is fine."""
    orthanc, study = empty_orthanc, phantom_study
    orthanc.upload(sorted(study.fixed_dir.iterdir()))
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub" / "000001.dcm").write_bytes(b"x")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    peer = Peer("127.0.0.1", orthanc.dicom_port, ORTHANC_AET, TEST_AET, timeout_s=10)
    dimse = DimseClient(peer, retry=FAST_RETRY, listen=("127.0.0.1", orthanc.scp_port))
    with DicomWebClient(orthanc.dicomweb, retry=FAST_RETRY) as web:
        ref = web.find_series(study.fixed_uid)
        fetches = [web.retrieve_series, dimse.get_series,
                   lambda r, f: dimse.move_series(r, f, "127.0.0.1", orthanc.scp_port)]
        for fetch in fetches:
            with pytest.raises(FileExistsError, match="must be new or empty"):
                fetch(ref, folder)
            assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
            assert (folder / "notes.txt").read_text() == "precious"
        for k, fetch in enumerate(fetches):
            (tmp_path / f"empty{k}").mkdir()
            assert len(fetch(ref, tmp_path / f"empty{k}")) == 32


class _CutStream(httpx.SyncByteStream):
    """A response body that breaks off (connection reset) after `cut` bytes."""

    def __init__(self, body: bytes, cut: int) -> None:
        self.body, self.cut = body, cut

    def __iter__(self):
        yield self.body[: self.cut]
        raise httpx.ReadError("connection reset by peer")


def test_wado_retry_removes_only_its_own_files(tmp_path: Path) -> None:
    """A transfer cut off mid-series is retried: the files of the broken attempt go, a file
    someone else put into the folder meanwhile stays; when every attempt breaks, the
    call leaves no files of its own behind."""
    parts = [bytes([k]) * 300 for k in (1, 2, 3)]
    body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--B--\r\n"
    headers = {"content-type": 'multipart/related; type="application/dicom"; boundary=B'}
    folder = tmp_path / "fetched"
    attempts = []

    def answer(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) == 1:
            (folder / "other-process.txt").write_text("not ours")  # during the first attempt
            return httpx.Response(200, headers=headers, stream=_CutStream(body, 700))
        return httpx.Response(200, headers=headers, content=body)

    ref = SeriesRef("1.2.3", "1.2.3.4")
    with DicomWebClient("http://pacs.invalid/dicom-web", retry=FAST_RETRY,
                        transport=httpx.MockTransport(answer)) as client:
        files = client.retrieve_series(ref, folder)
    assert len(attempts) == 2
    assert [f.read_bytes() for f in files] == parts
    assert sorted(p.name for p in folder.iterdir()) == [
        "000001.dcm", "000002.dcm", "000003.dcm", "other-process.txt"]

    def always_cut(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, stream=_CutStream(body, 700))

    with DicomWebClient("http://pacs.invalid/dicom-web", retry=FAST_RETRY,
                        transport=httpx.MockTransport(always_cut)) as client, \
            pytest.raises(PacsUnavailable, match="no answer after 3 attempt"):
        client.retrieve_series(ref, tmp_path / "broken")
    assert list((tmp_path / "broken").iterdir()) == []


# -------------------------------------------------------------- robustness


def test_unreachable_pacs_is_retried_then_reported() -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("refused", request=request)

    with DicomWebClient("http://pacs.invalid/dicom-web", retry=FAST_RETRY,
                        transport=httpx.MockTransport(refuse)) as client, \
            pytest.raises(PacsUnavailable, match="no answer after 3 attempt"):
        client.find_series("1.2.3")
    assert len(calls) == 3


def test_slow_pacs_is_retried_until_it_answers() -> None:
    answers = iter([httpx.ReadTimeout("slow"), httpx.Response(503), httpx.Response(
        200, json=[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                    "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}}])])

    def flaky(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with DicomWebClient("http://pacs.invalid/dicom-web", retry=FAST_RETRY,
                        transport=httpx.MockTransport(flaky)) as client:
        assert client.find_series("1.2.3.4").study_uid == "1.2.3"


def test_dimse_peer_down_is_retried_then_reported() -> None:
    peer = Peer("127.0.0.1", free_port(), "NOBODY", TEST_AET, timeout_s=2)
    with pytest.raises(PacsUnavailable, match="C-FIND: no answer after 3 attempt"):
        DimseClient(peer, retry=FAST_RETRY).find_series("1.2.3")


def test_retry_delays_grow_and_are_bounded() -> None:
    import random

    delays = list(RetryPolicy(attempts=8, base_delay_s=1.0, max_delay_s=10.0)
                  .delays(random.Random(0)))
    assert len(delays) == 7
    assert all(0.5 * min(10.0, 2.0**k) <= d <= min(10.0, 2.0**k) for k, d in enumerate(delays))


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_multipart_stream_is_split_into_files(tmp_path: Path, chunk: int) -> None:
    parts = [b"\x00DICM" * 50, b"--not-a-boundary\r\n" * 3, b""]
    body = b"preamble\r\n" + b"".join(
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    ) + b"--XyZ--\r\nepilogue"
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    files = split_multipart(chunks, b"XyZ", tmp_path, 10, 10_000)
    assert [f.read_bytes() for f in files] == parts
    with pytest.raises(PacsError, match="ended early"):
        split_multipart([body[: len(body) // 2]], b"XyZ", tmp_path / "x", 10, 10_000)
    with pytest.raises(PacsError, match="more than 2 instances"):
        split_multipart(chunks, b"XyZ", tmp_path / "y", 2, 10_000)
