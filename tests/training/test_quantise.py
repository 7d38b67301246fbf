"""disa-train quantise: the int8 variant is written, recorded, verified and served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from disa.model.card import (
    ModelCard,
    ModelIntegrityError,
    card_path_for,
    file_sha256,
    int8_model_path,
)
from disa.model.runtime import DescriptorExtractor, default_engine
from disa.training import sources
from disa.training.cli import main as train_main
from disa.training.evaluate import merge_into_card
from disa.training.network import DisaNet
from disa.training.onnx_export import export_onnx, write_model_card
from disa.training.synthesis import TRAINING_SETTINGS

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

SHAPE = (44, 40, 36)


def _smooth_volume(seed: int) -> np.ndarray:
    """A z-scored smooth random volume: structure at several scales, like normalised anatomy."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = sum(ndimage.gaussian_filter(rng.normal(size=SHAPE), s) * s for s in (1.0, 2.5, 5.0))
    return ((v - v.mean()) / v.std()).astype(np.float32)


@pytest.fixture(scope="module")
def quantised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded net exported with its card, then quantised on three small volumes."""
    from disa.training.quantise import quantise

    torch.manual_seed(0)
    net = DisaNet().eval()
    path = tmp_path_factory.mktemp("int8") / "disa.onnx"
    export_onnx(net, path)
    write_model_card(path, name="disa-test", version="0.0.0", training={}, held_out_metrics={},
                     net=net)
    volumes = [_smooth_volume(s) for s in range(3)]
    quantise(path, volumes, ["a", "b", "c"], threads=1)
    return path


def _dot_errors(a: np.ndarray, b: np.ndarray, seed: int = 0) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    idx = np.random.default_rng(seed).integers(0, len(a), (3000, 2))
    return (np.einsum("nc,nc->n", b[idx[:, 0]], b[idx[:, 1]])
            - np.einsum("nc,nc->n", a[idx[:, 0]], a[idx[:, 1]]))


def test_quantise_writes_the_ir_and_records_it_in_the_card(quantised: Path) -> None:
    card = ModelCard.model_validate_json(card_path_for(quantised).read_text())
    assert card.int8 is not None
    xml = quantised.with_name("disa-int8.xml")
    assert card.int8.xml_file == xml.name and card.int8.bin_file == "disa-int8.bin"
    assert card.int8.sha256_xml == file_sha256(xml)
    assert card.int8.sha256_bin == file_sha256(xml.with_suffix(".bin"))
    assert card.int8.calibration["volumes"] == ["a", "b", "c"]
    assert card.int8.kept_fp32 and "features.0" in card.int8.kept_fp32[0]
    assert 0.0 < card.int8.dot_error_vs_fp32["rms"] < 0.05
    assert int8_model_path(quantised) == xml.resolve()
    # The graph really is quantised: integer convolutions behind FakeQuantize nodes.
    ops = ov.Core().read_model(str(xml)).get_ordered_ops()
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops) >= 8


def test_int8_engine_serves_the_variant_close_to_fp32(quantised: Path) -> None:
    volume = _smooth_volume(10)  # not a calibration volume
    fp32 = DescriptorExtractor(quantised, engine="openvino-fp32", threads=1).extract(volume)
    extractor = DescriptorExtractor(quantised, engine="openvino-int8", threads=1)
    int8 = extractor.extract(volume)
    assert extractor.provider == "OpenVINO-CPU-int8"
    assert int8.shape == fp32.shape and int8.dtype == np.float32 and int8.flags.c_contiguous
    assert np.linalg.norm(int8, axis=-1).max() <= 1 + 1e-6
    err = _dot_errors(fp32, int8)
    assert np.abs(int8 - fp32).max() > 1e-4  # a different graph ran, not the fp32 one
    assert np.sqrt(np.mean(err**2)) < 0.05, "int8 dot products far from fp32"


def test_int8_tiled_equals_whole(quantised: Path) -> None:
    """Large volumes are tiled automatically: the int8 graph's static scales make every
    tile compute what the whole volume would."""
    from scipy import ndimage

    raw = ndimage.gaussian_filter(np.random.default_rng(11).normal(size=(120, 72, 64)), 2.0)
    volume = ((raw - raw.mean()) / raw.std()).astype(np.float32)
    whole = DescriptorExtractor(quantised, engine="openvino-int8", threads=1,
                                memory_budget_bytes=1 << 40)
    tiled = DescriptorExtractor(quantised, engine="openvino-int8", threads=1,
                                tile_voxels=150_000)
    assert len(whole.plan(volume.shape)) == 1 and len(tiled.plan(volume.shape)) > 1
    np.testing.assert_allclose(tiled.extract(volume), whole.extract(volume), atol=1e-4, rtol=0)


def test_auto_engine_takes_the_variant_only_when_the_card_names_it(
    quantised: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    monkeypatch.delenv("DISA_DESCRIPTOR_ENGINE", raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_engine(model_path=quantised) == "openvino-int8"
    # A copy whose int8 files are missing falls back to fp32 (and the engine, if asked
    # for by name, says what to run).
    bare = tmp_path / "disa.onnx"
    shutil.copy(quantised, bare)
    shutil.copy(card_path_for(quantised), card_path_for(bare))
    assert default_engine(model_path=bare) == "openvino-fp32"
    with pytest.raises(RuntimeError, match="disa-train quantise"):
        DescriptorExtractor(bare, engine="openvino-int8").extract(_smooth_volume(1))


def test_a_replaced_int8_file_is_refused(quantised: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(quantised.parent, folder)
    path = folder / quantised.name
    xml = folder / "disa-int8.xml"
    xml.write_text(xml.read_text().replace("FakeQuantize", "FakeQuantize ", 1))
    with pytest.raises(ModelIntegrityError, match=r"int8 model file .* sha256"):
        DescriptorExtractor(path, engine="openvino-int8").extract(_smooth_volume(1))


def test_int8_evaluation_goes_into_the_variant_entry(quantised: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(quantised.parent, folder)
    card_path = folder / "disa.json"
    result = {"pairs": 10, "mse": 0.05, "pearson_r": 0.5, "protocol": "p", "seed": 1}
    merge_into_card(card_path, result, int8=True)
    card = json.loads(card_path.read_text())
    assert card["int8"]["held_out_metrics"]["mse"] == 0.05
    assert card["held_out_metrics"] == {}  # the fp32 figures are untouched
    # A card without a variant says so instead of inventing an entry.
    plain = json.loads(card_path.read_text())
    plain.pop("int8")
    card_path.write_text(json.dumps(plain))
    with pytest.raises(ValueError, match="names no int8 variant"):
        merge_into_card(card_path, result, int8=True)


def test_calibration_uses_training_data_only() -> None:
    from disa.training.quantise import calibration_volumes

    phantom = sources.make_phantom(np.random.default_rng(3), (40, 40, 40), subject="p0")
    images, names = calibration_volumes(volumes=[phantom, phantom])
    assert len(images) == len(names) == 4
    assert all(im.dtype == np.float32 and im.shape == (40, 40, 40) for im in images)
    assert {n.split(":")[1] for n in names} <= set(TRAINING_SETTINGS)
    # The default set: installed training volumes and training-stream phantoms, never a
    # held-out source or setting.
    held_out = {v.subject for v in sources.load_split("held-out")}
    _, default_names = calibration_volumes(phantoms=1)
    subjects = {n.split(":")[0] for n in default_names}
    assert "phantom-training-0" in subjects and not subjects & held_out
    assert {n.split(":")[1] for n in default_names} <= set(TRAINING_SETTINGS)


def test_cli_quantise_refuses_a_model_that_does_not_match_its_card(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = DisaNet().eval()
    path = tmp_path / "disa.onnx"
    export_onnx(net, path)
    write_model_card(path, name="t", version="0", training={}, held_out_metrics={}, net=net)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError):
        train_main(["quantise", "--onnx", str(path), "--phantoms", "0"])
    assert not path.with_name("disa-int8.xml").exists()
