"""Tests of the model card: round trip, integrity check, default paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from disa.model import card as card_module
from disa.model.card import (
    CHANNELS,
    PARAMETERS,
    RECEPTIVE_FIELD_VOXELS,
    STRIDE,
    ModelCard,
    ModelIntegrityError,
    card_path_for,
    file_sha256,
    load_model_card,
)


def test_written_card_states_the_contract(onnx_model: Path) -> None:
    card = load_model_card(card_path_for(onnx_model))
    assert card.onnx_file == "disa.onnx"
    assert card.sha256 == file_sha256(onnx_model)
    assert card.output_stride == STRIDE == 4
    assert card.output_offset_voxels == 0.0
    assert card.channels == CHANNELS == 16
    assert card.parameters == PARAMETERS
    assert card.receptive_field_voxels == RECEPTIVE_FIELD_VOXELS
    assert card.input_spacing_mm == 2.0
    assert "normalise_intensities" in card.normalisation
    assert set(card.training) >= {"data", "recipe", "command", "minutes"}
    assert card.onnx_path(onnx_model.parent) == onnx_model.resolve()
    # The .onnx path finds its card too.
    assert load_model_card(onnx_model) == card


def test_tampered_weights_are_refused(onnx_model: Path, tmp_path: Path) -> None:
    shutil.copy(onnx_model, tmp_path / "disa.onnx")
    shutil.copy(card_path_for(onnx_model), tmp_path / "disa.json")
    load_model_card(tmp_path / "disa.json")
    with open(tmp_path / "disa.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model_card(tmp_path / "disa.json")
    # verify=False reads the facts without hashing (e.g. to learn the spacing).
    assert load_model_card(tmp_path / "disa.json", verify=False).channels == 16
    (tmp_path / "disa.onnx").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_model_card(tmp_path / "disa.json")


def test_card_rejects_unknown_fields_and_bad_hash() -> None:
    base = {"name": "x", "version": "1", "onnx_file": "x.onnx", "sha256": "0" * 64}
    ModelCard.model_validate(base)
    with pytest.raises(ValueError):
        ModelCard.model_validate({**base, "sha256": "xyz"})
    with pytest.raises(ValueError):
        ModelCard.model_validate({**base, "strid": 4})


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, onnx_model: Path) -> None:
    monkeypatch.setattr(card_module, "WEIGHTS_DIR", tmp_path)
    assert card_module.default_model_path() is None
    assert card_module.default_card_path() is None
    shutil.copy(onnx_model, tmp_path / "disa.onnx")
    shutil.copy(card_path_for(onnx_model), tmp_path / "disa.json")
    assert card_module.default_model_path() == tmp_path / "disa.onnx"
    assert card_module.default_card_path() == tmp_path / "disa.json"
