"""The job function shared by the Celery task and the embedded worker."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from disa.core.errors import CancelledError, InputError
from disa.core.io.dicom_zip import UnpackBusy
from disa.registration import runner
from disa.worker import execute
from disa.worker.execute import (
    Interrupted,
    TransientBusyError,
    TransientError,
    TransientStorageError,
    execute_job,
)

from ..support import file_size_limit


class _Calls(list):
    """Options of each engine call, and (`paths`) the initial transform path of each."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list = []


def _fake_engine(monkeypatch: pytest.MonkeyPatch, behaviour) -> list:
    """Replace the engine's entry point; `behaviour(outdir, progress, cancel)`. Returns the
    options of each call; the initial transform paths given go to `calls.paths`."""
    calls = _Calls()
    paths = calls.paths

    def fake(fixed, moving, outdir, options, fixed_mask=None, moving_mask=None,
             progress=None, cancel=None, limits=None, fixed_series_uid=None,
             moving_series_uid=None, initial_transform_path=None):
        calls.append(options)
        paths.append(initial_transform_path)
        return behaviour(outdir, progress, cancel)

    monkeypatch.setattr(runner, "run_registration", fake)
    return calls


def _result(outdir, progress, cancel):
    progress("read", 0.0)
    progress("search", 0.5)
    data = {"mode": "rigid", "similarity": "mind", "parameters": [0.0] * 6,
            "files": ["transform.tfm", "result.json"], "secret": "stays in result.json"}
    (outdir / "transform.tfm").write_text("t")
    (outdir / "result.json").write_text(json.dumps(data))
    progress("done", 1.0)
    return data


def test_a_real_registration_succeeds_with_summary_and_timings(store, settings, make_job):
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "succeeded"
    m = store.read(job_id)
    assert m.state == "succeeded" and m.attempts == 1 and m.error is None
    assert m.files == ["transform.tfm", "registered.nii.gz", "qa.png", "result.json"]
    assert len(m.result["parameters"]) == 6 and 0 <= m.result["confidence"] <= 1
    assert {"read", "search", "write"} <= set(m.stage_seconds)
    assert m.progress.stage == "done" and m.finished_at >= m.started_at


def test_idempotent_by_job_id(store, settings, make_job, monkeypatch):
    calls = _fake_engine(monkeypatch, _result)
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "succeeded"
    assert execute_job(store, job_id, settings) == "succeeded"  # a second delivery
    assert len(calls) == 1
    assert "secret" not in store.read(job_id).result


def test_a_complete_result_folder_is_adopted_without_running_again(store, settings, make_job,
                                                                  monkeypatch):
    calls = _fake_engine(monkeypatch, _result)
    job_id = make_job()
    _result(store.outputs_dir(job_id), lambda *a: None, None)  # a run died after writing
    assert execute_job(store, job_id, settings) == "succeeded"
    assert calls == [] and store.read(job_id).files == ["transform.tfm", "result.json"]


def test_staging_folders_of_a_killed_writer_are_cleared_before_a_new_attempt(
        store, settings, make_job, monkeypatch):
    _fake_engine(monkeypatch, _result)
    job_id = make_job()
    outputs = store.outputs_dir(job_id)
    for name in (".outputs.partial-1a2b3c4d", ".outputs.old-5e6f7a8b"):  # a writer killed
        (outputs.parent / name).mkdir(parents=True)
        (outputs.parent / name / "qa.png").write_bytes(b"half")
    assert execute_job(store, job_id, settings) == "succeeded"
    assert sorted(p.name for p in outputs.parent.glob(".outputs.*")) == []
    assert (outputs / "result.json").is_file()


def test_input_errors_fail_the_job_with_their_message(store, settings, make_job, monkeypatch):
    def bad(outdir, progress, cancel):
        raise InputError("moving.nii.gz: gzip data is truncated")

    _fake_engine(monkeypatch, bad)
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "failed"
    assert store.read(job_id).error == "moving.nii.gz: gzip data is truncated"


def test_internal_errors_say_only_their_type(store, settings, make_job, monkeypatch):
    def boom(outdir, progress, cancel):
        raise ZeroDivisionError("patient Doe")

    _fake_engine(monkeypatch, boom)
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "failed"
    assert store.read(job_id).error == "internal error: ZeroDivisionError"


def test_storage_errors_are_retried_then_fail(store, settings, make_job, monkeypatch):
    def flaky(outdir, progress, cancel):
        raise OSError(errno.EIO, "I/O error")

    calls = _fake_engine(monkeypatch, flaky)
    job_id = make_job()
    for attempt in (1, 2):
        with pytest.raises(TransientStorageError):
            execute_job(store, job_id, settings)
        m = store.read(job_id)
        assert m.state == "queued" and m.attempts == attempt
    assert execute_job(store, job_id, settings) == "failed"
    assert store.read(job_id).error == "internal error: OSError"
    assert execute_job(store, job_id, settings) == "failed" and len(calls) == 3


def test_a_full_unpack_pool_is_retried_not_blamed_on_the_input(store, settings, make_job,
                                                                 monkeypatch):
    """UnpackBusy is an InputError subclass; the job goes back to the queue (the caller
    retries it) rather than failing as bad input, and fails as internal at the end."""
    def busy(outdir, progress, cancel):
        raise UnpackBusy("ct.zip: the server is unpacking other DICOM zips; try again")

    calls = _fake_engine(monkeypatch, busy)
    job_id = make_job()
    for attempt in (1, 2):
        with pytest.raises(TransientBusyError) as caught:
            execute_job(store, job_id, settings)
        assert isinstance(caught.value, TransientError)
        m = store.read(job_id)
        assert m.state == "queued" and m.attempts == attempt and m.error is None
    assert execute_job(store, job_id, settings) == "failed"
    m = store.read(job_id)
    assert m.error_kind == "internal" and "busy unpacking" in m.error
    assert len(calls) == 3


def test_gives_up_after_max_attempts_of_lost_workers(store, settings, make_job):
    job_id = make_job()
    m = store.read(job_id)
    m.attempts = settings.max_attempts  # three workers died running it
    store.write(m)
    assert execute_job(store, job_id, settings) == "failed"
    assert "gave up after 3 attempts" in store.read(job_id).error


def test_cancel_flag_stops_a_running_job_between_iterations(store, settings, make_job,
                                                            monkeypatch):
    monkeypatch.setattr(execute, "CANCEL_CHECK_INTERVAL_S", 0.0)

    def long_run(outdir, progress, cancel):
        store.request_cancel(job_id)  # the API, while the optimiser iterates
        for _ in range(1000):
            if cancel():
                raise CancelledError("registration cancelled")
        raise AssertionError("cancel() never said stop")

    _fake_engine(monkeypatch, long_run)
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "cancelled"
    assert store.read(job_id).state == "cancelled"


def test_a_cancelled_queued_job_never_runs(store, settings, make_job, monkeypatch):
    calls = _fake_engine(monkeypatch, _result)
    job_id = make_job()
    store.request_cancel(job_id)
    assert execute_job(store, job_id, settings) == "cancelled" and calls == []


def test_soft_deadline_fails_the_job(store, settings, make_job, monkeypatch):
    monkeypatch.setattr(execute, "CANCEL_CHECK_INTERVAL_S", 0.0)
    settings.soft_time_limit_s = 0

    def run(outdir, progress, cancel):
        while not cancel():
            pass
        raise CancelledError("registration cancelled")

    _fake_engine(monkeypatch, run)
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "failed"
    assert store.read(job_id).error.startswith("time limit exceeded")


def test_interrupt_puts_the_job_back_in_the_queue(store, settings, make_job, monkeypatch):
    def run(outdir, progress, cancel):
        assert cancel()
        raise CancelledError("registration cancelled")

    _fake_engine(monkeypatch, run)
    job_id = make_job()
    with pytest.raises(Interrupted):
        execute_job(store, job_id, settings, interrupted=lambda: True)
    m = store.read(job_id)
    assert m.state == "queued" and m.attempts == 0


def test_duplicate_delivery_steps_aside_while_another_runs(store, settings, make_job,
                                                          monkeypatch):
    monkeypatch.setattr(execute, "LOCK_WAIT_S", 0.2)
    job_id = make_job()
    lock = store.lock(job_id)
    assert lock.acquire()
    try:
        assert execute_job(store, job_id, settings) == "busy"
    finally:
        lock.release()
    assert store.read(job_id).state == "queued"


def test_deleted_job_is_missing(store, settings, make_job):
    job_id = make_job()
    store.delete(job_id)
    assert execute_job(store, job_id, settings) == "missing"
    assert execute_job(store, "not-an-id", settings) == "missing"


def test_progress_reaches_the_manifest_while_running(store, settings, make_job, monkeypatch):
    seen = threading.Event()

    def run(outdir, progress, cancel):
        progress("search", 0.25)
        m = store.read(job_id)
        if m.state == "running" and m.progress.stage == "search":
            seen.set()
        return _result(outdir, progress, cancel)

    _fake_engine(monkeypatch, run)
    job_id = make_job()
    execute_job(store, job_id, settings)
    assert seen.is_set()


# ------------------------------------------- storage failing before the run starts


@contextlib.contextmanager
def _lock_unusable(store, job_id) -> Iterator[None]:
    """The lock file cannot be opened (a folder in its place: EISDIR)."""
    path = store.job_dir(job_id) / ".lock"
    path.unlink(missing_ok=True)
    path.mkdir()
    try:
        yield
    finally:
        path.rmdir()


@contextlib.contextmanager
def _manifest_unreadable(store, job_id) -> Iterator[None]:
    """manifest.json cannot be read (a folder in its place: EISDIR)."""
    path = store.job_dir(job_id) / "manifest.json"
    aside = path.with_name("manifest.aside")
    path.rename(aside)
    path.mkdir()
    try:
        yield
    finally:
        path.rmdir()
        aside.rename(path)


@contextlib.contextmanager
def _running_not_writable(store, job_id) -> Iterator[None]:
    """Writing the 'running' manifest fails (no file may grow past 64 bytes: EFBIG)."""
    with file_size_limit(64):
        yield


@pytest.mark.parametrize("fault", [_lock_unusable, _manifest_unreadable,
                                   _running_not_writable])
def test_storage_errors_before_the_run_leave_the_job_queued_for_a_retry(
        store, settings, make_job, monkeypatch, fault):
    calls = _fake_engine(monkeypatch, _result)
    job_id = make_job()
    with fault(store, job_id), pytest.raises(TransientStorageError):
        execute_job(store, job_id, settings)
    m = store.read(job_id)
    assert m.state == "queued" and m.attempts == 0 and calls == []
    assert execute_job(store, job_id, settings) == "succeeded"  # the retry, storage back
    assert store.read(job_id).attempts == 1 and len(calls) == 1


# ----------------------------------------------------------------- error kinds


def _input_error(outdir, progress, cancel):
    raise InputError("moving.nii.gz: gzip data is truncated")


def _bug(outdir, progress, cancel):
    raise ZeroDivisionError


def _past_deadline(outdir, progress, cancel):
    while not cancel():
        pass
    raise CancelledError("registration cancelled")


@pytest.mark.parametrize(("behaviour", "kind"), [
    (_input_error, "input"),
    (_bug, "internal"),
    (_past_deadline, "internal"),
])
def test_failures_say_whether_the_input_is_at_fault(store, settings, make_job, monkeypatch,
                                                    behaviour, kind):
    monkeypatch.setattr(execute, "CANCEL_CHECK_INTERVAL_S", 0.0)
    settings.soft_time_limit_s = 0 if behaviour is _past_deadline else 60
    _fake_engine(monkeypatch, behaviour)
    job_id = make_job()
    assert execute_job(store, job_id, settings) == "failed"
    assert store.read(job_id).error_kind == kind


def test_a_job_given_up_on_is_an_internal_failure(store, settings, make_job):
    job_id = make_job()
    m = store.read(job_id)
    m.attempts = settings.max_attempts  # its workers were lost
    store.write(m)
    assert execute_job(store, job_id, settings) == "failed"
    m = store.read(job_id)
    assert m.error.startswith("gave up after 3 attempts") and m.error_kind == "internal"


def test_a_working_grid_over_the_service_voxel_limit_fails_as_input(store, settings,
                                                                    make_job):
    """The engine holds the worker's grids to DISA_MAX_VOXELS (the API refuses such
    options at submission; a job queued before that check still cannot run away)."""
    settings.max_voxels = 24**3  # the phantom inputs: 24^3 voxels of 4 mm
    job_id = make_job(options={"similarity": "mind", "starts": 10, "working_spacing": 3.0})
    assert execute_job(store, job_id, settings) == "failed"
    m = store.read(job_id)
    assert m.error_kind == "input"
    assert ("--working-spacing 3 mm makes a working grid of 32 x 32 x 32 voxels (32,768), "
            "above the limit of 13,824 voxels") in m.error


def test_the_initial_transform_reaches_the_engine(store, settings, make_job, monkeypatch):
    calls = _fake_engine(monkeypatch, _result)
    plain = make_job()
    posed = make_job(initial_transform=b"#Insight Transform File V1.0\n")
    assert execute_job(store, plain, settings) == "succeeded"
    assert execute_job(store, posed, settings) == "succeeded"
    assert calls.paths == [None, store.job_dir(posed) / "inputs" / "initial_transform.tfm"]


def test_a_bad_initial_transform_fails_the_job_as_input(store, settings, make_job):
    """A transform the API would refuse (a job queued by an older version, say) fails as
    bad input with the reader's message, before the images are read."""
    job_id = make_job(initial_transform=b"#Insight Transform File V1.0\n"
                                        b"Transform: BSplineTransform_double_3_3\n")
    assert execute_job(store, job_id, settings) == "failed"
    m = store.read(job_id)
    assert m.error_kind == "input"
    assert m.error.startswith("initial transform (initial_transform.tfm): BSplineTransform "
                              "is not a linear transform"), m.error


def test_the_worker_log_names_the_jobs_owner(store, settings, make_job, monkeypatch, caplog):
    _fake_engine(monkeypatch, _result)
    job_id = make_job()
    with store.lock(job_id) as lock:
        assert lock.acquire()
        m = store.read(job_id)
        m.owner = "radiology"
        store.write(m)
    with caplog.at_level(logging.INFO):
        assert execute_job(store, job_id, settings) == "succeeded"
    assert f"job {job_id}: attempt 1 started for radiology" in caplog.text
    assert f"job {job_id}: succeeded (owner radiology)" in caplog.text
