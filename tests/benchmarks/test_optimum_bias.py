"""The optimum-bias benchmark harness: drift measure, model switching, a quick run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from .scripts import load_benchmark

ob = load_benchmark("optimum_bias")


def test_drift_is_the_mean_distance_from_the_identity() -> None:
    points = np.random.default_rng(0).uniform(0, 100, (50, 3))
    assert ob.drift_mm(sitk.Euler3DTransform(), points) == 0.0
    shift = sitk.TranslationTransform(3, (3.0, 4.0, 0.0))
    assert ob.drift_mm(shift, points) == pytest.approx(5.0)
    turn = sitk.Euler3DTransform((50.0, 50.0, 50.0), 0.0, 0.0, np.radians(10.0))
    expected = np.mean([np.linalg.norm(np.subtract(turn.TransformPoint(p), p))
                        for p in points.tolist()])
    assert ob.drift_mm(turn, points) == pytest.approx(expected)


def test_use_model_switches_the_engine_to_another_card_and_back(tmp_path: Path) -> None:
    from disa.model import card as card_module
    from disa.model.card import card_path_for, default_card_path, load_model_card

    shipped = default_card_path()
    if shipped is None:
        pytest.skip("no shipped model")
    other = tmp_path / "other"
    other.mkdir()
    onnx = load_model_card(shipped).onnx_path(shipped.parent)
    shutil.copy(onnx, other / "disa.onnx")
    text = shipped.read_text().replace(load_model_card(shipped).version, "other-version")
    card_path_for(other / "disa.onnx").write_text(text)
    try:
        assert ob.use_model(other) == "other-version"
        assert card_module.default_card_path() == card_path_for(other / "disa.onnx")
    finally:
        name = ob.use_model(None)
    assert name == load_model_card(shipped).version
    assert card_module.default_card_path() == shipped
    with pytest.raises(SystemExit, match="no model card"):
        ob.use_model(tmp_path / "missing")
    ob.use_model(None)


def test_quick_run_reports_a_small_drift_for_mind(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets the engine for its process; the test's undo keeps it out of later tests.
    monkeypatch.setenv("DISA_DESCRIPTOR_ENGINE", "auto")
    assert ob.main(["--quick", "--similarities", "mind"]) == 0
    out = capsys.readouterr().out
    assert "| case | mind |" in out
    mean = float(out.split("| **mean** | **")[1].split("**")[0])
    assert 0.0 < mean < 5.0  # MIND-SSC's optimum lies within a few mm of the truth here
