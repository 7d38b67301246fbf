"""`disa worker` warms the kernel cache in a child process first, and starts anyway when
that fails or hangs."""

from __future__ import annotations

import sys

from disa.worker import cli


def test_a_failed_warm_up_is_one_line_and_not_fatal(capsys) -> None:
    ok = cli.run_warm_up(command=[sys.executable, "-c",
                                  "print('compiling'); print('no sample data'); "
                                  "raise SystemExit(3)"])
    assert ok is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["disa worker: warm-up failed (exit 3): no sample data; starting without it"]


def test_a_hanging_warm_up_is_given_up(capsys) -> None:
    ok = cli.run_warm_up(timeout_s=0.5, command=[sys.executable, "-c",
                                                 "import time; time.sleep(30)"])
    assert ok is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warm-up still running after" in err[0], err


def test_a_successful_warm_up_reports_its_summary(capsys) -> None:
    ok = cli.run_warm_up(command=[sys.executable, "-c", "print('warm-up: rigid 1.0 s')"])
    assert ok is True
    assert capsys.readouterr().err.strip() == "disa worker: warm-up: rigid 1.0 s"


def test_the_worker_warms_up_before_taking_jobs_unless_told_not_to(monkeypatch) -> None:
    from disa.cli import build_parser
    from disa.worker import app as worker_app

    calls: list[str] = []
    monkeypatch.setenv("DISA_BROKER_URL", "redis://127.0.0.1:1/0")
    from disa.jobs.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.setattr(cli, "run_warm_up", lambda: calls.append("warm-up") or True)
    monkeypatch.setattr(worker_app.app, "worker_main", lambda argv: calls.append("worker"))
    try:
        for argv, expected in ((["worker"], ["warm-up", "worker"]),
                               (["worker", "--no-warm-up"], ["worker"])):
            calls.clear()
            args = build_parser().parse_args(argv)
            assert args.handler(args) == 0
            assert calls == expected
    finally:
        get_settings.cache_clear()
