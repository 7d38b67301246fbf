"""`disa serve` (the API, with an embedded worker when no broker is set) and `disa submit`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from disa.cli_options import add_option_arguments, options_from_args
from disa.core.environment import Environment
from disa.service.client_key import add_api_key_arguments, api_key_from
from disa.service.engine_surface import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, InputError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `disa serve` and `disa submit` with the main CLI."""
    _add_serve(sub)
    _add_submit(sub)


# ------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST API (and a worker, when no broker is set)",
                       description="Run the DISA REST API. Without DISA_BROKER_URL it also runs "
                                   "jobs itself (one at a time); with it, `disa worker` "
                                   "processes run them. Settings: DISA_* environment variables.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--jobs-dir", type=Path, default=None,
                   help="job folders (default: DISA_JOBS_DIR, ./disa-jobs)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"])
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from disa.jobs.settings import get_settings

    if args.jobs_dir is not None:
        os.environ["DISA_JOBS_DIR"] = str(args.jobs_dir)
        get_settings.cache_clear()
    get_settings()  # bad settings fail here, as one line, before the server starts
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from disa.service.app import create_app

    # One process: the embedded worker and the sweeper live in it.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level,
                proxy_headers=True, timeout_graceful_shutdown=30)
    return EXIT_OK


# ------------------------------------------------------------------ submit


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="send a registration to a DISA service",
                       description="Upload FIXED and MOVING to a DISA service; with --wait, "
                                   "show progress and download the result folder.")
    p.add_argument("fixed", type=Path, help="fixed image (NIfTI, NRRD, .mha, DICOM folder/.zip)")
    p.add_argument("moving", type=Path, help="moving image (same formats)")
    url = Environment.read().url
    p.add_argument("--url", default="http://127.0.0.1:8000" if url is None else url,
                   help="service URL (default: DISA_URL or http://127.0.0.1:8000)")
    add_api_key_arguments(p)
    p.add_argument("--wait", action="store_true", help="wait for the job to end")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="download the result folder here (implies --wait)")
    p.add_argument("--poll", type=float, default=1.0, metavar="S", help="poll period (s)")
    p.add_argument("--fixed-mask", type=Path, default=None, metavar="F")
    p.add_argument("--moving-mask", type=Path, default=None, metavar="M")
    p.add_argument("--fixed-series-uid", default=None, metavar="UID",
                   help="series to use when FIXED is a DICOM folder/zip with several")
    p.add_argument("--moving-series-uid", default=None, metavar="UID",
                   help="series to use when MOVING is a DICOM folder/zip with several")
    p.add_argument("--initial-transform", type=Path, default=None, metavar="FILE",
                   help="ITK text transform (.tfm, .txt) mapping fixed to moving points "
                        "(LPS mm), or an earlier result folder: the pose to start from "
                        "(as disa register)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    add_option_arguments(p)
    p.set_defaults(handler=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    from disa.progress import progress_reporter
    from disa.service.client import DisaClient, ServiceError

    options = options_from_args(args)
    api_key = api_key_from(args)
    wait = args.wait or args.output is not None
    try:
        with DisaClient(args.url, api_key=api_key) as client:
            job = client.submit(args.fixed, args.moving, options, args.fixed_mask,
                                args.moving_mask, fixed_series_uid=args.fixed_series_uid,
                                moving_series_uid=args.moving_series_uid,
                                initial_transform=args.initial_transform)
            print(f"job {job['id']} {job['state']}", flush=True)
            if not wait:
                return EXIT_OK
            with progress_reporter(quiet=args.quiet) as report:
                job = client.wait(job["id"], poll_s=args.poll, on_progress=report)
            if job["state"] != "succeeded":
                return _report_failure(job)
            _print_result(job)
            if args.output is not None:
                paths = client.download(job["id"], args.output)
                print(f"results in {args.output}/ : {', '.join(p.name for p in paths)}")
    except ServiceError as exc:
        if 400 <= exc.status_code < 500:
            raise InputError(f"service refused the job: {exc.detail}") from None
        return _service_failure(f"service error {exc.status_code}: {exc.detail}")
    except ValueError as exc:  # the client refused a file type before uploading
        raise InputError(str(exc)) from None
    except _connection_errors() as exc:  # unreachable, or a request timed out while polling
        return _service_failure(f"cannot reach {args.url}: {type(exc).__name__}")
    return EXIT_OK


def _service_failure(message: str) -> int:
    """The service (not the input) failed: one line, exit 1; the same files may work later."""
    print(f"disa: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_INTERNAL


def _connection_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TransportError,)


def _report_failure(job: dict[str, Any]) -> int:
    if job["state"] == "cancelled":
        print(f"disa: job {job['id']} was cancelled", file=sys.stderr)
        return EXIT_INTERNAL
    message = job.get("error") or "failed"
    print(f"disa: error: job {job['id']} failed: {message}", file=sys.stderr)
    return EXIT_INPUT if _error_kind(job) == "input" else EXIT_INTERNAL


#: Failure messages of services older than `error_kind` that are not about the input.
_INTERNAL_MESSAGES = ("internal error", "gave up after", "time limit exceeded")


def _error_kind(job: dict[str, Any]) -> str:
    """'input' or 'internal': the job's error_kind, or for a service that predates that
    field, what its message says."""
    kind = job.get("error_kind")
    if kind in ("input", "internal"):
        return kind
    return "internal" if (job.get("error") or "").startswith(_INTERNAL_MESSAGES) else "input"


def _print_result(job: dict[str, Any]) -> None:
    """The verdict first (the same line as `disa register` prints), then the run's figures."""
    from disa.service.engine_surface import verdict_line

    r = job.get("result") or {}
    run_s = job.get("timings", {}).get("run_s") or 0.0
    line = verdict_line(r)
    if line:
        print(f"verdict: {line}" + ("" if r.get("verdict") == "likely"
                                    else f"\n  why: {r.get('verdict_reason', '')}"))
    print(f"{r.get('mode')} registration with {r.get('similarity')}: similarity "
          f"{r.get('similarity_value', float('nan')):.4f}, {run_s:.2f} s on the service")
