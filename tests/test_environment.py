"""Every DISA_* environment variable is documented, in docs/ARCHITECTURE.md's table, and
read through one of the two typed objects (jobs.settings.Settings, environment.Environment).

The variables are found where they are read or handed on: the service settings'
fields (`DISA_` + field name), and every DISA_ name in the source, the compose
file, the Dockerfiles, .env.example and the scripts. A few DISA_ names are not
variables (constants, DICOM labels): they are listed here.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from disa.core.environment import Environment, variable
from disa.jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bDISA_[A-Z0-9][A-Z0-9_]*\b")
#: DISA_ names that are not environment variables.
NOT_VARIABLES = {
    "DISA_DEFAULT_MAX_MSE",  # registration/pipeline.py: the card's accuracy target
    "DISA_MANUFACTURER",  # disa/pacs/orthanc_plugin.py: the Manufacturer DISA writes
    "DISA_REG", "DISA_DEFORMABLE",  # registration/results/dicom_reg.py: DICOM content labels
}
SOURCE_FOLDERS = ("disa", "jobs", "service", "worker", "registration", "model", "training",
                  "tests", "benchmarks", "scripts", "docker")


def _table(path: Path, heading: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(DISA_[A-Z0-9_]+)` \|", section, flags=re.MULTILINE)


def _used() -> set[str]:
    files = [ROOT / "docker-compose.yml", ROOT / ".env.example"]
    for folder in SOURCE_FOLDERS:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file()
                  and p.suffix in {".py", ".sh", ".yml", ".yaml", ""} and "__pycache__" not in
                  p.parts and p.name != Path(__file__).name]
    names = {f"DISA_{field.upper()}" for field in Settings.model_fields}
    names |= {variable(f.name) for f in fields(Environment)}
    for path in files:
        try:
            names |= set(NAME.findall(path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return names - NOT_VARIABLES


def test_every_variable_is_in_the_architecture_table_once():
    documented = _table(ROOT / "docs" / "ARCHITECTURE.md", "Environment variables")
    assert len(documented) == len(set(documented)), "a variable listed twice"
    used = _used()
    assert not used - set(documented), f"undocumented: {sorted(used - set(documented))}"
    assert not set(documented) - used, f"documented, never read: {sorted(set(documented) - used)}"


def test_every_service_setting_has_its_operator_documentation():
    settings = {f"DISA_{field.upper()}" for field in Settings.model_fields}
    documented = set(_table(ROOT / "docs" / "SERVICE.md", "Settings"))
    assert settings <= documented, sorted(settings - documented)


#: A read of a DISA_ variable straight from the process environment (not a write).
_DIRECT_READ = re.compile(
    r"""(environ\.get\(\s*["']DISA_|getenv\(\s*["']DISA_"""
    r"""|environ\[\s*["']DISA_\w+["']\s*\](?!\s*=)|["']DISA_\w+["']\s+(not\s+)?in\s+\w*\.?environ)""")
RUNTIME_FOLDERS = ("disa", "jobs", "service", "worker", "registration", "model", "training")


def test_variables_are_read_through_the_typed_objects_only():
    """DISA_* values come from Settings (the service) or Environment (the rest), so that
    each variable is typed and listed in one place; only these two read the environment."""
    found = []
    for folder in RUNTIME_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _DIRECT_READ.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_environment_reads_the_given_mapping_only(monkeypatch):
    monkeypatch.setenv("DISA_URL", "http://from-the-process")
    env = Environment.read({"DISA_URL": "http://given", "DISA_CACHE_DIR": ""})
    assert env.url == "http://given" and env.cache_dir == "" and env.api_key is None
    assert Environment.read().url == "http://from-the-process"
