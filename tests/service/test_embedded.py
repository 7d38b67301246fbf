"""`disa serve` without a broker: API and an in-process worker, no Redis; `disa submit`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from disa.cli import main
from disa.service.client import DisaClient

from ..support import free_port, wait_until
from .helpers import API_KEY, api_key_env, service_env


class Serve:
    """`python -m disa serve` as a subprocess (its own process group)."""

    def __init__(self, jobs: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **service_env(jobs), **api_key_env()}
        env.pop("DISA_BROKER_URL", None)
        self._log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "disa", "serve", "--port", str(self.port),
                 "--jobs-dir", str(jobs)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._healthy, 60, "disa serve to answer")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"disa serve exited:\n{self._log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Serve] = []

    def start() -> Serve:
        started.append(Serve(tmp_path / "jobs", tmp_path / "serve.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_embedded_round_trip_with_disa_submit(serve, pair_files, tmp_path, capsys):
    server = serve()
    ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
    assert ready["status"] == "ready" and ready["checks"]["broker"]["detail"] == "embedded"
    out = tmp_path / "result"
    code = main(["submit", str(pair_files[0]), str(pair_files[1]), "--url", server.url,
                 "--api-key", API_KEY, "-o", str(out), "--similarity", "mind",
                 "--starts", "10", "--quiet", "--poll", "0.2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.split("\n")[1].startswith("verdict: ")  # after "job ... queued"
    assert "refined solutions agree" in printed.out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["transform.tfm", "registered.nii.gz", "qa.png", "result.json"])

    # a job that fails on its input: exit 2 and the engine's message
    truncated = tmp_path / "broken.nii.gz"
    truncated.write_bytes(pair_files[1].read_bytes()[:4000])
    code = main(["submit", str(pair_files[0]), str(truncated), "--url", server.url,
                 "--api-key", API_KEY, "--wait", "--quiet", "--similarity", "mind"])
    assert code == 2 and "moving.nii.gz" in capsys.readouterr().err
    # refused at the door: a wrong key, a bad option
    assert main(["submit", str(pair_files[0]), str(pair_files[1]), "--url", server.url,
                 "--api-key", "wrong"]) == 2
    assert "API key" in capsys.readouterr().err
    assert main(["submit", str(pair_files[0]), str(pair_files[1]), "--url", server.url,
                 "--api-key", API_KEY, "--starts", "0"]) == 2
    assert "starts" in capsys.readouterr().err


def test_embedded_shutdown_requeues_the_running_job(serve, tmp_path):
    from ..support import write_pair

    fixed, moving = write_pair(tmp_path / "in", size=40)
    server = serve()
    with DisaClient(server.url, api_key=API_KEY) as client:
        job = client.submit(fixed, moving, {"similarity": "mind", "starts": 300})
        wait_until(lambda: client.job(job["id"])["state"] == "running", 60, "the job to run")
    server.stop()  # SIGTERM: the embedded worker stops the job and puts it back
    server = serve()  # the next start requeues it
    with DisaClient(server.url, api_key=API_KEY) as client:
        end = client.wait(job["id"], poll_s=0.2, timeout_s=120)
    assert end["state"] == "succeeded", end["error"]
    assert end["attempts"] == 1  # the interrupted run does not count against the job
    log = (tmp_path / "serve.log").read_text()
    assert f"job {job['id']}: queued" in log and "requeued 1 jobs" in log
