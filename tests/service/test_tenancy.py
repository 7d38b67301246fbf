"""Tenant separation: a job belongs to the API key that made it.

Every job route is tried with the owner's key, another tenant's key and an admin
key: the other tenant gets 404 (as for a job that does not exist) and does not see
the job in the list, the admin sees and may act on everything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from disa.jobs.keys import key_digest, parse_api_keys
from disa.jobs.settings import Settings
from disa.jobs.store import JobStore
from disa.service.security import find_key

from .helpers import (
    ADMIN_KEY,
    ADMIN_OWNER,
    API_KEY,
    OTHER_KEY,
    OTHER_OWNER,
    TINY_OPTIONS,
    api_key_env,
)

OWNER = {"X-API-Key": API_KEY}
OTHER = {"X-API-Key": OTHER_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}
#: API_KEY is listed as a plain digest: its jobs are owned by the digest's prefix.
PLAIN_OWNER = f"sha256:{key_digest(API_KEY)[:12]}"

#: Every route of one job, as (method, path after /v1/jobs/{id}). The job stays queued:
#: the owner gets 202 or 409 (results and viewer need a succeeded job, DELETE a finished
#: one) where another key gets 404.
JOB_ROUTES = [
    ("GET", ""),
    ("GET", "/files/transform.tfm"),
    ("GET", "/viewer"),
    ("GET", "/point?x=0&y=0&z=0"),
    ("GET", "/slices/fixed/axial/0"),
    ("GET", "/heatmap?x=0&y=0&z=0"),
    ("POST", "/cancel"),
    ("DELETE", ""),
]


@pytest.fixture
def keyed(make_client) -> TestClient:
    return make_client(**{k[5:].lower(): v for k, v in api_key_env().items()})


def _submit(client: TestClient, pair: tuple[Path, Path], headers: dict) -> dict:
    r = client.post("/v1/jobs", headers=headers,
                    files={"fixed": ("f.nii.gz", pair[0].read_bytes()),
                           "moving": ("m.nii.gz", pair[1].read_bytes())},
                    data={"options": json.dumps(TINY_OPTIONS)})
    assert r.status_code == 202, r.text
    return r.json()


def _store(client: TestClient) -> JobStore:
    return client.app.state.runtime.store


def _succeed(store: JobStore, job_id: str) -> None:
    """Finish a job by hand, as a worker would, with one result file."""
    (store.outputs_dir(job_id) / "transform.tfm").write_text("#Insight Transform File V1.0\n")
    m = store.read(job_id)
    m.state, m.files = "succeeded", ["transform.tfm"]
    store.write(m)


def test_the_manifest_records_the_owner_name_never_the_key(keyed, pair_files):
    mine = _submit(keyed, pair_files, OWNER)
    theirs = _submit(keyed, pair_files, OTHER)
    assert mine["owner"] == PLAIN_OWNER and theirs["owner"] == OTHER_OWNER
    store = _store(keyed)
    for job, key in ((mine, API_KEY), (theirs, OTHER_KEY)):
        text = (store.job_dir(job["id"]) / "manifest.json").read_text()
        assert key not in text and key_digest(key) not in text
    assert store.read(mine["id"]).owner == PLAIN_OWNER
    assert store.read(theirs["id"]).owner == OTHER_OWNER


@pytest.mark.parametrize(("method", "rest"), JOB_ROUTES)
def test_another_keys_job_is_404_on_every_route(keyed, pair_files, method, rest):
    job_id = _submit(keyed, pair_files, OWNER)["id"]
    url = f"/v1/jobs/{job_id}{rest}"
    r = keyed.request(method, url, headers=OTHER)
    assert r.status_code == 404, r.text
    assert r.json() == {"detail": "no such job"}  # the same as for an unknown id
    assert keyed.request(method, f"/v1/jobs/{'0' * 32}{rest}", headers=OTHER).json() == \
        r.json()
    store = _store(keyed)
    assert store.read(job_id).state == "queued" and not store.cancel_requested(job_id)
    assert keyed.request(method, url, headers=OWNER).status_code in (200, 202, 409)


@pytest.mark.parametrize(("method", "rest"), JOB_ROUTES)
def test_an_admin_key_reaches_every_route_of_every_job(keyed, pair_files, method, rest):
    job_id = _submit(keyed, pair_files, OTHER)["id"]
    r = keyed.request(method, f"/v1/jobs/{job_id}{rest}", headers=ADMIN)
    assert r.status_code in (200, 202, 409), r.text


def test_the_list_shows_each_key_its_own_jobs_and_an_admin_all(keyed, pair_files):
    mine = [_submit(keyed, pair_files, OWNER)["id"] for _ in range(2)]
    theirs = _submit(keyed, pair_files, OTHER)["id"]

    def listed(headers: dict, **params) -> tuple[int, list[str]]:
        page = keyed.get("/v1/jobs", headers=headers, params=params).json()
        return page["total"], [job["id"] for job in page["items"]]

    assert listed(OWNER) == (2, mine[::-1])
    assert listed(OTHER) == (1, [theirs])
    assert listed(ADMIN) == (3, [theirs, *mine[::-1]])
    keyed.post(f"/v1/jobs/{theirs}/cancel", headers=OTHER)
    assert listed(OWNER, state="cancelled") == (0, [])
    assert listed(ADMIN, state="cancelled") == (1, [theirs])


def test_result_files_only_for_their_owner(keyed, pair_files):
    job_id = _submit(keyed, pair_files, OWNER)["id"]
    _succeed(_store(keyed), job_id)
    url = f"/v1/jobs/{job_id}/files/transform.tfm"
    assert keyed.get(url, headers=OTHER).status_code == 404
    assert keyed.get(url, headers=OWNER).text.startswith("#Insight Transform File")
    assert keyed.get(url, headers=ADMIN).status_code == 200


def test_cancel_and_delete_by_another_key_leave_the_job_alone(keyed, pair_files):
    job_id = _submit(keyed, pair_files, OWNER)["id"]
    store = _store(keyed)
    assert keyed.post(f"/v1/jobs/{job_id}/cancel", headers=OTHER).status_code == 404
    assert store.read(job_id).state == "queued" and not store.cancel_requested(job_id)
    assert keyed.post(f"/v1/jobs/{job_id}/cancel", headers=OWNER).status_code == 202
    assert keyed.delete(f"/v1/jobs/{job_id}", headers=OTHER).status_code == 404
    assert store.exists(job_id)
    assert keyed.delete(f"/v1/jobs/{job_id}", headers=ADMIN).status_code == 204
    assert not store.exists(job_id)


def test_jobs_without_an_owner_are_the_admins_only(keyed, pair_files):
    """Jobs made before keys were configured (or by an older version) have no owner."""
    job_id = _submit(keyed, pair_files, OWNER)["id"]
    store = _store(keyed)
    m = store.read(job_id)
    m.owner = None
    store.write(m)
    assert keyed.get(f"/v1/jobs/{job_id}", headers=OWNER).status_code == 404
    assert keyed.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()["owner"] is None


def test_without_keys_everything_is_open_and_unowned(client, pair_files):
    job = _submit(client, pair_files, {})
    assert job["owner"] is None
    assert client.get("/v1/jobs").json()["total"] == 1


def test_metrics_and_logs_name_the_owner_never_the_key(keyed, pair_files, caplog):
    with caplog.at_level(logging.INFO, logger="disa.service"):
        mine = _submit(keyed, pair_files, OWNER)["id"]
        theirs = _submit(keyed, pair_files, OTHER)["id"]
        keyed.post(f"/v1/jobs/{theirs}/cancel", headers=OTHER)
    assert f"job {mine}: queued for {PLAIN_OWNER}" in caplog.text
    assert f"job {theirs}: queued for {OTHER_OWNER}" in caplog.text
    assert f"job {theirs}: cancel requested by {OTHER_OWNER}" in caplog.text
    keyed.app.state.runtime.metrics.refreshed_at = 0
    text = keyed.get("/metrics").text
    assert f'disa_jobs_submitted_total{{owner="{PLAIN_OWNER}"}} 1.0' in text
    assert f'disa_jobs_submitted_total{{owner="{OTHER_OWNER}"}} 1.0' in text
    assert f'disa_jobs_finished_total{{owner="{OTHER_OWNER}",state="cancelled"}} 1.0' in text
    for key in (API_KEY, OTHER_KEY, key_digest(API_KEY), key_digest(OTHER_KEY)):
        assert key not in caplog.text and key not in text


# ------------------------------------------------------------------ settings


def test_api_keys_take_names_and_an_admin_role_and_plain_digests_still_work():
    a, b, c = (key_digest(k) for k in ("a", "b", "c"))
    keys = parse_api_keys(f" {a.upper()} , alice={b}, {ADMIN_OWNER}={c}:admin")
    assert [(k.owner, k.admin) for k in keys] == [(f"sha256:{a[:12]}", False),
                                                  ("alice", False), (ADMIN_OWNER, True)]
    assert find_key("b", keys).owner == "alice" and find_key("c", keys).admin
    assert find_key("B", keys) is None and find_key("", keys) is None
    assert Settings(api_keys=f"{a},alice={b}").api_key_digests == (a, b)
    assert "digest" not in repr(keys[0]) and a not in repr(keys[0])


@pytest.mark.parametrize(("value", "words"), [
    ("secret", "SHA-256"),
    (f"alice={key_digest('a')}:root", "unknown role 'root'"),
    (f"al ice={key_digest('a')}", "key name"),
    (f"sha256:x={key_digest('a')}", "key name"),
    (f"alice={key_digest('a')},alice={key_digest('b')}", "owner alice more than once"),
    (f"{key_digest('a')},bob={key_digest('a')}", "digest"),
])
def test_malformed_api_key_lists_are_refused_at_start(value, words):
    with pytest.raises(ValidationError, match=words):
        Settings(api_keys=value)
