"""The job store: ids, atomic manifests, publication, locks, deletion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from disa.jobs.manifest import JobNotFound, Manifest, check_job_id, new_job_id, now
from disa.jobs.store import JobStore


def _publish(store: JobStore, state: str = "queued") -> Manifest:
    job_id = new_job_id()
    staging = store.create_incoming(job_id)
    (staging / "inputs" / "fixed.nii.gz").write_bytes(b"x")
    t = now()
    m = Manifest(id=job_id, state=state, created_at=t, updated_at=t,
                 inputs={"fixed": "inputs/fixed.nii.gz"})
    store.publish(m)
    return m


def test_ids_are_uuid4_hex_and_anything_else_is_refused(tmp_path: Path):
    job_id = new_job_id()
    assert check_job_id(job_id) == job_id and len(job_id) == 32
    store = JobStore(tmp_path)
    for bad in ("..", "../etc", job_id.upper(), job_id + "0", "", "a" * 31, f"{job_id}\n"):
        with pytest.raises(JobNotFound):
            store.job_dir(bad)


def test_publish_makes_the_job_appear_whole(tmp_path: Path):
    store = JobStore(tmp_path)
    m = _publish(store)
    folder = store.job_dir(m.id)
    assert (folder / "inputs" / "fixed.nii.gz").is_file() and (folder / "outputs").is_dir()
    assert store.read(m.id) == m
    assert store.ids() == [m.id]
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_manifest_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path):
    store = JobStore(tmp_path)
    m = _publish(store)
    for i in range(20):
        m.progress.fraction = i / 20
        store.write(m, durable=i % 2 == 0)
    names = sorted(p.name for p in store.job_dir(m.id).iterdir())
    assert names == ["inputs", "manifest.json", "outputs"]
    data = json.loads((store.job_dir(m.id) / "manifest.json").read_text())
    assert data["format"] == "disa-job/1" and data["progress"]["fraction"] == 0.95


def test_unreadable_manifests_are_skipped_in_listings(tmp_path: Path):
    store = JobStore(tmp_path)
    good = _publish(store)
    bad = _publish(store)
    (store.job_dir(bad.id) / "manifest.json").write_text("{broken")
    (tmp_path / "not-a-job").mkdir()
    assert [m.id for m in store.manifests()] == [good.id]


def test_lock_excludes_other_processes_and_threads_and_dies_with_its_holder(tmp_path: Path):
    store = JobStore(tmp_path)
    m = _publish(store)
    probe = ("import sys; from disa.jobs.store import JobStore; "
             "print(JobStore(sys.argv[1]).lock(sys.argv[2]).acquire(timeout=0.0))")
    with store.lock(m.id) as lock:
        assert lock.acquire()
        assert not store.lock(m.id).acquire(timeout=0.1)  # same process, other descriptor
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path), m.id],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "False"
    # and a holder that dies drops it
    holder = subprocess.Popen([sys.executable, "-c", probe.replace(
        "print(", "import time; print(").replace("))", ")); time.sleep(60)"),
        str(tmp_path), m.id], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    assert not store.lock(m.id).acquire(timeout=0.0)
    holder.kill()
    holder.wait()
    other = store.lock(m.id)
    assert other.acquire()
    other.release()


def test_delete_and_cancel_flag(tmp_path: Path):
    store = JobStore(tmp_path)
    m = _publish(store)
    assert not store.cancel_requested(m.id)
    store.request_cancel(m.id)
    assert store.cancel_requested(m.id)
    store.delete(m.id)
    assert not store.exists(m.id) and store.ids() == []
    with pytest.raises(JobNotFound):
        store.read(m.id)
    with pytest.raises(JobNotFound):
        store.request_cancel(m.id)
    with pytest.raises(JobNotFound):
        store.lock(m.id).acquire()


def test_result_path_serves_only_result_names(tmp_path: Path):
    store = JobStore(tmp_path)
    m = _publish(store)
    out = store.outputs_dir(m.id)
    (out / "transform.tfm").write_text("t")
    (out / ".tmp-x.json").write_text("{}")
    assert store.result_path(m.id, "transform.tfm") == out / "transform.tfm"
    assert store.result_path(m.id, "qa.png") is None
    for name in ("manifest.json", ".tmp-x.json", "../manifest.json", "../inputs/fixed.nii.gz"):
        assert store.result_path(m.id, name) is None


def test_stale_incoming_uploads_are_removed(tmp_path: Path):
    store = JobStore(tmp_path)
    old = store.create_incoming(new_job_id())
    fresh = store.create_incoming(new_job_id())
    os.utime(old, (0, 0))
    assert store.remove_stale_incoming(3600) == 1
    assert not old.exists() and fresh.exists()
