"""/v1/jobs against the app with a recording dispatcher (no broker, no worker)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from disa.jobs.store import JobStore

from ..support import file_size_limit
from .helpers import API_KEY, TINY_OPTIONS, api_key_env


def _files(pair: tuple[Path, Path], fixed_name: str = "a.nii.gz",
           moving_name: str = "b.nii.gz") -> dict:
    return {"fixed": (fixed_name, pair[0].read_bytes()),
            "moving": (moving_name, pair[1].read_bytes())}


def _submit(client: TestClient, pair, options=TINY_OPTIONS, **kw):
    return client.post("/v1/jobs", files=_files(pair, **kw),
                       data={"options": json.dumps(options)})


def _store(client: TestClient) -> JobStore:
    return client.app.state.runtime.store


def test_submit_queues_a_job_under_server_names(client, pair_files, dispatcher):
    r = _submit(client, pair_files, fixed_name="../../Doe^John.NII.GZ")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and len(job["id"]) == 32
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert dispatcher.sent == [job["id"]]
    assert job["options"]["starts"] == 10 and job["options"]["similarity"] == "mind"
    assert job["inputs"]["fixed"]["size"] == [24, 24, 24]
    folder = _store(client).job_dir(job["id"])
    assert sorted(p.name for p in (folder / "inputs").iterdir()) == ["fixed.nii.gz",
                                                                      "moving.nii.gz"]
    # nothing of the client's file name survives anywhere in the job folder
    assert "Doe" not in (folder / "manifest.json").read_text()
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"


def test_masks_and_every_single_file_format(client, pair_files, tmp_path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(pair_files[0]))
    paths = {}
    for ext in (".nii", ".nrrd", ".mha"):
        paths[ext] = tmp_path / f"x{ext}"
        sitk.WriteImage(image, str(paths[ext]))
    r = client.post("/v1/jobs", files={
        "fixed": ("f.nrrd", paths[".nrrd"].read_bytes()),
        "moving": ("m.mha", paths[".mha"].read_bytes()),
        "fixed_mask": ("fm.nii", paths[".nii"].read_bytes()),
        "moving_mask": ("mm.nii.gz", pair_files[1].read_bytes())})
    assert r.status_code == 202, r.text
    inputs = _store(client).read(r.json()["id"]).inputs
    assert inputs == {"fixed": "inputs/fixed.nrrd", "moving": "inputs/moving.mha",
                      "fixed_mask": "inputs/fixed_mask.nii",
                      "moving_mask": "inputs/moving_mask.nii.gz"}


def test_unknown_and_malformed_ids(client):
    assert client.get(f"/v1/jobs/{'0' * 32}").status_code == 404
    assert client.get(f"/v1/jobs/{'0' * 32}").json() == {"detail": "no such job"}
    for bad in ("..", "ABCDEF" * 6, "0" * 31, "%2e%2e%2fetc"):
        r = client.get(f"/v1/jobs/{bad}")
        assert r.status_code in (404, 422) and isinstance(r.json()["detail"], str)


def test_files_409_until_succeeded_then_404_for_unknown_names(client, pair_files):
    job_id = _submit(client, pair_files).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/files/transform.tfm")
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/files/manifest.json").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/files/..%2Fmanifest.json").status_code == 404
    # finish it by hand, as a worker would
    store = _store(client)
    out = store.outputs_dir(job_id)
    (out / "transform.tfm").write_text("#Insight Transform File V1.0\n")
    (out / "qa.png").write_bytes(b"\x89PNG")
    m = store.read(job_id)
    m.state, m.files = "succeeded", ["transform.tfm", "qa.png"]
    store.write(m)
    r = client.get(f"/v1/jobs/{job_id}/files/transform.tfm")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert client.get(f"/v1/jobs/{job_id}/files/qa.png").headers["content-type"] == "image/png"
    assert client.get(f"/v1/jobs/{job_id}/files/registered.nii.gz").status_code == 404


def test_cancel_ends_a_queued_job_and_delete_removes_only_finished_ones(client, pair_files):
    job_id = _submit(client, pair_files).json()["id"]
    r = client.delete(f"/v1/jobs/{job_id}")  # a queued job is not deleted, nor cancelled
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (f"job is queued: cancel it first (POST /v1/jobs/{job_id}"
                                  "/cancel); DELETE removes finished jobs only")
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert r.json()["cancel_requested"] is True
    r = client.post(f"/v1/jobs/{job_id}/cancel")  # a retried cancel changes nothing
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert _store(client).job_dir(job_id).exists()
    r = client.delete(f"/v1/jobs/{job_id}")  # now finished: delete its files
    assert r.status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not _store(client).job_dir(job_id).exists()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404


def test_cancel_of_a_running_job_leaves_the_flag_for_its_worker(client, pair_files):
    job_id = _submit(client, pair_files).json()["id"]
    store = _store(client)
    with store.lock(job_id) as lock:  # a worker holds the job
        assert lock.acquire()
        m = store.read(job_id)
        m.state = "running"
        store.write(m)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 409
        assert not store.cancel_requested(job_id)
        r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True
    assert store.cancel_requested(job_id)


@pytest.mark.parametrize("state", ["succeeded", "failed"])
def test_cancel_of_a_finished_job_is_409_and_keeps_it(client, pair_files, state):
    job_id = _submit(client, pair_files).json()["id"]
    store = _store(client)
    m = store.read(job_id)
    m.state = state
    store.write(m)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409 and r.json()["detail"].startswith(f"job is {state}")
    assert store.read(job_id).state == state and not store.cancel_requested(job_id)


def test_list_is_paged_newest_first_and_filters_by_state(client, pair_files):
    ids = [_submit(client, pair_files).json()["id"] for _ in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in page["items"]] == [ids[0]]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    page = client.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in page["items"]] == [ids[1]]
    assert client.get("/v1/jobs", params={"limit": 1000}).status_code == 422


@pytest.mark.parametrize(("options", "words"), [
    ({"starts": 0}, "starts"),
    ({"mode": "bspline"}, "mode"),
    ({"unknown": 1}, "unknown"),
])
def test_invalid_options_are_422_with_the_field_named(client, pair_files, options, words,
                                                      dispatcher):
    r = _submit(client, pair_files, options=options)
    assert r.status_code == 422 and words in r.json()["detail"]
    assert dispatcher.sent == []


def test_malformed_requests(client, pair_files):
    fixed = pair_files[0].read_bytes()
    r = client.post("/v1/jobs", files={"fixed": ("f.nii.gz", fixed)})
    assert r.status_code == 422 and "moving" in r.json()["detail"]
    r = client.post("/v1/jobs", files={"fixed": ("f.nii.gz", fixed), "moving": ("m.nii.gz", fixed),
                                       "extra": ("e.nii.gz", fixed)})
    assert r.status_code == 400 and "extra" in r.json()["detail"]
    r = client.post("/v1/jobs", files={"fixed": ("f.dcm", fixed), "moving": ("m.nii.gz", fixed)})
    assert r.status_code == 422 and "unsupported file type" in r.json()["detail"]
    r = client.post("/v1/jobs", files={"fixed": ("f.mhd", fixed), "moving": ("m.nii.gz", fixed)})
    assert r.status_code == 422
    r = client.post("/v1/jobs", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415
    r = client.post("/v1/jobs", content=b"--xyz\r\nbroken",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400
    r = client.post("/v1/jobs", files=_files(pair_files), data={"options": "{not json"})
    assert r.status_code == 422 and "options" in r.json()["detail"]
    assert list(_store(client).root.glob("[0-9a-f]*")) == []
    assert list((_store(client).root / ".incoming").iterdir()) == []


# --------------------------------------------------------------- security


def test_api_key_missing_is_401_wrong_is_403(make_client, pair_files):
    client = make_client(**{k[5:].lower(): v for k, v in api_key_env().items()})
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"X-API-Key": "nope"}).status_code == 403
    assert _submit(client, pair_files).status_code == 401
    r = client.get("/v1/jobs", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_oversize_upload_is_413_and_leaves_nothing(make_client, pair_files):
    client = make_client(max_upload_bytes=20_000)
    r = _submit(client, pair_files)  # the pair is about 2 x 25 kB
    assert r.status_code == 413
    store = _store(client)
    assert store.ids() == [] and list((store.root / ".incoming").iterdir()) == []


def test_oversize_chunked_upload_is_cut_off_while_streaming(make_client):
    client = make_client(max_upload_bytes=100_000)

    def body():
        yield (b"--b\r\nContent-Disposition: form-data; name=\"fixed\"; "
               b"filename=\"f.nii.gz\"\r\n\r\n")
        for _ in range(100):
            yield b"\0" * 10_000

    r = client.post("/v1/jobs", content=body(),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    store = _store(client)
    assert store.ids() == [] and list((store.root / ".incoming").iterdir()) == []


def _nifti_header_claiming(size: tuple[int, int, int]) -> bytes:
    import struct

    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *size, 1, 1, 1, 1)
    struct.pack_into("<h", header, 70, 16)  # float32
    struct.pack_into("<h", header, 72, 32)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352)
    header[344:348] = b"n+1\0"
    return bytes(header) + b"\0\0\0\0"


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("0001.dcm", b"\0" * (32 * 1024 * 1024))  # 32 MiB of zeros, ~32 kB packed
    return buf.getvalue()


@pytest.mark.parametrize(("name", "content", "words"), [
    ("f.nii.gz", b"this is not an image at all", "fixed.nii.gz"),
    ("f.nii", _nifti_header_claiming((4000, 4000, 4000)), "fixed.nii"),
    ("f.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n"
               b"data file: /etc/passwd\n\n", "fixed.nrrd"),
    ("f.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_FLOAT\n"
              b"ElementDataFile = /etc/shadow\n", "fixed.mha"),
    ("f.zip", _zip_bomb, "fixed.zip"),
    ("f.zip", b"PK\x03\x04 broken zip", "fixed.zip"),
])
def test_malicious_or_broken_files_are_422_with_a_clear_message(client, pair_files, name,
                                                                content, words, dispatcher):
    content = content() if callable(content) else content  # the zip bomb is made on demand
    r = client.post("/v1/jobs", files={"fixed": (name, content),
                                       "moving": ("m.nii.gz", pair_files[1].read_bytes())})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(words) and "\n" not in detail
    assert dispatcher.sent == []
    assert _store(client).ids() == []


# ------------------------------------------------------- working spacing


def test_a_working_spacing_whose_grid_exceeds_max_voxels_is_422(make_client, pair_files,
                                                                 dispatcher):
    client = make_client(max_voxels=24**3)  # the pair: 24^3 voxels of 4 mm each
    r = _submit(client, pair_files, options={**TINY_OPTIONS, "working_spacing": 2.0})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("working_spacing 2 mm makes a working grid of 47 x 47 x 47 "
                             "voxels (103,823) for the fixed image"), detail
    assert "above the limit of 13,824 voxels" in detail
    store = _store(client)
    assert dispatcher.sent == [] and store.ids() == []
    assert list((store.root / ".incoming").iterdir()) == []
    # At the inputs' own spacing the grid is the inputs' size, within the limit.
    r = _submit(client, pair_files, options={**TINY_OPTIONS, "working_spacing": 4.0})
    assert r.status_code == 202, r.text


# ------------------------------------------------------------- storage


@pytest.mark.parametrize(("limit", "size"), [
    (2 * 1024**2, 8 * 1024**2),  # fails in a flush while the body streams in
    (100_000, 500_000),  # fails in the last flush, after the body was parsed
])
def test_a_full_jobs_volume_is_507_and_touches_no_stored_job(make_client, pair_files,
                                                             dispatcher, limit, size):
    client = make_client(raise_server_exceptions=False)
    stored = _submit(client, pair_files).json()["id"]
    store = _store(client)
    manifest_before = (store.job_dir(stored) / "manifest.json").read_bytes()
    files = {"fixed": ("f.nii.gz", pair_files[0].read_bytes()),
             "moving": ("m.nii", os.urandom(size))}
    with file_size_limit(limit):
        r = client.post("/v1/jobs", files=files)
    assert r.status_code == 507, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "jobs storage cannot take the upload (File too large)"}
    assert dispatcher.sent == [stored] and store.ids() == [stored]
    assert list((store.root / ".incoming").iterdir()) == []  # staging removed
    assert (store.job_dir(stored) / "manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in (store.job_dir(stored) / "inputs").iterdir()) == [
        "fixed.nii.gz", "moving.nii.gz"]


def test_unhandled_errors_answer_the_shared_json_error_model(make_client, pair_files):
    client = make_client(raise_server_exceptions=False)
    job_id = _submit(client, pair_files).json()["id"]
    (_store(client).job_dir(job_id) / "manifest.json").write_text("{not a manifest")
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "internal error: ValidationError"}
    assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_uploaded_inputs_are_on_disk_before_the_202(client, pair_files, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    r = _submit(client, pair_files)
    assert r.status_code == 202, r.text
    staging = _store(client).incoming_dir(r.json()["id"])
    for path in ("inputs/fixed.nii.gz", "inputs/moving.nii.gz", "inputs"):
        assert str(staging / path) in synced, synced
    # The files before their folder, the folder before the job is moved into place.
    assert synced.index(str(staging / "inputs")) > synced.index(
        str(staging / "inputs/moving.nii.gz"))
    assert synced.index(str(_store(client).root)) > synced.index(str(staging / "inputs"))


# ------------------------------------------------------ initial transform


def _euler_tfm_bytes(tmp_path: Path) -> tuple[bytes, object]:
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.2, -0.1, 0.3, (12.0, -8.0, 9.0))
    path = tmp_path / "pose.tfm"
    sitk.WriteTransform(euler, str(path))
    return path.read_bytes(), euler


def test_a_good_initial_transform_is_stored_and_its_matrix_shown(client, pair_files,
                                                                  tmp_path, dispatcher):
    import numpy as np

    from disa.registration.transform.parametric import linear_matrix

    content, euler = _euler_tfm_bytes(tmp_path)
    r = client.post("/v1/jobs", files={**_files(pair_files),
                                       "initial_transform": ("Doe^John pose.TFM", content)},
                    data={"options": json.dumps(TINY_OPTIONS)})
    assert r.status_code == 202, r.text
    job = r.json()
    assert dispatcher.sent == [job["id"]]
    shown = job["inputs"]["initial_transform"]
    assert shown["format"] == "itk-text"
    np.testing.assert_allclose(shown["matrix_fixed_to_moving"], linear_matrix(euler),
                               atol=1e-12)
    manifest = _store(client).read(job["id"])
    assert manifest.inputs["initial_transform"] == "inputs/initial_transform.tfm"
    folder = _store(client).job_dir(job["id"])
    assert (folder / "inputs" / "initial_transform.tfm").read_bytes() == content
    assert "Doe" not in (folder / "manifest.json").read_text()


def _bspline_bytes(tmp_path: Path) -> bytes:
    import SimpleITK as sitk

    path = tmp_path / "b.tfm"
    grid = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    sitk.WriteTransform(sitk.BSplineTransformInitializer(grid, [3, 3, 3]), str(path))
    return path.read_bytes()


# A displacement field whose fixed parameters claim a 4000^3 grid: ITK would allocate
# it (1.5 TB) while parsing; the class allowlist refuses it unread.
_FIELD_BOMB = (b"#Insight Transform File V1.0\n#Transform 0\n"
               b"Transform: DisplacementFieldTransform_double_3_3\nParameters: 0\n"
               b"FixedParameters: 4000 4000 4000 0 0 0 1 1 1 1 0 0 0 1 0 0 0 1\n")


@pytest.mark.parametrize(("name", "content", "status", "words"), [
    ("b.tfm", _bspline_bytes, 422,
     "initial transform (initial_transform.tfm): BSplineTransform is not a linear transform"),
    ("f.txt", _FIELD_BOMB, 422,
     "initial transform (initial_transform.txt): DisplacementFieldTransform is not a linear"),
    ("g.tfm", b"hello, not a transform", 422,
     "initial transform (initial_transform.tfm): not an ITK transform file"),
    ("s.tfm", b"#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n"
              b"Parameters: 1 0 0 0 1 0 0 0 0 0 0 0\nFixedParameters: 0 0 0\n", 422,
     "the transform's matrix is singular"),
    ("t.h5", b"\x89HDF\r\n\x1a\n", 422, "initial_transform: unsupported file type"),
    ("t.tfm", b"#" * (1024 * 1024 + 1), 413, "initial_transform: file is longer than"),
])
def test_a_bad_initial_transform_is_refused_at_upload(client, pair_files, tmp_path, name,
                                                      content, status, words, dispatcher):
    content = content(tmp_path) if callable(content) else content
    r = client.post("/v1/jobs", files={**_files(pair_files), "initial_transform": (name, content)},
                    data={"options": json.dumps(TINY_OPTIONS)})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail, detail
    assert "\n" not in detail and str(tmp_path) not in detail
    store = _store(client)
    assert dispatcher.sent == [] and store.ids() == []
    assert list((store.root / ".incoming").iterdir()) == []


# ------------------------------------------------------------ honest schema


@pytest.mark.parametrize(("options", "detail"), [
    ({"starts": "10"}, "invalid options: starts: must be an integer (a JSON number), not a "
                       "string"),
    ({"starts": True}, "invalid options: starts: must be an integer (a JSON number), not a "
                       "boolean"),
    ({"rotation_range": "30"}, "invalid options: rotation_range: must be a number (a JSON "
                               "number), not a string"),
    ({"working_spacing": False}, "invalid options: working_spacing: must be a number (a JSON "
                                 "number), not a boolean"),
])
def test_numeric_options_take_json_numbers_only(client, pair_files, dispatcher, options,
                                                detail):
    r = _submit(client, pair_files, options=options)
    assert r.status_code == 422 and r.json()["detail"] == detail
    assert dispatcher.sent == []
    r = _submit(client, pair_files, options={**TINY_OPTIONS, "rotation_range": 30})
    assert r.status_code == 202 and r.json()["options"]["rotation_range"] == 30.0


@pytest.mark.parametrize("text", ['{"rotation_range": NaN}', '{"translation_range": Infinity}'])
def test_a_nan_option_is_refused_as_not_a_number(client, pair_files, text):
    r = client.post("/v1/jobs", files=_files(pair_files), data={"options": text})
    assert r.status_code == 422
    assert "not-a-number (NaN) or infinite: give a finite number" in r.json()["detail"]


def test_text_fields_are_limited_in_characters_as_the_schema_says(client, pair_files):
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    limit = form["options"]["maxLength"]
    # Within maxLength in characters, though more bytes than that in UTF-8: no 413, the
    # options are read (and refused for what they say).
    text = json.dumps({"mode": "é" * (limit - 20)}, ensure_ascii=False)
    assert len(text) <= limit < len(text.encode())
    r = client.post("/v1/jobs", files=_files(pair_files), data={"options": text})
    assert r.status_code == 422 and r.json()["detail"].startswith("invalid options: mode:")
    uid = "é" * form["fixed_series_uid"]["maxLength"]
    r = client.post("/v1/jobs", files=_files(pair_files), data={"fixed_series_uid": uid})
    assert r.status_code == 422 and "not a DICOM UID" in r.json()["detail"]
    r = client.post("/v1/jobs", files=_files(pair_files), data={"options": " " * (limit + 1)})
    assert r.status_code == 413
    assert r.json()["detail"] == f"form field 'options' is longer than {limit} characters"


def test_a_result_file_that_is_a_symbolic_link_is_not_served(client, pair_files, tmp_path):
    job_id = _submit(client, pair_files).json()["id"]
    store = _store(client)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a result")
    (store.outputs_dir(job_id) / "transform.tfm").symlink_to(secret)
    (store.outputs_dir(job_id) / "qa.png").write_bytes(b"\x89PNG")
    m = store.read(job_id)
    m.state, m.files = "succeeded", ["transform.tfm", "qa.png"]
    store.write(m)
    r = client.get(f"/v1/jobs/{job_id}/files/transform.tfm")
    assert r.status_code == 404 and "not a result" not in r.text
    assert client.get(f"/v1/jobs/{job_id}/files/qa.png").status_code == 200
    # a linked outputs folder is not followed either
    elsewhere = tmp_path / "elsewhere"
    store.outputs_dir(job_id).rename(elsewhere)
    store.outputs_dir(job_id).symlink_to(elsewhere)
    assert client.get(f"/v1/jobs/{job_id}/files/qa.png").status_code == 404


@pytest.mark.parametrize("path", [
    "point?x=nan&y=0&z=0",
    "heatmap?x=0&y=NaN&z=0",
    "slices/fixed/axial/0?window=nan&level=0",
    "slices/fixed/axial/0?window=10&level=inf",
])
def test_a_nan_query_parameter_is_refused_as_not_a_number(client, path):
    r = client.get(f"/v1/jobs/{'0' * 32}/{path}")
    assert r.status_code == 422
    assert r.json()["detail"].endswith(": not-a-number (NaN) or infinite: give a finite number")
