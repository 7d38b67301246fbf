"""`disa worker` refuses to start without a broker (one line, exit 2)."""

from __future__ import annotations

from disa.cli import main
from disa.jobs.settings import get_settings


def test_worker_needs_a_broker(monkeypatch, capsys):
    monkeypatch.delenv("DISA_BROKER_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["worker"]) == 2
    finally:
        get_settings.cache_clear()
    assert "DISA_BROKER_URL" in capsys.readouterr().err


def test_worker_command_is_registered():
    from disa.cli import build_parser

    args = build_parser().parse_args(["worker", "-c", "2", "-Q", "gpu"])
    assert args.concurrency == 2 and args.queue == "gpu"
