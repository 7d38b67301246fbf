"""Orthanc Python plugin: register series pairs with a DISA service as they arrive.

Loaded by orthanc-python (Debian package), it runs inside Orthanc's own Python
interpreter, so it uses the standard library only. When a series becomes stable
(Orthanc's STABLE_SERIES change) it looks for a partner series in the same study
that a configured rule pairs it with (e.g. fixed CT + moving MR); when both are
stable it submits them to the DISA service, waits in a background thread and
stores the job's registration.dcm back into Orthanc (POST /instances). Series
made by DISA itself (Manufacturer "DISA") are never used as inputs.

Orthanc configuration (JSON):

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so"],
    "PythonScript": "/path/to/disa/pacs/orthanc_plugin.py",
    "Disa": {
      "ServiceUrl": "http://disa:8000",      required
      "ApiKey": "...",                       optional (X-API-Key)
      "Rules": [{"Fixed": "CT", "Moving": "MR"}],
      "Options": {"mode": "rigid"},          job options (engine names)
      "PollSeconds": 2, "TimeoutSeconds": 3600, "Retries": 4, "MaxConcurrentJobs": 2
    }

Logs name Orthanc resource ids and DISA job ids only, never patient data.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

try:  # present only inside Orthanc
    import orthanc  # type: ignore[import-not-found]
except ImportError:  # imported by tests or tools outside Orthanc
    orthanc = None

DISA_MANUFACTURER = "DISA"
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Rule:
    """Pair a stable series of modality `fixed` with one of modality `moving` in its study."""

    fixed: str
    moving: str


@dataclass
class Settings:
    """The "Disa" section of the Orthanc configuration."""

    service_url: str
    api_key: str | None = None
    rules: list[Rule] = field(default_factory=lambda: [Rule("CT", "MR")])
    options: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 2.0
    timeout_s: float = 3600.0
    retries: int = 4
    max_jobs: int = 2

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any]) -> Settings:
        section = configuration.get("Disa") or {}
        url = str(section.get("ServiceUrl") or "").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError('Disa.ServiceUrl must be an http(s) URL')
        rules = [Rule(str(r["Fixed"]).upper(), str(r["Moving"]).upper())
                 for r in section.get("Rules") or [{"Fixed": "CT", "Moving": "MR"}]]
        return cls(url, section.get("ApiKey") or None, rules, dict(section.get("Options") or {}),
                   float(section.get("PollSeconds", 2.0)),
                   float(section.get("TimeoutSeconds", 3600.0)),
                   int(section.get("Retries", 4)), int(section.get("MaxConcurrentJobs", 2)))


@dataclass(frozen=True)
class SeriesFacts:
    """What the pairing needs to know of one Orthanc series."""

    id: str
    modality: str
    stable: bool
    made_by_disa: bool


def pairs_for(new: SeriesFacts, study: list[SeriesFacts], rules: list[Rule]
              ) -> list[tuple[str, str]]:
    """(fixed id, moving id) pairs to register now that series `new` is stable.

    Both members must be stable, not made by DISA, and match a rule; the
    series does not pair with itself.
    """
    if new.made_by_disa or not new.stable:
        return []
    found = []
    for rule in rules:
        for other in study:
            if other.id == new.id or other.made_by_disa or not other.stable:
                continue
            if new.modality == rule.fixed and other.modality == rule.moving:
                found.append((new.id, other.id))
            elif new.modality == rule.moving and other.modality == rule.fixed:
                found.append((other.id, new.id))
    return list(dict.fromkeys(found))


class OrthancApi:
    """The few Orthanc calls the watcher makes (a seam for tests)."""

    def get_json(self, uri: str) -> Any:
        return json.loads(orthanc.RestApiGet(uri))

    def get_bytes(self, uri: str) -> bytes:
        return orthanc.RestApiGet(uri)

    def post_instance(self, data: bytes) -> None:
        orthanc.RestApiPost("/instances", data)

    def log(self, message: str) -> None:
        orthanc.LogWarning(f"DISA: {message}")


class ServiceClient:
    """The DISA REST service over urllib: submit, job status, one result file."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _request(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None, timeout: float = 60.0) -> bytes:
        headers = dict(headers or {})
        if self.settings.api_key:
            headers["X-API-Key"] = self.settings.api_key
        request = urllib.request.Request(self.settings.service_url + path, data=body,
                                         headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def submit(self, fixed_zip: str, moving_zip: str, options: dict[str, Any]) -> str:
        boundary = uuid.uuid4().hex
        with tempfile.TemporaryFile() as body:
            for role, path in (("fixed", fixed_zip), ("moving", moving_zip)):
                body.write((f"--{boundary}\r\nContent-Disposition: form-data; name=\"{role}\"; "
                            f"filename=\"{role}.zip\"\r\nContent-Type: application/zip\r\n\r\n"
                            ).encode())
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        body.write(chunk)
                body.write(b"\r\n")
            body.write((f"--{boundary}\r\nContent-Disposition: form-data; name=\"options\"\r\n\r\n"
                        f"{json.dumps(options)}\r\n--{boundary}--\r\n").encode())
            length = body.tell()
            body.seek(0)
            answer = self._request(
                "POST", "/v1/jobs", body,
                {"Content-Type": f"multipart/form-data; boundary={boundary}",
                 "Content-Length": str(length)}, timeout=600.0)
        return str(json.loads(answer)["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return json.loads(self._request("GET", f"/v1/jobs/{job_id}"))

    def file(self, job_id: str, name: str) -> bytes:
        return self._request("GET", f"/v1/jobs/{job_id}/files/{name}", timeout=600.0)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (429, 502, 503, 504)
    return isinstance(exc, urllib.error.URLError | TimeoutError | ConnectionError)


def with_retries(call: Callable[[], Any], retries: int, what: str,
                 log: Callable[[str], None], base_delay_s: float = 1.0) -> Any:
    """`call`, retried on transient failures with exponential back-off (bounded)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if not _transient(exc) or attempt == retries:
                raise
            delay = min(30.0, base_delay_s * 2**attempt)
            log(f"{what}: {type(exc).__name__}; retrying in {delay:.0f} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


class Watcher:
    """Reacts to stable series: pairs them, runs the jobs, stores the results."""

    def __init__(self, settings: Settings, api: OrthancApi,
                 service: ServiceClient | None = None) -> None:
        self.settings, self.api = settings, api
        self.service = service or ServiceClient(settings)
        self._done: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max(1, settings.max_jobs))
        self.threads: list[threading.Thread] = []

    def facts(self, series_id: str) -> SeriesFacts:
        series = self.api.get_json(f"/series/{series_id}")
        tags = series.get("MainDicomTags", {})
        return SeriesFacts(series_id, str(tags.get("Modality", "")).upper(),
                           bool(series.get("IsStable", False)),
                           str(tags.get("Manufacturer", "")).strip() == DISA_MANUFACTURER)

    def on_stable_series(self, series_id: str) -> None:
        new = self.facts(series_id)
        if new.made_by_disa:
            return
        study_id = self.api.get_json(f"/series/{series_id}")["ParentStudy"]
        others = [self.facts(s) for s in self.api.get_json(f"/studies/{study_id}")["Series"]
                  if s != series_id]
        new = SeriesFacts(new.id, new.modality, True, new.made_by_disa)  # the event says so
        for pair in pairs_for(new, others, self.settings.rules):
            with self._lock:
                if pair in self._done:
                    continue
                self._done.add(pair)
            thread = threading.Thread(target=self._run, args=pair, daemon=True,
                                      name="disa-job")
            self.threads.append(thread)
            thread.start()

    def _run(self, fixed_id: str, moving_id: str) -> None:
        with self._slots:
            try:
                self._register(fixed_id, moving_id)
            except Exception as exc:  # a thread has no caller to raise to
                self.api.log(f"series {fixed_id} + {moving_id}: failed "
                             f"({type(exc).__name__}: {str(exc)[:200]})")

    def _register(self, fixed_id: str, moving_id: str) -> None:
        log = self.api.log
        with tempfile.TemporaryDirectory(prefix="disa-orthanc-") as tmp:
            zips = [self._zip_series(s, os.path.join(tmp, f"{role}.zip"))
                    for role, s in (("fixed", fixed_id), ("moving", moving_id))]
            job_id = with_retries(lambda: self.service.submit(*zips, self.settings.options),
                                  self.settings.retries, "submit", log)
        log(f"job {job_id} submitted for series {fixed_id} (fixed) + {moving_id} (moving)")
        deadline = time.monotonic() + self.settings.timeout_s
        while True:
            job = with_retries(lambda: self.service.job(job_id), self.settings.retries,
                               "job status", log)
            if job["state"] in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                log(f"job {job_id}: still {job['state']} after {self.settings.timeout_s:.0f} s; "
                    "giving up")
                return
            time.sleep(self.settings.poll_s)
        if job["state"] != "succeeded" or "registration.dcm" not in job.get("files", []):
            log(f"job {job_id} {job['state']}: {job.get('error') or 'no registration.dcm'!s}")
            return
        data = with_retries(lambda: self.service.file(job_id, "registration.dcm"),
                            self.settings.retries, "download", log)
        self.api.post_instance(data)
        log(f"job {job_id}: registration stored")

    def _zip_series(self, series_id: str, path: str) -> str:
        """The series' instances as a zip (member names are counters, never UIDs)."""
        instances = self.api.get_json(f"/series/{series_id}")["Instances"]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for i, instance in enumerate(instances):
                archive.writestr(f"{i:06d}.dcm", self.api.get_bytes(f"/instances/{instance}/file"))
        return path


_watcher: Watcher | None = None


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    if _watcher is not None and change_type == orthanc.ChangeType.STABLE_SERIES:
        try:
            _watcher.on_stable_series(resource_id)
        except Exception as exc:  # never let a callback error reach Orthanc
            orthanc.LogError(f"DISA: stable series {resource_id}: {type(exc).__name__}: {exc}")


def _install() -> None:
    global _watcher
    try:
        settings = Settings.from_configuration(json.loads(orthanc.GetConfiguration()))
    except (ValueError, KeyError, TypeError) as exc:
        orthanc.LogError(f"DISA plugin disabled: {exc}")
        return
    _watcher = Watcher(settings, OrthancApi())
    orthanc.RegisterOnChangeCallback(_on_change)
    rules = ", ".join(f"{r.fixed}->{r.moving}" for r in settings.rules)
    orthanc.LogWarning(f"DISA plugin: watching stable series (rules {rules})")


if orthanc is not None:
    _install()
