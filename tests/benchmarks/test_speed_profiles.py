"""benchmarks/stage_profile.py and end_to_end.py: their tables, and that the harness runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from .scripts import load_benchmark

sp = load_benchmark("stage_profile")
e2e = load_benchmark("end_to_end")


def _run(total: float, pair: str = "ct-mr", **timings: float):
    return sp.Run(total, timings, "mind", pair=pair, tre_mm=1.0, working_spacing_mm=2.0)


def test_stage_order_puts_each_substage_after_its_parent() -> None:
    order = sp.stage_order([
        {"preprocess": 1, "descriptors": 1, "search": 1, "search_coarse": 1, "search_fine": 1,
         "reorient": 1},
        {"preprocess": 1, "search": 1, "search_coarse": 1, "deformable": 1,
         "deformable_adam": 1, "field": 1},
    ])
    assert order == ["preprocess", "descriptors", "search", "search_coarse", "search_fine",
                     "reorient", "deformable", "deformable_adam", "field"]


def test_other_seconds_leaves_substages_out() -> None:
    assert sp.other_seconds(10.0, {"search": 6.0, "search_coarse": 4.0, "reorient": 3.0}) == \
        pytest.approx(1.0)
    # A deformable run on a smaller moving view: its rigid run's stages under linear_.
    assert sp.other_seconds(12.0, {"linear_search": 5.0, "linear_search_coarse": 4.0,
                                   "linear_decision_preprocess": 1.0, "search": 2.0,
                                   "deformable": 3.0, "deformable_adam": 2.0}) == \
        pytest.approx(1.0)


def test_stage_table_medians_and_absent_stages() -> None:
    runs = {"rigid": [_run(4.0, search=3.0, search_coarse=2.0),
                      _run(6.0, search=5.0, search_coarse=1.0),
                      _run(8.0, search=7.0, search_coarse=3.0)],
            "affine": [_run(9.0, search=4.0, affine=2.0)]}
    table = sp.stage_table(runs, ["rigid", "affine"])
    assert "| search | 5.00 | 4.00 |" in table
    assert "| · coarse (in search) | 2.00 | – |" in table  # absent, not zero
    assert "| affine | – | 2.00 |" in table
    assert "| **total (wall)** | **6.00** | **9.00** |" in table
    assert "| other (not in a stage) | 1.00 | 3.00 |" in table


def test_end_to_end_summary_ratios_against_the_baseline_of_the_same_pair() -> None:
    T = e2e.Timing
    rows = [T("a", "ct-mr", "disa", 6.0, 3.0), T("a", "ct-mr", "sitk-mi", 3.0, 2.0),
            T("b", "ct-mr", "disa", 2.0, 1.0), T("b", "ct-mr", "sitk-mi", 1.0, 2.0),
            T("c", "t1-t2", "disa", 1.0, 1.0, error="exit 1"),
            T("c", "t1-t2", "sitk-mi", 2.0, 1.0)]
    table = e2e.summary_table(rows, ["disa", "sitk-mi"], ["ct-mr", "t1-t2"])
    # ct-mr: disa median cold 4.0 vs 2.0, warm 2.0 vs 2.0; worst case cold 2.0x.
    assert "| ct-mr | disa | 4.00 | 2.00 | 2.00x | 1.00x | 2.00x |" in table
    assert "| t1-t2 | disa | 1.00 | 1.00 | 0.50x | 1.00x | 0.50x | – | 1/1 |" in table
    assert "| all | sitk-mi |" in table


def test_stage_profile_quick_runs(tmp_path: Path) -> None:
    """One small case, rigid only, no cold processes: the table is written."""
    assert sp.main(["--quick", "--no-cold", "--modes", "rigid", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "stage_profile.md").read_text(encoding="utf-8")
    assert "| **total (wall)** |" in text and "| preprocess |" in text
    assert "--quick" in text and "Machine:" in text


def test_end_to_end_quick_runs_the_cli_and_simpleitk(tmp_path: Path) -> None:
    """One small case, cold only: `disa register` and SimpleITK MI each write a folder
    whose transform is measured."""
    assert e2e.main(["--quick", "--methods", "disa,sitk-mi", "--no-warm",
                     "--out", str(tmp_path)]) == 0
    text = (tmp_path / "end_to_end.md").read_text(encoding="utf-8")
    assert "| ct-mr | disa |" in text and "| ct-mr | sitk-mi |" in text
    assert "0/1 |" in text  # no failure


def test_cold_descriptors_quick_runs(tmp_path: Path) -> None:
    from disa.model.card import default_model_path

    if default_model_path() is None:
        pytest.skip("no shipped model")
    cd = load_benchmark("cold_descriptors")
    assert cd.main(["--quick", "--engines", "onnxruntime", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "cold_descriptors.md").read_text(encoding="utf-8")
    assert "| onnxruntime | " in text and "| first inference" not in text
    assert "| inference |" in text


def test_nifti_gzip_quick_writes_its_table(tmp_path: Path) -> None:
    """Small volumes: every step of both volumes is timed, and both writers' files read
    back the same image (the table's sizes are of files ITK read)."""
    ng = load_benchmark("nifti_gzip")
    assert ng.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "nifti_gzip.md").read_text(encoding="utf-8")
    for volume in ("field", "ct"):
        for step in ("write", "scan (input check)", "ITK read", "file MB"):
            assert f"| {volume} | {step} |" in text
    assert "x |" in text and "Machine:" in text
