"""Run one job from its folder: the function behind the Celery task and the embedded worker.

Idempotent by job id: a job already finished is left alone, a result folder
already complete (result.json present) is adopted, and a run that was cut off
(worker killed) starts over. Only the holder of the job's lock runs it, so a
duplicate delivery of the same id waits briefly and then steps aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from disa.core.errors import CancelledError, DisaError, InputError
from disa.core.io.dicom_zip import UnpackBusy
from disa.jobs.manifest import TERMINAL_STATES, ErrorKind, JobNotFound, Manifest, Progress, now
from disa.jobs.settings import Settings
from disa.jobs.store import INPUTS_DIR, RESULT_FILES, RESULT_JSON, JobStore

log = logging.getLogger("disa.worker")

#: A duplicate delivery waits this long for the lock: the API and its sweeper
#: hold it for milliseconds, a running job for minutes.
LOCK_WAIT_S = 10.0
#: Progress reaches the manifest at most this often (plus at every stage change).
PROGRESS_INTERVAL_S = 0.5
#: cancel() is called between optimiser iterations; the flag file is looked at
#: at most this often, which matters on network storage.
CANCEL_CHECK_INTERVAL_S = 0.25
#: Result facts copied into the manifest (the job's JSON); the rest stays in result.json.
SUMMARY_KEYS = ("verdict", "verdict_reason", "verdict_evidence", "overlap", "match_quality",
                "sampled_image", "mode", "similarity", "similarity_value", "confidence",
                "ambiguous", "agreeing_solutions", "refined_solutions", "parameter_names",
                "parameters", "matrix_fixed_to_moving", "evaluations", "starts",
                "working_spacing_mm", "transform_convention", "transform_description",
                "deformation")


class TransientError(DisaError):
    """The run failed for a passing reason and attempts remain: run the job again later."""


class TransientStorageError(TransientError):
    """Shared storage failed (OSError) and attempts remain: run the job again later."""


class TransientBusyError(TransientError):
    """The process's DICOM unpack pool stayed full (UnpackBusy) and attempts remain."""


class Interrupted(DisaError):
    """The embedded worker is shutting down; the job went back to the queue."""


@dataclass
class _Canceller:
    """cancel() for the engine: the cancel flag, the soft deadline, a shutdown request."""

    store: JobStore
    job_id: str
    deadline: float
    interrupted: Callable[[], bool] | None
    reason: str | None = None
    _next_check: float = 0.0

    def __call__(self) -> bool:
        if self.interrupted is not None and self.interrupted():
            self.reason = "interrupted"
            return True
        t = time.monotonic()
        if t < self._next_check:
            return False
        self._next_check = t + CANCEL_CHECK_INTERVAL_S
        if t > self.deadline:
            self.reason = "deadline"
            return True
        try:
            if self.store.cancel_requested(self.job_id):
                self.reason = "cancelled"
                return True
        except OSError:  # storage blip: keep going, look again next time
            return False
        return False


@dataclass
class _ProgressWriter:
    """progress(stage, fraction) for the engine: throttled manifest updates and stage timings."""

    store: JobStore
    manifest: Manifest
    stage: str | None = None
    stage_started: float = field(default_factory=time.perf_counter)
    last_write: float = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        t = time.perf_counter()
        changed = stage != self.stage
        if changed:
            self._close_stage(t)
            self.stage, self.stage_started = stage, t
        if not changed and t - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.manifest.progress = Progress(stage=stage, fraction=max(0.0, min(1.0, fraction)))
        self.last_write = t
        try:
            self.store.write(self.manifest, durable=False)
        except OSError as exc:  # progress is best effort; the final write is not
            log.warning("job %s: progress not saved (%s)", self.manifest.id,
                        type(exc).__name__)

    def finish(self) -> None:
        self._close_stage(time.perf_counter())
        self.stage = None

    def _close_stage(self, t: float) -> None:
        if self.stage is not None and self.stage != "done":
            seconds = self.manifest.stage_seconds.get(self.stage, 0.0) + (t - self.stage_started)
            self.manifest.stage_seconds[self.stage] = round(seconds, 4)


def execute_job(store: JobStore, job_id: str, settings: Settings,
                interrupted: Callable[[], bool] | None = None) -> str:
    """Run job `job_id` to an end state and return that state.

    Returns "missing" when the job is gone (deleted) and "busy" when another
    process holds its lock (a duplicate delivery). Raises a TransientError when
    attempts remain and the run failed for a passing reason (the caller retries
    later): TransientStorageError when shared storage failed, including a failure
    before the run could start (lock, manifest), TransientBusyError when the
    process's DICOM unpack pool stayed full; and
    Interrupted when `interrupted()` turned true (the job is queued again).
    """
    try:
        lock = store.lock(job_id)
        if not lock.acquire(timeout=LOCK_WAIT_S):
            log.info("job %s: run by another worker; this delivery steps aside", job_id)
            return "busy"
    except JobNotFound:
        log.info("job %s: no such job (deleted?); nothing to do", job_id)
        return "missing"
    except OSError as exc:
        raise _not_started(job_id, exc) from exc
    try:
        return _run_locked(store, job_id, settings, interrupted)
    except JobNotFound:
        return "missing"
    finally:
        lock.release()


def _not_started(job_id: str, exc: OSError) -> TransientStorageError:
    """The error for a storage failure before a run started. Nothing durable changed, so
    the manifest still says 'queued', which no sweep sends again: only the caller's retry
    brings the job back, and a plain OSError would end the delivery for good."""
    log.warning("job %s: storage error %s before the run started; retried later", job_id,
                type(exc).__name__)
    return TransientStorageError(job_id)


def _run_locked(store: JobStore, job_id: str, settings: Settings,
                interrupted: Callable[[], bool] | None) -> str:
    try:
        started = _start(store, job_id, settings)
    except OSError as exc:
        raise _not_started(job_id, exc) from exc
    if isinstance(started, str):  # ended without running: finished, adopted, cancelled...
        return started
    manifest = started
    canceller = _Canceller(store, job_id, time.monotonic() + settings.soft_time_limit_s,
                           interrupted)
    progress = _ProgressWriter(store, manifest)
    try:
        _fresh_outputs(store.outputs_dir(job_id))
    except OSError as exc:  # 'running' is recorded now: an attempt like any other
        return _storage_failure(store, manifest, settings, exc, progress)
    log.info("job %s: attempt %d started for %s", job_id, manifest.attempts,
             manifest.owner or "anonymous")
    try:
        data = _register(store, manifest, settings, progress, canceller)
    except UnpackBusy:
        # The process is unpacking other zips (the API's header checks share the pool
        # with the embedded worker): busy, not the input's fault.
        return _busy(store, manifest, settings, progress)
    except InputError as exc:
        return _fail(store, manifest, str(exc), "input", progress)
    except CancelledError:
        if canceller.reason == "interrupted":
            manifest.attempts -= 1  # not the job's fault
            _end(store, manifest, "queued", None, progress)
            raise Interrupted(job_id) from None
        if canceller.reason == "deadline":
            return _fail(store, manifest, _time_limit_message(settings), "internal", progress)
        return _end(store, manifest, "cancelled", None, progress)
    except SoftTimeLimitExceeded:
        return _fail(store, manifest, _time_limit_message(settings), "internal", progress)
    except OSError as exc:
        return _storage_failure(store, manifest, settings, exc, progress)
    except Exception as exc:
        # Log the traceback for operators; the user gets the type only (no paths, no data).
        log.exception("job %s: internal error", job_id)
        return _fail(store, manifest, f"internal error: {type(exc).__name__}", "internal",
                     progress)
    progress.finish()
    return _succeed(store, manifest, data)


def _start(store: JobStore, job_id: str, settings: Settings) -> Manifest | str:
    """Under the job's lock: the end state of a job that needs no run (finished, result
    adopted, cancelled, out of attempts), else its manifest, recorded as 'running'.
    OSError as raised (before 'running' is written nothing durable has changed)."""
    manifest = store.read(job_id)
    if manifest.state in TERMINAL_STATES:
        return manifest.state
    result_path = store.outputs_dir(job_id) / RESULT_JSON
    if result_path.is_file():  # a run finished but died before recording it
        return _succeed(store, manifest, _load_json(result_path))
    if store.cancel_requested(job_id):
        return _end(store, manifest, "cancelled")
    if manifest.attempts >= settings.max_attempts:
        return _fail(store, manifest,
                     f"gave up after {manifest.attempts} attempts: the worker running this job "
                     "was lost (killed, out of memory or past the hard time limit) or storage "
                     "kept failing", "internal")
    manifest.attempts += 1
    manifest.state = "running"
    manifest.started_at = manifest.started_at or now()
    manifest.progress = Progress(stage="read", fraction=0.0)
    manifest.stage_seconds = {}
    manifest.error = None
    manifest.error_kind = None
    store.write(manifest)
    return manifest


def _fresh_outputs(outputs: Path) -> None:
    """An empty result folder: leftovers of a run that was cut off are incomplete by
    definition (no result.json), and so are the staging folders that the result writer
    (registration/results/outputs.py) leaves beside it when its process is killed mid-write
    (``.outputs.partial-*``, ``.outputs.old-*``)."""
    shutil.rmtree(outputs, ignore_errors=True)
    for stale in outputs.parent.glob(f".{outputs.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    outputs.mkdir(parents=True, exist_ok=True)


def _register(store: JobStore, manifest: Manifest, settings: Settings,
              progress: _ProgressWriter, canceller: _Canceller) -> dict[str, Any]:
    # The engine is imported here, in the process that runs jobs, never in a
    # parent that forks: nothing of it (ONNX sessions, numba threads) exists before fork.
    from disa.core.io.limits import InputLimits
    from disa.registration.options import RegistrationOptions
    from disa.registration.runner import run_registration

    folder = store.job_dir(manifest.id)
    paths = {role: folder / rel for role, rel in manifest.inputs.items()}
    for path in paths.values():  # inputs are server-named files directly under inputs/
        if path.parent != folder / INPUTS_DIR:
            raise InputError("job inputs are malformed")
    options = RegistrationOptions.model_validate(manifest.options)
    # One voxel cap, DISA_MAX_VOXELS, handed over once: the engine applies it to the
    # inputs and to its working grids, as the API checked at submission (runner.py).
    return run_registration(paths["fixed"], paths["moving"],
                            store.outputs_dir(manifest.id), options,
                            paths.get("fixed_mask"), paths.get("moving_mask"),
                            progress=progress, cancel=canceller,
                            limits=InputLimits(max_voxels=settings.max_voxels),
                            fixed_series_uid=manifest.series.get("fixed"),
                            moving_series_uid=manifest.series.get("moving"),
                            initial_transform_path=paths.get("initial_transform"))


def _storage_failure(store: JobStore, manifest: Manifest, settings: Settings, exc: OSError,
                     progress: _ProgressWriter) -> str:
    """Shared storage failed: queue the job again while attempts remain, else fail it."""
    log.warning("job %s: storage error %s (attempt %d of %d)", manifest.id,
                type(exc).__name__, manifest.attempts, settings.max_attempts)
    if manifest.attempts < settings.max_attempts:
        # If even this write fails, the retry still happens and the manifest catches up then.
        with contextlib.suppress(OSError):
            _end(store, manifest, "queued", None, progress)
        raise TransientStorageError(manifest.id) from exc
    return _fail(store, manifest, f"internal error: {type(exc).__name__}", "internal", progress)


def _busy(store: JobStore, manifest: Manifest, settings: Settings,
          progress: _ProgressWriter) -> str:
    """The unpack pool stayed full: queue the job again while attempts remain (the caller
    retries later, with back-off), else fail it as an internal error."""
    log.warning("job %s: the DICOM unpack pool stayed full (attempt %d of %d)", manifest.id,
                manifest.attempts, settings.max_attempts)
    if manifest.attempts < settings.max_attempts:
        with contextlib.suppress(OSError):
            _end(store, manifest, "queued", None, progress)
        raise TransientBusyError(manifest.id)
    return _fail(store, manifest, "internal error: the server stayed busy unpacking other "
                 "DICOM zips (DISA_UNPACK_POOL_BYTES); submit the job again later",
                 "internal", progress)


def _succeed(store: JobStore, manifest: Manifest, data: dict[str, Any]) -> str:
    manifest.result = {k: data[k] for k in SUMMARY_KEYS if k in data}
    manifest.files = [n for n in data.get("files", []) if n in RESULT_FILES]
    manifest.progress = Progress(stage="done", fraction=1.0)
    return _end(store, manifest, "succeeded")


def _fail(store: JobStore, manifest: Manifest, error: str, kind: ErrorKind,
          progress: _ProgressWriter | None = None) -> str:
    """Record a failure: `error` for the user, `kind` for programs (see Manifest.error_kind)."""
    return _end(store, manifest, "failed", error, progress, kind)


def _end(store: JobStore, manifest: Manifest, state: str, error: str | None = None,
         progress: _ProgressWriter | None = None, kind: ErrorKind | None = None) -> str:
    """Record an end state (or the return to 'queued') durably."""
    if progress is not None:
        progress.finish()
    manifest.state = state  # type: ignore[assignment]
    manifest.error = error
    manifest.error_kind = kind
    if state == "queued":
        manifest.progress = Progress(stage="queued", fraction=0.0)
    else:
        manifest.finished_at = now()
    store.write(manifest)
    log.info("job %s: %s (owner %s)", manifest.id, state, manifest.owner or "anonymous")
    return state


def _time_limit_message(settings: Settings) -> str:
    return f"time limit exceeded: the job ran longer than {settings.soft_time_limit_s} s"


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
