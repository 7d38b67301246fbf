"""`disa pacs pull` (DICOMweb) and `disa pacs dimse` (C-FIND/C-GET/C-MOVE/C-STORE).

Both fetch a fixed and a moving series from a PACS, register them with a DISA
service, and store registration.dcm (with --store-registered also the
registered series) back into the PACS.

Exit codes: 0 success; 2 bad arguments, a series the PACS does not hold, two
series of different patients (refused before submitting), or a job refused for
its inputs; 1 the PACS or the service unreachable after the retries, or any
other failure. Failures print one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from disa.cli_options import add_option_arguments, options_from_args
from disa.core.environment import Environment
from disa.core.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK
from disa.service.client_key import add_api_key_arguments, api_key_from


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `disa pacs ...` with the main CLI."""
    pacs = sub.add_parser("pacs", help="register two series of a PACS and store the result "
                                       "back (DICOMweb or DIMSE)")
    commands = pacs.add_subparsers(dest="pacs_command", required=True,
                                   parser_class=type(pacs))
    _add_pull(commands)
    _add_dimse(commands)


# ---------------------------------------------------------------- arguments


def _uid(text: str) -> str:
    from disa.pacs.dicomweb import check_uid

    try:
        return check_uid(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text[:60]!r}")
    return text


def _aet(text: str) -> str:
    if not 1 <= len(text) <= 16 or not text.isascii() or "\\" in text or not text.strip():
        raise argparse.ArgumentTypeError(f"not an AE title (1-16 ASCII characters): {text!r}")
    return text


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", type=_uid, required=True, metavar="SERIES_UID",
                   help="SeriesInstanceUID of the fixed series")
    p.add_argument("--moving", type=_uid, required=True, metavar="SERIES_UID",
                   help="SeriesInstanceUID of the moving series")
    p.add_argument("--study", type=_uid, default=None, metavar="STUDY_UID",
                   help="StudyInstanceUID holding both series (default: looked up)")
    url = Environment.read().url
    p.add_argument("--service", type=_url, default=url, required=url is None,
                   help="DISA service URL (default: DISA_URL)")
    add_api_key_arguments(p)
    p.add_argument("--store-registered", action="store_true",
                   help="also store the registered moving image as a new series in the "
                        "fixed frame of reference")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="keep the downloaded result files here")
    p.add_argument("--timeout", type=_positive, default=60.0, metavar="S",
                   help="time limit of one PACS request (default 60 s)")
    p.add_argument("--retries", type=_count, default=4, metavar="N",
                   help="retries of a failed PACS or service call, with exponential "
                        "back-off (default 4)")
    p.add_argument("--retry-delay", type=_positive, default=1.0, metavar="S",
                   help="first back-off delay (default 1 s; doubles, at most 16 s)")
    p.add_argument("--job-timeout", type=_positive, default=3600.0, metavar="S",
                   help="give up waiting for the job after this long (default 3600 s)")
    p.add_argument("--poll", type=_positive, default=1.0, metavar="S",
                   help="job status poll period (default 1 s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_option_arguments(p)


def _add_pull(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "pull", help="DICOMweb: QIDO-RS + WADO-RS to fetch, STOW-RS to store",
        description="Fetch two series with WADO-RS, register them with a DISA service and "
                    "store registration.dcm back with STOW-RS.")
    p.add_argument("--dicomweb", type=_url, required=True, metavar="URL",
                   help="DICOMweb root of the PACS (e.g. http://pacs:8042/dicom-web)")
    p.add_argument("--token", default=None,
                   help="bearer token for the PACS (default: DISA_DICOMWEB_TOKEN)")
    _common(p)
    p.set_defaults(handler=_cmd_pull)


def _add_dimse(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "dimse", help="DIMSE: C-FIND + C-GET (or C-MOVE) to fetch, C-STORE to store",
        description="Fetch two series with C-GET (or C-MOVE to a temporary storage SCP), "
                    "register them with a DISA service and C-STORE registration.dcm back.")
    p.add_argument("--host", required=True, help="PACS host")
    p.add_argument("--port", type=_port, required=True, help="PACS DICOM port")
    p.add_argument("--called-aet", type=_aet, required=True, help="the PACS's AE title")
    p.add_argument("--calling-aet", type=_aet, default="DISA", help="our AE title (DISA)")
    p.add_argument("--retrieve", choices=["get", "move"], default="get",
                   help="C-GET (default) or C-MOVE to our own storage SCP")
    p.add_argument("--listen-host", default="127.0.0.1",
                   help="address of our storage SCP for C-MOVE (default 127.0.0.1)")
    p.add_argument("--listen-port", type=_port, default=11113,
                   help="port of our storage SCP for C-MOVE; the PACS must know our AE title "
                        "at this address (default 11113)")
    _common(p)
    p.set_defaults(handler=_cmd_dimse)


# ----------------------------------------------------------------- commands


def _cmd_pull(args: argparse.Namespace) -> int:
    from disa.pacs.dicomweb import DicomWebClient

    token = args.token or Environment.read().dicomweb_token or None
    with DicomWebClient(args.dicomweb, token=token, timeout_s=args.timeout,
                        retry=_retry(args)) as source:
        return _run(args, source)


def _cmd_dimse(args: argparse.Namespace) -> int:
    from disa.pacs.dimse import DimseClient, Peer

    peer = Peer(args.host, args.port, args.called_aet, args.calling_aet, args.timeout)
    source = DimseClient(peer, retry=_retry(args), retrieve=args.retrieve,
                         listen=(args.listen_host, args.listen_port))
    return _run(args, source)


def _retry(args: argparse.Namespace):  # -> RetryPolicy
    from disa.pacs.retry import RetryPolicy

    return RetryPolicy(attempts=args.retries + 1, base_delay_s=args.retry_delay,
                       max_delay_s=16.0 * args.retry_delay)


def _run(args: argparse.Namespace, source: Any) -> int:
    from disa.pacs.retry import PacsError, SeriesNotFound
    from disa.pacs.workflow import JobFailed, PatientMismatch, register_series
    from disa.service.client import DisaClient, ServiceError

    options = options_from_args(args)
    api_key = api_key_from(args)
    report = (lambda message: None) if args.quiet else _progress
    _show_retries(not args.quiet)
    try:
        with DisaClient(args.service, api_key=api_key) as service:
            done = register_series(
                source, service, args.fixed, args.moving, args.study, options,
                store_registered=args.store_registered, output=args.output,
                retry=_retry(args), poll_s=args.poll, job_timeout_s=args.job_timeout,
                report=report)
    except (SeriesNotFound, PatientMismatch) as exc:
        return _fail(str(exc), EXIT_INPUT)
    except JobFailed as exc:
        return _fail(str(exc), EXIT_INPUT if exc.input_error else EXIT_INTERNAL)
    except ServiceError as exc:
        code = EXIT_INPUT if 400 <= exc.status_code < 500 else EXIT_INTERNAL
        return _fail(f"DISA service refused the request: {exc.detail}", code)
    except PacsError as exc:
        return _fail(str(exc), EXIT_INTERNAL)
    except OSError as exc:  # a local disk problem, or a network error outside the retries
        return _fail(f"{type(exc).__name__}: {exc.strerror or exc}", EXIT_INTERNAL)
    from disa.registration.results.readable import verdict_line

    r = done.result
    line = verdict_line(r)  # the verdict first, as disa register and disa submit print it
    if line:
        print(f"verdict: {line}")
    print(f"job {done.job_id}: {r.get('mode')} registration with {r.get('similarity')}; "
          f"stored {', '.join(done.files)} ({done.stored_instances} instance(s))")
    return EXIT_OK


def _show_retries(shown: bool) -> None:
    """Retry notes (logger disa.pacs) as 'disa: ...' lines on stderr, unless --quiet."""
    import logging

    logger = logging.getLogger("disa.pacs")
    if not any(getattr(h, "_disa_pacs", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("disa: %(message)s"))
        handler._disa_pacs = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if shown else logging.ERROR)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(message: str, code: int) -> int:
    print(f"disa: error: {' '.join(message.split())}", file=sys.stderr)
    return code
