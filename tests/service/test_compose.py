"""docker-compose.yml is valid (checked with `docker-compose config -q` where installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_file_is_valid(profile: str | None):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    args = ["docker-compose", "--env-file", str(ROOT / ".env.example")]
    if profile:
        args += ["--profile", profile]
    done = subprocess.run([*args, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    services = subprocess.run([*args, "config", "--services"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60).stdout.split()
    assert {"redis", "api"} <= set(services)
    if profile:
        assert f"worker-{profile}" in services


def test_images_install_one_onnxruntime_each():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'pip install "/src[gpu]"' in text and 'pip install "/src[cpu]"' in text
    assert "[cpu,gpu]" not in text and "[gpu,cpu]" not in text
