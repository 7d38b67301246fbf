"""Tests of the ONNX export: same numbers as PyTorch, dynamic axes, atomic write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from disa.model.card import file_sha256  # noqa: E402
from disa.training.network import DisaNet  # noqa: E402
from disa.training.onnx_export import export_onnx  # noqa: E402


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_onnx_equals_pytorch(net: DisaNet, onnx_model: Path) -> None:
    x = np.random.default_rng(0).normal(size=(1, 1, 40, 36, 28)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = _run(onnx_model, x)
    assert got.shape == expected.shape == (1, 16, 10, 9, 7)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Clipped vectors are part of the comparison (the fixture's head is scaled up).
    assert (np.linalg.norm(expected, axis=1) > 0.999).any()


def test_dynamic_batch_and_spatial_axes(net: DisaNet, onnx_model: Path) -> None:
    x = np.random.default_rng(1).normal(size=(2, 1, 13, 22, 9)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(onnx_model, x), expected, atol=1e-4, rtol=0)


def test_export_is_atomic_and_returns_sha256(net: DisaNet, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.onnx"
    digest = export_onnx(net, path)
    assert digest == file_sha256(path)
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    assert net.training is False
