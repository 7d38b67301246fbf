"""`disa worker`: a Celery worker (prefork pool) consuming the DISA queue."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

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
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="take jobs at once, without running `disa warm-up` first (the first "
                        "job then compiles whatever kernels the on-disk cache lacks)")
    p.set_defaults(handler=_cmd_worker)


#: Longest a worker waits for its warm-up (s): an empty numba cache on a slow host takes
#: about a minute; past this the worker starts anyway.
WARM_UP_TIMEOUT_S = 600.0


def run_warm_up(timeout_s: float = WARM_UP_TIMEOUT_S,
                command: list[str] | None = None) -> bool:
    """`disa warm-up` (or ``command``) in a child process; True when it succeeded.

    A child process, not this one: Celery forks the pool from this process, and a
    parent that has run numba's parallel kernels (threads started) is not safe to
    fork. The child fills the on-disk cache, which the pool processes then load.
    A failed or slow warm-up is reported on stderr and does not stop the worker:
    jobs still run, only the first one slower.
    """
    command = command or [sys.executable, "-m", "disa", "warm-up"]
    try:
        done = subprocess.run(command, timeout=timeout_s, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
    except subprocess.TimeoutExpired:
        print(f"disa worker: warm-up still running after {timeout_s:.0f} s; starting without "
              "it", file=sys.stderr)
        return False
    lines = done.stdout.strip().splitlines() or ["(no output)"]
    if done.returncode != 0:
        print(f"disa worker: warm-up failed (exit {done.returncode}): {lines[-1]}; starting "
              "without it", file=sys.stderr)
        return False
    print(f"disa worker: {lines[-1]}", file=sys.stderr)
    return True


def _cmd_worker(args: argparse.Namespace) -> int:
    from disa.jobs.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        raise InputError("disa worker needs DISA_BROKER_URL (a Redis URL shared with the API); "
                         "without a broker, `disa serve` runs jobs itself")
    if args.concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    if args.warm_up:
        run_warm_up()
    from disa.worker.app import app

    argv = ["worker", "--pool", "prefork", "--concurrency", str(args.concurrency),
            "--queues", args.queue or settings.queue, "--loglevel", args.loglevel,
            "--hostname", args.hostname or f"disa@{socket.gethostname()}",
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0
