"""The shipped weights: they load in the runtime and register a held-out multimodal pair.

The pair is the real CT head template (totalsegmentator, held out of training;
`.ci/run` installs it with scripts/install_training_data.sh) against a
FLAIR-like MR synthesised from its tissue maps (a contrast table no training
setting uses), the MR moved by a known rigid transform of about 20 mm / 15 deg
carried in its header.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from disa.model.card import (
    default_card_path,
    default_model_path,
    int8_model_path,
    load_model_card,
)
from disa.model.runtime import DescriptorExtractor, default_engine
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def test_shipped_model_card_matches_its_file() -> None:
    card_path, model_path = default_card_path(), default_model_path()
    assert card_path is not None and model_path is not None and model_path.is_file()
    card = load_model_card(card_path)  # verifies the sha256
    assert card.channels == 16 and card.output_stride == 4
    assert card.held_out_metrics.get("pairs", 0) > 500


def test_shipped_model_registers_a_held_out_ct_mr_pair() -> None:
    from disa.training.sources import available_sources, load_volume
    from disa.training.synthesis import synthesize

    assert "ct-brain-atlas" in available_sources("held-out"), "totalsegmentator not installed"
    volume = load_volume("ct-brain-atlas")
    rng = np.random.default_rng(5)
    fixed = _image(synthesize(volume, "native", rng))
    moving = _image(synthesize(volume, "flair", rng))
    center = fixed.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in fixed.GetSize()])
    truth = sitk.Euler3DTransform(center, *np.deg2rad([8.0, -6.0, 10.0]), (12.0, -9.0, 10.0))
    # The MR voxel showing fixed point x sits at T(x): T is the fixed -> moving mapping.
    moving.SetOrigin(truth.TransformPoint(moving.GetOrigin()))
    moving.SetDirection(truth.GetMatrix())
    result = register(fixed, moving, RegistrationOptions(similarity="disa", init="geometry",
                                                         starts=200, seed=1))
    mask = sitk.GetArrayFromImage(fixed) > 0.05
    idx = np.argwhere(mask)[::50, ::-1].astype(float)
    points = [fixed.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in idx]
    initial = np.mean([np.linalg.norm(np.subtract(truth.TransformPoint(p), p)) for p in points])
    error = np.mean([np.linalg.norm(np.subtract(result.transform.TransformPoint(p),
                                                truth.TransformPoint(p))) for p in points])
    assert initial > 15.0
    assert error < 3.0, f"TRE {error:.1f} mm from {initial:.1f} mm"
    assert result.similarity == "disa" and result.model is not None
    assert result.model["sha256"] == load_model_card(default_card_path()).sha256
    # Provenance: which engine ran the net.
    assert result.model["engine"] == default_engine(model_path=default_model_path())


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_shipped_descriptors_vary_over_a_head(precision: str) -> None:
    """Descriptors must carry structure above the int8 code step (1/127), or the
    objective is flat: a model whose descriptors are one constant vector fails here."""
    from disa.registration.pipeline import descriptor_maps, prepare
    from disa.training.sources import load_volume
    from disa.training.synthesis import synthesize

    volume = load_volume("ct-brain-atlas")
    image = _image(synthesize(volume, "native", np.random.default_rng(0)))
    prepared = prepare(image, 2.0, None)
    options = RegistrationOptions(similarity="disa", precision=precision)
    descriptor_map, stride, _ = descriptor_maps(prepared, "disa", options)
    if precision == "int8":
        descriptor_map = descriptor_map.quantised()
    inside = prepared.mask[::stride, ::stride, ::stride]
    values = descriptor_map.as_float()[inside]  # (descriptors in the head, channels)
    assert len(values) > 500
    assert values.std(axis=0).max() > 2.0 / 127


def test_shipped_int8_variant_matches_its_card_and_keeps_the_held_out_error() -> None:
    """The int8 variant that the engine `auto` serves on CPU: files as the card states,
    evaluated held out, and no worse there than the fp32 network by more than 2 %."""
    model_path = default_model_path()
    assert model_path is not None
    assert int8_model_path(model_path) is not None  # present, sha256 as the card states
    card = load_model_card(model_path)
    assert card.int8 is not None and len(card.int8.kept_fp32) >= 1
    int8_metrics, fp32_metrics = card.int8.held_out_metrics, card.held_out_metrics
    assert int8_metrics["pairs"] == fp32_metrics["pairs"] > 500  # the same protocol and pairs
    assert int8_metrics["mse"] <= 1.02 * fp32_metrics["mse"]


def test_shipped_int8_descriptors_follow_fp32_on_held_out_anatomy() -> None:
    pytest.importorskip("openvino")
    from disa.registration.pipeline import prepare
    from disa.training.sources import load_volume
    from disa.training.synthesis import synthesize

    model_path = default_model_path()
    assert model_path is not None
    volume = load_volume("ct-brain-atlas")
    prepared = prepare(_image(synthesize(volume, "flair", np.random.default_rng(2))), 2.0, None)
    fp32 = DescriptorExtractor(model_path, engine="openvino-fp32").extract(prepared.volume)
    int8 = DescriptorExtractor(model_path, engine="openvino-int8").extract(prepared.volume)
    inside = prepared.mask[::4, ::4, ::4]
    a, b = fp32[inside], int8[inside]
    idx = np.random.default_rng(0).integers(0, len(a), (5000, 2))
    err = (np.einsum("nc,nc->n", b[idx[:, 0]], b[idx[:, 1]])
           - np.einsum("nc,nc->n", a[idx[:, 0]], a[idx[:, 1]]))
    assert np.sqrt(np.mean(err**2)) < 0.02
