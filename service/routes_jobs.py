"""/v1/jobs: submit, inspect, list, cancel or delete registration jobs, fetch results.

Every job belongs to the API key that submitted it (`Manifest.owner`); other keys
get 404 on all of its routes and do not see it in the list, admin keys see all.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from disa.jobs.manifest import TERMINAL_STATES, JobNotFound, JobState, Manifest, new_job_id, now
from disa.jobs.store import INPUTS_DIR, RESULT_FILES, JobStore
from disa.service.deps import (
    CallerDep,
    JobIdPath,
    RuntimeDep,
    StoreDep,
    read_visible,
    require_api_key,
)
from disa.service.engine_surface import InputError
from disa.service.metrics import owner_label
from disa.service.models import JobListOut, JobOut, error_responses
from disa.service.runtime import Runtime
from disa.service.security import Caller
from disa.service.upload_slots import TooManyUploads
from disa.service.uploads import (
    FILE_FIELDS,
    TEXT_FIELDS,
    TRANSFORM_FIELD,
    UploadError,
    receive_upload,
)
from disa.service.validation import describe_all

log = logging.getLogger("disa.service")

#: Bytes the header checks of one request's DICOM zips may decompress together (they
#: read headers only, stopping at the pixel data; see disa.core.io.dicom_zip).
UNPACK_BUDGET_BYTES = 4 * 1024**3
#: Retry-After of a 503 answered while the process's unpack pool stays full.
UNPACK_RETRY_AFTER_S = 5

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401, 403))

_SUBMIT_BODY: dict[str, Any] = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["fixed", "moving"],
        "properties": {
            **{role: {"type": "string", "format": "binary",
                      "description": f"{role.replace('_', ' ')} image: .nii.gz, .nii, .nrrd, "
                                     ".mha or a DICOM series as .zip (the file name's "
                                     "extension decides the format)"}
               for role in FILE_FIELDS if role != TRANSFORM_FIELD},
            TRANSFORM_FIELD: {
                "type": "string", "format": "binary",
                "description": "optional initial pose: an ITK text transform (.tfm or .txt, "
                               "at most 1 MiB) mapping fixed points to moving points (LPS mm, "
                               "as a result's transform.tfm); linear (rigid, similarity, "
                               "affine or a composite of them) and invertible"},
            **{f"{role}_series_uid": {
                "type": "string", "maxLength": TEXT_FIELDS[f"{role}_series_uid"],
                "description": f"SeriesInstanceUID of the {role} series when the {role} "
                               "zip holds several DICOM series"} for role in ("fixed", "moving")},
            "options": {"type": "string", "maxLength": TEXT_FIELDS["options"],
                        "description": "registration options as JSON, names as the CLI's "
                                       "with underscores, e.g. {\"mode\": \"rigid\", "
                                       "\"starts\": 500}"},
        },
    }}},
}


def _job_out(store: JobStore, manifest: Manifest) -> JobOut:
    try:
        flagged = store.cancel_requested(manifest.id)
    except (JobNotFound, OSError):
        flagged = False
    return JobOut.from_manifest(manifest, cancel_requested=flagged)


@router.post("", status_code=202, response_model=JobOut,
             summary="Submit a registration job",
             openapi_extra={"requestBody": _SUBMIT_BODY},
             responses={202: {"description": "accepted; poll the Location URL",
                              "headers": {"Location": {"description": "URL of the job",
                                                       "schema": {"type": "string"}}}},
                        **error_responses(400, 408, 413, 415, 422, 429, 503, 507)})
async def submit_job(request: Request, response: Response, runtime: RuntimeDep,
                     caller: CallerDep) -> JobOut:
    """Upload fixed and moving images (optional masks, initial transform, options JSON);
    headers and the transform are checked before the job is queued. Answers 202 with
    the job and its Location. The job belongs to the API key that sent it."""
    job_id = new_job_id()
    try:
        with runtime.uploads.hold(caller.owner):
            manifest = await _receive_job(request, runtime, caller, job_id)
    except TooManyUploads as exc:
        log.warning("upload refused for %s: %d in progress", owner_label(caller.owner),
                    exc.limit)
        raise HTTPException(status_code=429, detail=str(exc),
                            headers={"Retry-After": "2"}) from None
    runtime.metrics.submitted.labels(owner=owner_label(manifest.owner)).inc()
    await run_in_threadpool(runtime.dispatch, job_id)
    response.headers["Location"] = str(request.url_for("get_job", job_id=job_id).path)
    log.info("job %s: queued for %s", job_id, owner_label(manifest.owner))
    return _job_out(runtime.store, manifest)


async def _receive_job(request: Request, runtime: Runtime, caller: Caller,
                       job_id: str) -> Manifest:
    """Stream the upload into the job's staging folder, check it and publish the job; on any
    error the staging folder is removed and the error answered (HTTPException)."""
    store = runtime.store
    settings = runtime.settings
    try:
        staging = await run_in_threadpool(store.create_incoming, job_id)
        upload = await receive_upload(request, staging / INPUTS_DIR, settings.max_upload_bytes,
                                      settings.upload_idle_timeout_s)
        options = _parse_options(upload.fields.get("options"))
        series = _parse_series(upload.fields)
        info = await run_in_threadpool(_inspect_inputs, upload.files, runtime, series)
        _check_working_grid(options, info, settings.max_voxels)
        t = now()
        manifest = Manifest(
            id=job_id, owner=caller.owner, created_at=t, updated_at=t,
            inputs={role: f"{INPUTS_DIR}/{path.name}" for role, path in upload.files.items()},
            input_info=info, options=options, series=series)
        await run_in_threadpool(store.publish, manifest)
    except UploadError as exc:
        await run_in_threadpool(store.discard_incoming, job_id)
        if exc.status == 408:
            log.warning("job %s: upload of %s stalled; staging removed", job_id,
                        owner_label(caller.owner))
        headers = dict(exc.headers or {})
        if exc.status == 408:
            headers["Connection"] = "close"
        raise HTTPException(status_code=exc.status, detail=exc.detail,
                            headers=headers or None) from None
    except OSError as exc:
        # The jobs folder failed us (full, quota, I/O error), not the client's body.
        # Only this job's staging folder is removed; published jobs are never touched.
        await run_in_threadpool(store.discard_incoming, job_id)
        log.warning("job %s: upload not stored (%s)", job_id, type(exc).__name__)
        raise HTTPException(status_code=507, detail="jobs storage cannot take the upload "
                                                    f"({exc.strerror or type(exc).__name__})"
                            ) from None
    except BaseException:
        await run_in_threadpool(store.discard_incoming, job_id)
        raise
    return manifest


def _parse_options(text: str | None) -> dict[str, Any]:
    """Validate the options JSON with the engine's RegistrationOptions; 422 on any problem,
    a number given as a string or boolean and a NaN among them."""
    from disa.service.engine_surface import RegistrationOptions

    try:
        # Strict: "10" or true for a number is refused, not converted (JSON numbers only).
        options = RegistrationOptions.model_validate_json(text or "{}", strict=True)
    except ValidationError as exc:
        problems = describe_all({**e, "loc": e["loc"] or ("options",)}
                                for e in exc.errors(include_url=False))
        raise UploadError(422, f"invalid options: {problems}") from None
    return options.model_dump(mode="json")


def _check_working_grid(options: dict[str, Any], info: dict[str, dict[str, Any]],
                        max_voxels: int) -> None:
    """422 naming working_spacing when the fixed or moving image resampled to it would hold
    more than `max_voxels` voxels: the worker's first step allocates that grid (float32,
    several copies), so a tiny spacing would cost many GB. Sizes in voxels, spacings in mm."""
    from disa.service.engine_surface import check_working_grid, working_grid_size

    spacing = options.get("working_spacing")
    if spacing is None:  # the engine checks the grids of its own choice as it makes them
        return
    for role in ("fixed", "moving"):
        size = working_grid_size(info[role]["size"], info[role]["spacing"], spacing)
        try:
            check_working_grid(size, spacing, max_voxels, option="working_spacing", role=role)
        except InputError as exc:
            raise UploadError(422, str(exc)) from None


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _parse_series(fields: dict[str, str]) -> dict[str, str]:
    """Chosen DICOM series per role; 422 unless each is a well-formed UID (digits and dots)."""
    series: dict[str, str] = {}
    for role in ("fixed", "moving"):
        uid = (fields.get(f"{role}_series_uid") or "").strip()
        if not uid:
            continue
        if not _UID.match(uid):
            raise UploadError(422, f"{role}_series_uid is not a DICOM UID (digits and dots)")
        series[role] = uid
    return series


def _inspect_inputs(files: dict, runtime: Runtime, series: dict[str, str] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Header checks of every input (no pixels decoded); keep only geometry facts. The
    initial transform is read whole (at most 1 MiB) and checked as the worker will.

    What the DICOM zips' header reads decompress counts against one budget for the
    request (UNPACK_BUDGET_BYTES, 422 past it); a zip that finds the process's unpack
    pool full for DISA_UNPACK_WAIT_S is a 503 with Retry-After (busy, not a bad input)."""
    from disa.service.engine_surface import InputLimits, UnpackBusy, inspect_image, unpack_budget

    limits = InputLimits(max_voxels=runtime.settings.max_voxels)
    info: dict[str, dict[str, Any]] = {}
    with unpack_budget(UNPACK_BUDGET_BYTES):
        for role, path in files.items():
            if role == TRANSFORM_FIELD:
                info[role] = _inspect_transform(path)
                continue
            try:
                facts = inspect_image(path, limits, series_uid=(series or {}).get(role))
            except UnpackBusy as exc:
                raise UploadError(503, str(exc),
                                  {"Retry-After": str(UNPACK_RETRY_AFTER_S)}) from None
            except InputError as exc:
                raise UploadError(422, str(exc)) from None
            info[role] = {"format": facts.format, "size": list(facts.size),
                          "spacing": list(facts.spacing), "modality": facts.modality,
                          "geometry_correction": facts.geometry_correction}
    return info


def _inspect_transform(path: Path) -> dict[str, Any]:
    """422 unless `path` holds a linear, invertible, finite ITK text transform; its facts
    for the job JSON: the format and the 4x4 matrix (fixed -> moving, LPS mm)."""
    from disa.service.engine_surface import read_initial_transform, transform_matrix

    try:
        transform = read_initial_transform(path, allow_hdf5=False)
    except InputError as exc:
        raise UploadError(422, str(exc)) from None
    return {"format": "itk-text", "matrix_fixed_to_moving": transform_matrix(transform)}


@router.get("", response_model=JobListOut, summary="List jobs, newest first",
            responses=error_responses(422))
def list_jobs(store: StoreDep, caller: CallerDep,
              offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              state: Annotated[JobState | None, Query(description="only jobs in this state")]
              = None) -> JobListOut:
    manifests = [m for m in store.manifests()
                 if caller.sees(m.owner) and (state is None or m.state == state)]
    manifests.sort(key=lambda m: m.created_at, reverse=True)
    page = manifests[offset:offset + limit]
    return JobListOut(items=[_job_out(store, m) for m in page], total=len(manifests),
                      offset=offset, limit=limit)


@router.get("/{job_id}", response_model=JobOut, summary="State, progress and result of a job",
            responses=error_responses(404, 422))
async def get_job(job_id: JobIdPath, store: StoreDep, caller: CallerDep) -> JobOut:
    # The hot path of polling clients: two small reads (manifest, cancel flag) done
    # on the event loop. A thread-pool hop per poll halved throughput and made the
    # p99 six times worse on a busy 2-core machine (benchmarks/service_poll.py).
    return _job_out(store, read_visible(store, job_id, caller))


@router.get("/{job_id}/files/{name}", response_class=FileResponse,
            summary="Download a result file",
            responses={200: {"description": "the file", "content": {
                ctype.split(";")[0]: {} for ctype in RESULT_FILES.values()}},
                **error_responses(404, 409, 422)})
def get_job_file(job_id: JobIdPath, name: str, store: StoreDep,
                 caller: CallerDep) -> FileResponse:
    """One of the result folder's files (transform.tfm, registered.nii.gz, qa.png,
    result.json, ...); 409 until the job has succeeded. Only regular files are served:
    a symbolic link in the result folder is a 404."""
    manifest = read_visible(store, job_id, caller)
    if name not in RESULT_FILES:
        raise HTTPException(status_code=404, detail=f"no result file named '{name[:40]}'; "
                                                    f"known: {', '.join(RESULT_FILES)}")
    if manifest.state != "succeeded":
        raise HTTPException(status_code=409, detail=f"job is {manifest.state}: "
                                                    "results exist only once it has succeeded")
    path = store.result_path(job_id, name) if name in manifest.files else None
    if path is None:
        raise HTTPException(status_code=404, detail=f"this job has no '{name}'")
    return FileResponse(path, media_type=RESULT_FILES[name], filename=name)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             summary="Cancel a queued or running job",
             responses={202: {"description": "cancelled (queued job), or cancel requested "
                                             "(running job: it stops at its next optimiser "
                                             "iteration); also for a job already cancelled"},
                        **error_responses(404, 409, 422)})
def cancel_job(job_id: JobIdPath, store: StoreDep, caller: CallerDep) -> JobOut:
    """A queued job is cancelled at once; a running one gets the cancel flag its worker
    looks for between optimiser iterations. Repeating it is harmless (202 again); a job
    that succeeded or failed is a 409 (DELETE removes it)."""
    manifest = read_visible(store, job_id, caller)
    if manifest.state in ("succeeded", "failed"):
        raise HTTPException(status_code=409, detail=f"job is {manifest.state}: nothing to "
                                                    "cancel (DELETE removes it)")
    if manifest.state == "cancelled":
        return _job_out(store, manifest)
    # Cooperative cancel: the worker's cancel() sees the flag between optimiser
    # iterations. If nobody holds the lock, no worker runs the job: end it here.
    try:
        store.request_cancel(job_id)
        with store.lock(job_id) as lock:
            if lock.acquire(timeout=0.0):
                manifest = store.read(job_id)
                if manifest.state not in TERMINAL_STATES:
                    manifest.state = "cancelled"
                    manifest.finished_at = now()
                    store.write(manifest)
            else:
                manifest = store.read(job_id)
    except JobNotFound:
        raise HTTPException(status_code=404, detail="no such job") from None
    log.info("job %s: cancel requested by %s", job_id, owner_label(caller.owner))
    return _job_out(store, manifest)


@router.delete("/{job_id}", status_code=204, response_class=Response,
               summary="Delete a finished job and its files",
               responses={204: {"description": "deleted"},
                          **error_responses(404, 409, 422)})
def delete_job(job_id: JobIdPath, store: StoreDep, caller: CallerDep) -> Response:
    """Remove a succeeded, failed or cancelled job with its inputs and results. A queued or
    running job is a 409: cancel it first (POST /v1/jobs/{id}/cancel)."""
    manifest = read_visible(store, job_id, caller)
    if manifest.state not in TERMINAL_STATES:
        raise HTTPException(status_code=409, detail=f"job is {manifest.state}: cancel it "
                                                    f"first (POST /v1/jobs/{job_id}/cancel); "
                                                    "DELETE removes finished jobs only")
    try:
        with store.lock(job_id) as lock:
            if not lock.acquire(timeout=5.0):
                raise HTTPException(status_code=409, detail="job is busy; try again")
            store.delete(job_id)
    except JobNotFound:
        raise HTTPException(status_code=404, detail="no such job") from None
    log.info("job %s: deleted by %s", job_id, owner_label(caller.owner))
    return Response(status_code=204)
