"""The quick start's descriptor engine is the one the README names (issue 24, item 3).

The README's quick-start command installs some extras; on a CPU host the engine
``auto`` then resolves (``runtime.auto_engine``) from what those extras install and
whether the shipped model card names an int8 variant. The README states the result
("descriptor engine `NAME`"); these tests hold the three together.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from disa.model import runtime

ROOT = Path(__file__).resolve().parents[2]


def _quick_start() -> str:
    """The README's "Quick start" section (to the next "## " heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Quick start.*?(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Quick start' section"
    return match.group(0)


def quick_start_extras() -> list[str]:
    """The extras of the quick start's ``pip install -e '.[a,b]'``."""
    match = re.search(r"pip install -e '\.\[([\w,-]+)\]'", _quick_start())
    assert match, "the quick start installs the project with no extras in pip install -e '.[...]'"
    return match.group(1).split(",")


def installed_by(extras: list[str]) -> set[str]:
    """Distribution names that ``extras`` of pyproject.toml require (base dependencies too)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {Requirement(r).name.lower() for r in requirements}


def readme_engine() -> str:
    """The engine the quick start says a user gets: "descriptor engine `NAME`"."""
    match = re.search(r"descriptor engine `([\w-]+)`", _quick_start())
    assert match, "the quick start does not name the descriptor engine a user gets"
    return match.group(1)


def shipped_int8() -> bool:
    """Whether the shipped model card names an int8 variant whose files ship."""
    from disa.model.card import default_model_path, int8_model_path

    onnx = default_model_path()
    return onnx is not None and int8_model_path(onnx, verify=False) is not None


def test_quick_start_installs_openvino_and_no_gpu_runtime() -> None:
    names = installed_by(quick_start_extras())
    assert "openvino" in names, "the quick start's extras leave out the faster CPU engine"
    assert "onnxruntime" in names
    assert "onnxruntime-gpu" not in names  # the same module as onnxruntime: never both


def test_readme_names_the_engine_auto_resolves_to_after_the_quick_start() -> None:
    names = installed_by(quick_start_extras())
    expected = runtime.auto_engine(cuda_available=False,
                                   openvino_available="openvino" in names,
                                   int8_available=shipped_int8())
    assert readme_engine() == expected


def test_the_installed_resolution_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the quick start's packages are installed (CI installs them), the real
    ``default_engine`` on a CPU host gives the README's engine too."""
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino not installed here")
    from disa.model.card import default_model_path

    monkeypatch.delenv("DISA_DESCRIPTOR_ENGINE", raising=False)
    assert runtime.default_engine("cpu", default_model_path()) == readme_engine()
