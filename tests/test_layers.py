"""Import contracts: the layers of docs/ARCHITECTURE.md ("Layers"), checked on the source.

    service -> jobs        worker -> jobs        service -> worker (dispatch.py only)
    service -> engine (registration, model) through service/engine_surface.py only
    worker -> registration -> model -> core       training -> registration, model
    every layer -> core (errors, atomic writes, grids, image I/O); core -> nothing of DISA

Inside the engine: runner -> results -> pipeline -> the stages (similarity, transform,
search, deformable). No stage imports the pipeline, the results or the runner; the
pipeline imports neither the results nor the runner.

Every `import` and `from ... import` of a package's modules counts, also those
inside functions (the lazy ones) and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: import name -> source folder (pyproject.toml's package-dir).
PACKAGES = {
    "disa": ROOT / "disa",
    "disa.jobs": ROOT / "jobs",
    "disa.service": ROOT / "service",
    "disa.worker": ROOT / "worker",
    "disa.registration": ROOT / "registration",
    "disa.model": ROOT / "model",
    "disa.training": ROOT / "training",
    "disa.core": ROOT / "core",
}
#: The namespace package itself (imported with any of its subpackages): nothing in it.
ROOT_MODULES = {"disa"}
#: What runs in the API, the workers and the CLI: never training, never torch.
RUNTIME = ("root", "disa", "disa.jobs", "disa.service", "disa.worker", "disa.registration",
           "disa.model", "disa.core")
#: The engine's stage subpackages, which the pipeline calls.
STAGES = ("disa.registration.similarity", "disa.registration.transform",
          "disa.registration.search", "disa.registration.deformable")
#: What sits above the stages, top first: the runner writes results of the pipeline's run.
ABOVE_STAGES = ("disa.registration.runner", "disa.registration.results",
                "disa.registration.pipeline")


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).parts
            # disa/ holds only its own modules and disa.pacs; the other folders are their own
            if package == "disa" and len(relative) > 1 and relative[0] != "pacs":
                continue
            found[_module_name(package, folder, path)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names of the modules `module` imports (for `from X import y`: X, and X.y
    when that is a module of ours)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names
                         if f"{target}.{alias.name}" in MODULES)
    return names


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _folder(name: str) -> str | None:
    """The package (folder) of PACKAGES that module `name` belongs to: the longest match,
    so that disa.cli is `disa` (the CLI folder) and disa.service.app is `disa.service`."""
    if name in ROOT_MODULES:
        return "root"
    matches = [package for package in PACKAGES if _within(name, package)]
    return max(matches, key=len) if matches else None


def _edges(source: str, target: str) -> set[tuple[str, str]]:
    """(importer, imported) for every import of `target`'s modules by `source`'s modules."""
    return {(module, name) for module, names in IMPORTS.items() if _folder(module) == source
            for name in names if _folder(name) == target}


def test_the_scan_sees_every_package():
    for package in PACKAGES:
        assert package in MODULES, package
    assert "disa.service.dispatch" in MODULES and "disa.jobs.store" in MODULES
    assert ("disa.service.dispatch", "disa.worker.execute") in _edges("disa.service", "disa.worker")


def test_jobs_imports_only_the_core():
    for upper in ("disa.service", "disa.worker", "disa.training", "disa.model", "disa",
                  "disa.registration"):
        assert not _edges("disa.jobs", upper), upper


def test_the_core_imports_nothing_of_disa_outside_itself():
    for other in PACKAGES:
        if other != "disa.core":
            assert not _edges("disa.core", other), other
    assert _edges("disa.registration", "disa.core") and _edges("disa.jobs", "disa.core")


def test_workers_never_import_the_api():
    assert not _edges("disa.worker", "disa.service")


def test_the_api_reaches_the_workers_only_through_dispatch():
    importers = {module for module, _ in _edges("disa.service", "disa.worker")}
    assert importers <= {"disa.service.dispatch"}, importers


def test_the_api_reaches_the_engine_only_through_its_surface():
    importers = {module for module, _ in _edges("disa.service", "disa.registration")
                 | _edges("disa.service", "disa.model")}
    assert importers <= {"disa.service.engine_surface"}, importers


def test_the_engine_surface_names_only_what_exists():
    from disa.service import engine_surface

    for name in engine_surface.SURFACE:
        assert getattr(engine_surface, name) is not None, name


def test_the_engine_imports_neither_the_api_nor_the_workers_nor_the_job_core():
    for engine in ("disa.registration", "disa.model"):
        for upper in ("disa.service", "disa.worker", "disa.jobs", "disa"):  # disa: the CLI
            assert not _edges(engine, upper), (engine, upper)


def test_the_model_runtime_never_imports_the_engine():
    assert not _edges("disa.model", "disa.registration")


def _engine_edges(importer: str, imported: str) -> set[tuple[str, str]]:
    return {(module, name) for module, names in IMPORTS.items() if _within(module, importer)
            for name in names if _within(name, imported)}


def test_the_stages_never_import_what_runs_them():
    assert all(part in MODULES for part in STAGES + ABOVE_STAGES)
    for stage in STAGES:
        for upper in ABOVE_STAGES:
            assert not _engine_edges(stage, upper), (stage, upper)


def test_the_engine_is_layered_runner_results_pipeline():
    for lower, upper in (("disa.registration.pipeline", "disa.registration.results"),
                         ("disa.registration.pipeline", "disa.registration.runner"),
                         ("disa.registration.results", "disa.registration.runner")):
        assert not _engine_edges(lower, upper), (lower, upper)
    assert _engine_edges("disa.registration.runner", "disa.registration.results")


@pytest.mark.parametrize("package", RUNTIME)
def test_the_runtime_never_imports_training(package):
    assert not _edges(package, "disa.training")


@pytest.mark.parametrize("package", RUNTIME)
def test_the_runtime_never_imports_torch(package):
    found = {(module, name) for module, names in IMPORTS.items() if _folder(module) == package
             for name in names if _within(name, "torch")}
    assert not found


def test_importing_every_runtime_module_loads_neither_torch_nor_training():
    """The same, as Python sees it: a fresh interpreter imports every runtime module."""
    modules = sorted(m for m in MODULES if _folder(m) != "disa.training"
                     and not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(' '.join(sorted(n for n in sys.modules\n"
            "                      if n == 'torch' or n.startswith('disa.training'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""
