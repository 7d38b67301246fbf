"""docker-compose.yml is valid (checked with `docker-compose config -q` where installed)."""

from __future__ import annotations

import re
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


def _documented_settings() -> list[str]:
    """The variables of docs/SERVICE.md's "Settings" tables (the first column)."""
    text = (ROOT / "docs" / "SERVICE.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(DISA_[A-Z0-9_]+)` \|", section, flags=re.MULTILINE)


def test_every_documented_setting_reaches_the_containers(tmp_path: Path):
    """Compose reads .env only to fill in ${...}: a setting an operator puts in .env reaches
    the API and the workers only if docker-compose.yml hands it on."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    # Fixed by the compose file itself (the services' Redis and the shared volume).
    fixed = {"DISA_BROKER_URL": "redis://redis:6379/0", "DISA_JOBS_DIR": "/data/jobs"}
    names = [*_documented_settings(), "NUMBA_NUM_THREADS"]
    assert {"DISA_DESCRIPTOR_ENGINE", "DISA_SWEEP_INTERVAL_S", *fixed} <= set(names)
    wanted = {name: fixed.get(name, f"set-in-env-file-{i}") for i, name in enumerate(names)}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in wanted.items() if k not in fixed))
    for profile in ("cpu", "gpu"):
        done = subprocess.run(["docker-compose", "--env-file", str(env_file), "--profile",
                               profile, "config"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        for service in ("api", f"worker-{profile}"):
            block = _service_block(done.stdout, service)
            env = dict(re.findall(r"^      ([A-Z0-9_]+): '?([^'\n]*)'?$", block, re.MULTILINE))
            missing = {k: v for k, v in wanted.items() if env.get(k) != v}
            assert not missing, f"{service} ({profile}) does not get {sorted(missing)}"


def _service_block(config: str, service: str) -> str:
    """The `environment:` lines of one service in `docker-compose config` output."""
    lines = config.splitlines()
    start = lines.index(f"  {service}:")
    block: list[str] = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith("   "):
            break
        block.append(line)
    return "\n".join(block)


def test_unset_optional_settings_stay_unset_in_the_containers():
    """DISA_RESULT_BACKEND and NUMBA_NUM_THREADS not in .env: not set at all (an empty
    result backend or thread count is not the same as none)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    done = subprocess.run(["docker-compose", "--env-file", str(ROOT / ".env.example"),
                           "--profile", "gpu", "config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for service in ("api", "worker-gpu"):
        block = _service_block(done.stdout, service)
        for name in ("DISA_RESULT_BACKEND", "NUMBA_NUM_THREADS"):
            assert f"      {name}: ''" not in block, f"{service}: {name} set to ''"
