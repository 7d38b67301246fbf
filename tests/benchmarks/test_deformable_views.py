"""The partial-view deformable benchmark harness: its switch and a quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .scripts import load_benchmark

views = load_benchmark("deformable_views")


def test_linear_first_off_restores_the_engine_afterwards() -> None:
    from disa.registration import pipeline

    original = pipeline._linear_first
    with views.linear_first_off():
        assert pipeline._linear_first(None, None) is False
    assert pipeline._linear_first is original


def test_quick_run_writes_the_three_runs(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert views.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "deformable_views.jsonl").open()]
    assert [r["run"] for r in rows] == ["rigid", "before", "after"]
    assert all(np.isfinite(r["tre_mm"]) and np.isfinite(r["field_tre_mm"]) for r in rows)
    assert rows[1]["sampled"] == "fixed"  # before: the fixed image sampled throughout
    assert "t1-t2 after:" in capsys.readouterr().out
