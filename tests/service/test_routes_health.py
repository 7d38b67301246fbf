"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import json

from .helpers import TINY_OPTIONS


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_the_failing_check(client, dispatcher):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    dispatcher.workers = 0
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["workers"] == {"ok": False, "detail": "0 answering"}
    dispatcher.broker_up = False
    assert client.get("/readyz").json()["checks"]["broker"]["ok"] is False


def test_metrics_count_jobs_by_state_and_stage_durations(client, pair_files):
    files = {"fixed": ("f.nii.gz", pair_files[0].read_bytes()),
             "moving": ("m.nii.gz", pair_files[1].read_bytes())}
    job_id = client.post("/v1/jobs", files=files,
                         data={"options": json.dumps(TINY_OPTIONS)}).json()["id"]
    store = client.app.state.runtime.store
    m = store.read(job_id)
    m.state, m.stage_seconds = "succeeded", {"search": 1.5, "refine": 0.25}
    m.started_at = m.finished_at = m.created_at
    store.write(m)
    client.app.state.runtime.metrics.refreshed_at = 0  # as if the last look were long ago
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'disa_jobs{state="succeeded"} 1.0' in text
    assert 'disa_jobs{state="queued"} 0.0' in text
    assert 'disa_stage_duration_seconds_sum{stage="search"} 1.5' in text
    assert 'disa_jobs_submitted_total{owner="anonymous"} 1.0' in text
    assert 'disa_jobs_finished_total{owner="anonymous",state="succeeded"} 1.0' in text
