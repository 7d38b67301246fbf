"""Run `disa-train` from this source tree on a machine where the project is not installed.

    python3 scripts/gpu_train.py fit --device cuda --data-cache runs/gpu/volumes.npz ...

Made for the GPU machine of docs/TRAINING.md ("GPU run"): PyTorch with CUDA,
numpy, scipy, numba and onnx, but no pip install of this project, no
SimpleITK and no pydantic. Two things make the training package importable
there:

* the ``disa`` package is mapped onto this tree as pyproject.toml maps it
  (``disa.training`` is training/, ``disa.model`` is model/, ...), without
  installing anything;
* SimpleITK and pydantic, where missing, get import-only stand-ins. Training
  never calls them: SimpleITK reads image files (the run reads its volumes from
  the ``--data-cache`` .npz) and pydantic validates model cards (written later by
  ``disa-train export --run`` on a machine with the runtime's packages). Modules
  on the training path still name them at import time
  (`disa.core.preprocess`, `disa.model.card`), so a stand-in satisfies
  the import and raises, naming the package, if anything does call it.

Where the real packages are installed they are used, and the tree is still the
one this script sits in. tests/training/test_device.py runs this script with
both packages hidden.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _missing(package: str) -> type:
    class Missing:
        """Stands in for anything of an absent package; fails when used."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{package} is not installed on this machine: "
                               f"scripts/gpu_train.py only trains and exports ONNX")

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{package} is not installed on this machine")

    return Missing


def _stand_in_simpleitk() -> types.ModuleType:
    module = types.ModuleType("SimpleITK")
    missing = _missing("SimpleITK")

    def attribute(name: str) -> Any:
        if name.startswith("__"):  # module metadata that tools (inspect) look for
            raise AttributeError(name)
        # Constants (sitk.sitkLinear as a default argument) and classes alike.
        return missing.__new__(missing)

    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def _stand_in_pydantic() -> types.ModuleType:
    module = types.ModuleType("pydantic")
    base = _missing("pydantic")

    class BaseModel:
        """Class bodies of models (card fields, ConfigDict) evaluate; instances fail."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            base()

        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> Any:
            base()

    module.BaseModel = BaseModel  # type: ignore[attr-defined]
    module.ConfigDict = dict  # type: ignore[attr-defined]
    module.Field = lambda *args, **kwargs: kwargs.get("default")  # type: ignore[attr-defined]
    return module


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def prepare() -> list[str]:
    """Map ``disa`` onto this tree and stand in for missing packages; the stood-in names."""
    if "disa" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "disa", ROOT / "disa" / "__init__.py",
            # disa.pacs lives in disa/, the subpackages at the top of the tree.
            submodule_search_locations=[str(ROOT / "disa"), str(ROOT)])
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["disa"] = package
        spec.loader.exec_module(package)
    stood_in = []
    for name, make in (("SimpleITK", _stand_in_simpleitk), ("pydantic", _stand_in_pydantic)):
        if not _importable(name):
            sys.modules[name] = make()
            stood_in.append(name)
    return stood_in


def main(argv: list[str] | None = None) -> int:
    stood_in = prepare()
    if stood_in:
        print(f"gpu_train: import-only stand-ins for {', '.join(stood_in)}", file=sys.stderr)
    from disa.training.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
