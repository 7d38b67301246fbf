"""`disa worker`: a Celery worker (prefork pool) consuming the DISA queue."""

from __future__ import annotations

import argparse
import socket

from disa.core.errors import InputError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `disa worker` with the main CLI."""
    p = sub.add_parser("worker", help="run a Celery worker for the REST service",
                       description="Run a Celery worker (prefork pool) that runs registration "
                                   "jobs from DISA_BROKER_URL and the shared DISA_JOBS_DIR.")
    p.add_argument("-c", "--concurrency", type=int, default=1,
                   help="jobs run at once, one process each (default 1: a job already uses "
                        "all cores)")
    p.add_argument("-Q", "--queue", default=None,
                   help="queue to consume (default: DISA_QUEUE, 'disa')")
    p.add_argument("-n", "--hostname", default=None,
                   help="worker name (default: disa@<host>)")
    p.add_argument("--loglevel", default="info",
                   choices=["debug", "info", "warning", "error", "critical"])
    p.set_defaults(handler=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    from disa.jobs.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        raise InputError("disa worker needs DISA_BROKER_URL (a Redis URL shared with the API); "
                         "without a broker, `disa serve` runs jobs itself")
    if args.concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    from disa.worker.app import app

    argv = ["worker", "--pool", "prefork", "--concurrency", str(args.concurrency),
            "--queues", args.queue or settings.queue, "--loglevel", args.loglevel,
            "--hostname", args.hostname or f"disa@{socket.gethostname()}",
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0
