"""Every exception class DISA defines derives from the one base, DisaError."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from disa.core.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    CancelledError,
    DisaError,
    InputError,
    PatientMismatch,
)

ROOT = Path(__file__).resolve().parents[2]
#: import name -> source folder (pyproject.toml's package-dir).
FOLDERS = {"disa": "disa", "disa.core": "core", "disa.jobs": "jobs", "disa.service": "service",
           "disa.worker": "worker", "disa.registration": "registration", "disa.model": "model",
           "disa.training": "training"}


def _modules() -> list[str]:
    names = []
    for package, folder in FOLDERS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if package == "disa" and len(parts) > 1 and parts[0] != "pacs":
                continue  # disa/ holds its own modules and disa.pacs only
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join([package, *parts]))
    return names


def _defined_exceptions() -> list[type[BaseException]]:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, BaseException) and obj.__module__ == name]
    return found


def _scan() -> None:
    """Print (JSON) the packages with exception classes and the classes outside DisaError."""
    found = _defined_exceptions()
    print(json.dumps({
        "packages": sorted({cls.__module__.split(".")[1] for cls in found
                            if cls.__module__.count(".")}),
        "outside": sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in found
                          if not issubclass(cls, DisaError))}))


def test_every_exception_class_of_disa_derives_from_disa_error() -> None:
    # A fresh interpreter: importing every module (the Celery tasks among them) here would
    # register tasks on this process's apps and change what later tests see.
    done = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path("
                           f"{str(Path(__file__))!r})['_scan']()"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    scan = json.loads(done.stdout.strip().splitlines()[-1])
    # the scan sees classes of every layer (not a vacuous pass)
    assert {"core", "jobs", "service", "worker", "pacs", "model"} <= set(scan["packages"])
    assert not scan["outside"], scan["outside"]


@pytest.mark.parametrize(("cls", "builtin"), [(InputError, ValueError),
                                              (PatientMismatch, ValueError),
                                              (CancelledError, RuntimeError)])
def test_the_errors_keep_their_builtin_bases(cls: type, builtin: type) -> None:
    """Handlers written for the built-in base (`except ValueError`) still catch them."""
    assert issubclass(cls, DisaError) and issubclass(cls, builtin)


def test_patient_mismatch_keeps_a_reason_free_of_identifiers() -> None:
    error = PatientMismatch("fixed PatientID 'A' is not moving PatientID 'B'", "different patients")
    assert isinstance(error, InputError) and error.reason == "different patients"
    assert "A" in str(error)


def test_exit_codes_are_the_documented_contract() -> None:
    assert (EXIT_OK, EXIT_INTERNAL, EXIT_INPUT) == (0, 1, 2)
