"""Functions that fit on a screen: none over 80 lines in the packages that ship.

A function longer than that does several jobs; split it where its steps have names
from the field (docs/ARCHITECTURE.md). Tests and benchmarks are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "disa", "jobs", "model", "registration", "service", "training", "worker")
MAX_LINES = 80


def _long_functions(root: Path = ROOT, folders: tuple[str, ...] = FOLDERS) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} "
                                     f"({lines} lines)")
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    assert not _long_functions()


def test_the_scan_finds_a_function_one_line_too_long(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))
    (tmp_path / "pkg" / "fits.py").write_text(f"def fits():\n{body}\n")
    method = body.replace("\n", "\n    ")
    (tmp_path / "pkg" / "long.py").write_text(f"class A:\n    def long(self):\n    {method}\n"
                                              "        return 0\n")
    assert _long_functions(tmp_path, ("pkg",)) == ["pkg/long.py:2 long (81 lines)"]
