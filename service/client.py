"""Python client of the DISA REST service (httpx).

    with DisaClient("http://host:8000", api_key="...") as client:
        job = client.submit("ct.nii.gz", "mr.nii.gz", {"mode": "rigid", "starts": 500})
        job = client.wait(job["id"], on_progress=lambda stage, fraction: ...)
        client.download(job["id"], "result/")

Uploads are streamed from disk; a DICOM series folder is zipped first. Files
are sent under role names (fixed.nii.gz, ...): local file names, which may
carry patient names, never leave the machine.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from disa.core.errors import DisaError

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
#: What the service takes as an initial transform: ITK text (no HDF5, see uploads.py).
_TRANSFORM_EXTENSIONS = (".tfm", ".txt")
#: The transform file of a DISA result folder (registration/results/outputs.py).
_RESULT_TRANSFORM = "transform.tfm"


class ServiceError(DisaError):
    """The service answered with an error status; `detail` is its message."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class DisaClient:
    """Talks to one DISA service. Use as a context manager or call close()."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None,
                 busy_wait_s: float = 600.0) -> None:
        """`busy_wait_s`: how long submit() keeps trying while the service answers 429
        (this key has as many uploads in progress as the service allows) or 503 with a
        Retry-After (busy unpacking DICOM zips)."""
        self.busy_wait_s = busy_wait_s
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport)

    def __enter__(self) -> DisaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ jobs

    def submit(self, fixed: str | Path, moving: str | Path,
               options: Mapping[str, Any] | None = None,
               fixed_mask: str | Path | None = None,
               moving_mask: str | Path | None = None,
               fixed_series_uid: str | None = None,
               moving_series_uid: str | None = None,
               initial_transform: str | Path | None = None) -> dict[str, Any]:
        """Upload a pair (and masks); return the queued job. Options use engine names;
        ``*_series_uid`` choose one series of a DICOM input holding several.
        ``initial_transform``: an ITK text transform (.tfm, .txt) mapping fixed to moving
        points (LPS mm), or a DISA result folder (its transform.tfm), for the search to
        start from; the service checks it (linear, invertible) before queueing the job."""
        import json

        roles = {"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask,
                 "moving_mask": moving_mask}
        with contextlib.ExitStack() as stack:
            # The transform first: a wrong type is refused before a DICOM folder is zipped.
            transform = (_transform_upload(Path(initial_transform))
                         if initial_transform is not None else None)
            parts: dict[str, tuple[str, Path, str]] = {}
            for role, path in roles.items():
                if path is None:
                    continue
                upload = stack.enter_context(_as_upload(Path(path)))
                parts[role] = (f"{role}{_extension(upload)}", upload, "application/octet-stream")
            if transform is not None:
                parts["initial_transform"] = (f"initial_transform{transform[1]}", transform[0],
                                              "text/plain")
            data = {"options": json.dumps(dict(options or {}))}
            for role, uid in (("fixed", fixed_series_uid), ("moving", moving_series_uid)):
                if uid:
                    data[f"{role}_series_uid"] = uid
            return self._json(self._post_job(parts, data))

    def _post_job(self, parts: Mapping[str, tuple[str, Path, str]],
                  data: Mapping[str, str]) -> httpx.Response:
        """POST /v1/jobs; while the service answers 429 (this key's uploads in progress are
        at its limit) or 503 with a Retry-After (busy unpacking other DICOM zips), wait as
        its Retry-After says and send again, for up to `busy_wait_s` seconds in all."""
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            with contextlib.ExitStack() as stack:
                files = {role: (name, stack.enter_context(open(path, "rb")), ctype)
                         for role, (name, path, ctype) in parts.items()}
                response = self._http.post("/v1/jobs", files=files, data=data)
            busy = response.status_code == 429 or (
                response.status_code == 503 and "retry-after" in response.headers)
            if not busy:
                return response
            pause = _retry_after_s(response)
            if time.monotonic() + pause > deadline:
                return response
            time.sleep(pause)

    def job(self, job_id: str) -> dict[str, Any]:
        """State, progress, timings, result summary or error of a job."""
        return self._json(self._http.get(f"/v1/jobs/{job_id}"))

    def jobs(self, offset: int = 0, limit: int = 20, state: str | None = None
             ) -> dict[str, Any]:
        """One page of jobs, newest first."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state:
            params["state"] = state
        return self._json(self._http.get("/v1/jobs", params=params))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (a running one stops at its next optimiser
        iteration); return it. A job that succeeded or failed: ServiceError 409."""
        return self._json(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def delete(self, job_id: str) -> None:
        """Delete a finished job with its files. A queued or running job: ServiceError 409
        (cancel it first)."""
        response = self._http.delete(f"/v1/jobs/{job_id}")
        if response.status_code != 204:
            self._json(response)

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None,
             on_progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
        """Poll until the job ends; return its final JSON. TimeoutError past `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job["progress"]["stage"], job["progress"]["fraction"])
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, job_id: str, outdir: str | Path,
                 names: list[str] | None = None) -> list[Path]:
        """Fetch result files (default: all the job lists) into `outdir`; return the paths.

        Each file is streamed to a temporary name and renamed into place, so an
        interrupted download never leaves a truncated file under a real name.
        """
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        names = names if names is not None else self.job(job_id)["files"]
        written = []
        for name in names:
            if "/" in name or name.startswith("."):
                raise ValueError(f"unexpected result file name {name!r}")
            target = outdir / name
            fd, tmp = tempfile.mkstemp(prefix=".part-", dir=outdir)
            try:
                with os.fdopen(fd, "wb") as f, \
                        self._http.stream("GET", f"/v1/jobs/{job_id}/files/{name}") as r:
                    if r.status_code >= 400:
                        r.read()
                        self._json(r)
                    for chunk in r.iter_bytes():
                        f.write(chunk)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            written.append(target)
        return written

    def ready(self) -> dict[str, Any]:
        """The /readyz report (200 or 503 alike)."""
        return self._http.get("/readyz").json()

    # -------------------------------------------------------------- helpers

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                detail = str(response.json().get("detail", response.text))
            except ValueError:
                detail = response.text[:200] or response.reason_phrase
            raise ServiceError(response.status_code, detail)
        return response.json()


def _retry_after_s(response: httpx.Response, default: float = 2.0,
                   longest: float = 60.0) -> float:
    """Seconds to wait as a 429's or 503's Retry-After says (a number of seconds), within
    reason."""
    try:
        seconds = float(response.headers.get("retry-after", default))
    except ValueError:
        seconds = default
    return min(max(seconds, 0.1), longest) if seconds == seconds else default


def _extension(path: Path) -> str:
    lower = path.name.lower()
    for ext in _EXTENSIONS:
        if lower.endswith(ext):
            return ext
    raise ValueError(f"{path.name}: unsupported file type; accepted: {', '.join(_EXTENSIONS)} "
                     "or a DICOM folder")


def _transform_upload(path: Path) -> tuple[Path, str]:
    """The file to send as the initial transform (a result folder's transform.tfm for a
    folder) and its extension; ValueError for a type the service does not take."""
    if path.is_dir():
        if not (path / _RESULT_TRANSFORM).is_file():
            raise ValueError(f"initial transform ({path.name}): a folder without "
                             f"{_RESULT_TRANSFORM}; give a transform file or a DISA result "
                             "folder")
        path = path / _RESULT_TRANSFORM
    ext = path.suffix.lower()
    if ext not in _TRANSFORM_EXTENSIONS:
        raise ValueError(f"initial transform ({path.name}): the service takes ITK text "
                         f"transforms ({', '.join(_TRANSFORM_EXTENSIONS)}); write an .h5 one "
                         "as .tfm with SimpleITK.WriteTransform")
    return path, ext


@contextlib.contextmanager
def _as_upload(path: Path) -> Iterator[Path]:
    """The file to upload for `path`: itself, or a temporary zip of a DICOM folder."""
    if not path.is_dir():
        _extension(path)  # refuse unknown types before sending anything
        yield path
        return
    fd, tmp = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for i, member in enumerate(sorted(p for p in path.rglob("*") if p.is_file())):
                # Member names are numbers: DICOM file names may hold identifiers.
                archive.write(member, f"{i:06d}.dcm")
        yield Path(tmp)
    finally:
        os.unlink(tmp)
