"""The commit A/B's import redirection and its table."""

from __future__ import annotations

import sys

from .scripts import load_benchmark

ab = load_benchmark("commit_ab")


def test_tree_finder_imports_the_mapped_packages_from_its_tree(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "abtop" = "top", "abtop.engine" = "engine" }\n')
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "__init__.py").write_text("WHERE = 'top'\n")
    (tmp_path / "engine" / "search").mkdir(parents=True)
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "search" / "__init__.py").write_text("")
    (tmp_path / "engine" / "search" / "core.py").write_text("VALUE = 7\n")
    finder = ab.TreeFinder(tmp_path)
    sys.meta_path.insert(0, finder)
    try:
        import abtop  # type: ignore[import-not-found]
        from abtop.engine.search import core  # type: ignore[import-not-found]

        assert abtop.WHERE == "top" and core.VALUE == 7
        assert core.__file__ == str(tmp_path / "engine" / "search" / "core.py")
        assert finder.find_spec("json") is None
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "abtop"]:
            del sys.modules[name]


def test_summary_compares_each_case_with_itself_and_lists_moved_results() -> None:
    def row(tree: str, case: str, pair: str, s: float, tre: float) -> dict:
        return {"tree": tree, "case": case, "pair": pair, "s": s, "reorient_s": s / 4,
                "tre": tre}

    rows = [row("B", "a", "ct-mr", 4.0, 0.7), row("H", "a", "ct-mr", 3.0, 0.7),
            row("H", "a", "ct-mr", 3.2, 0.7), row("B", "a", "ct-mr", 4.2, 0.7),
            row("B", "b", "torso", 8.0, 1.0), row("H", "b", "torso", 9.0, 30.0)]
    text = ab.summary(rows, {"base": "B", "head": "H"})
    assert "| ct-mr | 1 | 4.10 | 3.10 | -1.00 | 1.02 -> 0.78 |" in text
    assert "| torso | 1 | 8.00 | 9.00 | +1.00 |" in text
    assert "| all | 2 |" in text
    assert "- b: base 1.0 mm, head 30.0 mm" in text and "- a:" not in text
