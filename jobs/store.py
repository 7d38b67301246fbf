"""The job store: one folder per job on shared storage, the system of record.

    <jobs_dir>/<id>/manifest.json    state, progress, options, timings, result summary, error
    <jobs_dir>/<id>/inputs/          uploads under server-chosen names (fixed.nii.gz, ...)
    <jobs_dir>/<id>/outputs/         the engine's result folder
    <jobs_dir>/<id>/cancel           flag file: a cancel was requested
    <jobs_dir>/<id>/.lock            flock held by whoever runs or changes the job
    <jobs_dir>/.incoming/<id>/       a job being uploaded; renamed into place when complete

Redis carries only job ids. Every manifest change happens under the job's lock
(a worker holds it for the whole run), so there is one writer at a time;
readers never lock and always see a whole file (temp file + fsync + os.replace).
Shared by the API and the worker: no FastAPI here.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from disa.core.atomic import fsync_dir, write_json
from disa.core.result_files import RESULT_FILE, SERVED_FILES
from disa.jobs.manifest import (
    JobNotFound,
    Manifest,
    check_job_id,
    is_job_id,
    now,
)

log = logging.getLogger("disa.store")

MANIFEST_FILE = "manifest.json"
CANCEL_FILE = "cancel"
LOCK_FILE = ".lock"
INPUTS_DIR = "inputs"
OUTPUTS_DIR = "outputs"
INCOMING_DIR = ".incoming"

#: The result-folder names the API may serve, with their content types. Nothing
#: else under a job folder is ever served, whatever a URL asks for. One list with the
#: names the engine writes (disa.core.result_files), so that a new result file is one row.
RESULT_FILES: dict[str, str] = SERVED_FILES
RESULT_JSON = RESULT_FILE


class JobLock:
    """An exclusive flock on a job folder's lock file. `with store.lock(id) as lock:`
    does not take it (call acquire()); leaving the block releases it.

    flock (not fcntl record locks) because two threads of one process (the
    embedded worker and the API) must exclude each other too. The kernel drops
    the lock when its holder dies, which is how a lost worker is recognised.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to `timeout` seconds; False if someone else holds it."""
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError as exc:  # the job folder is gone
            raise JobNotFound(self._path.parent.name) from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
                continue
            self._fd = fd
            return True

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class JobStore:
    """Job folders under one root. Safe to use from several processes and machines
    that share the root (flock must work on the shared file system)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        (self.root / INCOMING_DIR).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- paths

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job (not checked for existence)."""
        return self.root / check_job_id(job_id)

    def outputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / OUTPUTS_DIR

    def incoming_dir(self, job_id: str) -> Path:
        """Staging folder of a job still being uploaded."""
        return self.root / INCOMING_DIR / check_job_id(job_id)

    def exists(self, job_id: str) -> bool:
        try:
            return (self.job_dir(job_id) / MANIFEST_FILE).is_file()
        except JobNotFound:
            return False

    # ------------------------------------------------------------ creation

    def create_incoming(self, job_id: str) -> Path:
        """Make the staging folder of a new job (with its inputs/ folder) and return it."""
        folder = self.incoming_dir(job_id)
        (folder / INPUTS_DIR).mkdir(parents=True)
        return folder

    def publish(self, manifest: Manifest) -> None:
        """Write the manifest into the staging folder and move the job into place.

        The rename is atomic: a job appears in the store complete, with its
        inputs and manifest, or not at all. The input files were fsynced as they
        were uploaded; their folder entries are fsynced here, so a job that
        survives a power cut has its inputs too.
        """
        staging = self.incoming_dir(manifest.id)
        fsync_dir(staging / INPUTS_DIR)
        (staging / OUTPUTS_DIR).mkdir(exist_ok=True)
        write_json(manifest.model_dump(mode="json"), staging / MANIFEST_FILE, indent=1)
        os.rename(staging, self.job_dir(manifest.id))
        fsync_dir(self.root)

    def discard_incoming(self, job_id: str) -> None:
        """Remove a staging folder (failed or rejected upload)."""
        shutil.rmtree(self.incoming_dir(job_id), ignore_errors=True)

    # ------------------------------------------------------------- records

    def read(self, job_id: str) -> Manifest:
        """The manifest of a job; JobNotFound if there is none."""
        path = self.job_dir(job_id) / MANIFEST_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise JobNotFound(job_id) from exc
        return Manifest.model_validate_json(text)

    def write(self, manifest: Manifest, durable: bool = True) -> None:
        """Replace a job's manifest atomically. Callers hold the job's lock.

        `durable=False` skips the fsyncs: for progress updates, whose loss in a
        crash costs nothing, so that frequent updates stay cheap on network
        storage.
        """
        manifest.updated_at = now()
        folder = self.job_dir(manifest.id)
        if not folder.is_dir():
            raise JobNotFound(manifest.id)
        write_json(manifest.model_dump(mode="json"), folder / MANIFEST_FILE, indent=1,
                   durable=durable)

    def ids(self) -> list[str]:
        """Ids of all published jobs (unordered)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return [e.name for e in entries if is_job_id(e.name) and e.is_dir()]

    def manifests(self) -> Iterator[Manifest]:
        """Every readable manifest; jobs deleted or corrupt meanwhile are skipped."""
        for job_id in self.ids():
            try:
                yield self.read(job_id)
            except JobNotFound:
                continue
            except (ValidationError, ValueError, OSError) as exc:
                log.warning("job %s: unreadable manifest (%s)", job_id, type(exc).__name__)

    def lock(self, job_id: str) -> JobLock:
        """The lock of a job (not yet acquired)."""
        return JobLock(self.job_dir(job_id) / LOCK_FILE)

    # -------------------------------------------------------------- cancel

    def request_cancel(self, job_id: str) -> None:
        """Leave the cancel flag that the running worker's cancel() looks for."""
        path = self.job_dir(job_id) / CANCEL_FILE
        try:
            path.touch()
        except FileNotFoundError as exc:
            raise JobNotFound(job_id) from exc

    def cancel_requested(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / CANCEL_FILE).exists()

    # ------------------------------------------------------------- results

    def result_path(self, job_id: str, name: str) -> Path | None:
        """Path of a servable result file, or None (unknown name, absent file, or not a
        regular file: a symbolic link, at the file or at its outputs folder, is never
        followed, so a link planted in a job folder cannot serve files from elsewhere)."""
        if name not in RESULT_FILES:
            return None
        outputs = self.outputs_dir(job_id)
        path = outputs / name
        try:
            if not all(stat.S_ISDIR(os.lstat(folder).st_mode)
                       for folder in (outputs.parent, outputs)):
                return None
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def delete(self, job_id: str) -> None:
        """Remove a job folder. The folder is first renamed aside so that a
        half-deleted job is never mistaken for a live one."""
        folder = self.job_dir(job_id)
        trash = self.root / INCOMING_DIR / f"{job_id}.deleted-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError as exc:
            raise JobNotFound(job_id) from exc
        shutil.rmtree(trash, ignore_errors=True)

    def remove_stale_incoming(self, older_than_s: float) -> int:
        """Delete staging leftovers (uploads cut off by a crash) older than this; count them."""
        removed = 0
        limit = time.time() - older_than_s
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / INCOMING_DIR):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < limit:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)
                        removed += 1
        return removed

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created and fsynced in the root."""
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=self.root / INCOMING_DIR)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
