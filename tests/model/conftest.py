"""Fixtures: randomly initialised (seeded) DisaNets exported to ONNX in a temp folder.

No shipped weights are needed: every property tested here (shapes, geometry,
ONNX = PyTorch, tiling = whole volume) holds for any weights. torch is only
needed to build and export the nets; the runtime under test never imports it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from disa.training.network import DisaNet  # noqa: E402
from disa.training.onnx_export import export_onnx, write_model_card  # noqa: E402


def make_net(seed: int = 0, head_gain: float = 8.0) -> DisaNet:
    """A seeded random net whose head is scaled up so that many descriptors
    leave the unit ball (default init gives norms around 0.1, which would
    leave the final clip untested)."""
    torch.manual_seed(seed)
    net = DisaNet().eval()
    with torch.no_grad():
        net.head.weight.mul_(head_gain)
    return net


def make_symmetric_net(seed: int = 1) -> DisaNet:
    """A net whose every kernel is symmetric under flips of each axis.

    Such a net commutes with mirroring the volume, so a blob symmetric about a
    point yields descriptor activity symmetric about the same point: the
    geometry test can then locate it exactly.
    """
    net = make_net(seed, head_gain=4.0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv3d):
                w = module.weight
                for dim in (2, 3, 4):
                    w.copy_(0.5 * (w + w.flip(dim)))
    return net


@pytest.fixture(scope="session")
def net() -> DisaNet:
    return make_net()


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory, net: DisaNet) -> Path:
    """The seeded net as ONNX with its model card (disa.onnx + disa.json)."""
    path = tmp_path_factory.mktemp("model") / "disa.onnx"
    export_onnx(net, path)
    write_model_card(
        path,
        name="disa-test",
        version="0.0.0",
        training={"data": "none (random weights)", "recipe": "none", "command": "", "minutes": 0},
        held_out_metrics={},
        net=net,
    )
    return path


@pytest.fixture(scope="session")
def symmetric_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = make_symmetric_net()
    path = tmp_path_factory.mktemp("symmetric") / "disa.onnx"
    export_onnx(net, path)
    write_model_card(
        path,
        name="disa-symmetric-test",
        version="0.0.0",
        training={
            "data": "none",
            "recipe": "flip-symmetric random kernels",
            "command": "",
            "minutes": 0,
        },
        held_out_metrics={},
        input_spacing_mm=4.0,
        net=net,
    )
    return path
