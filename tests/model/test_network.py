"""Tests of the PyTorch DisaNet: size, output grid, unit ball, stride alignment."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from disa.model.card import PARAMETERS, RECEPTIVE_FIELD_VOXELS  # noqa: E402
from disa.training.network import (  # noqa: E402
    CHANNELS,
    STRIDE,
    BlurPool3d,
    DisaNet,
    count_trainable_parameters,
    receptive_field,
)

from .conftest import make_net  # noqa: E402


def test_trainable_parameters_are_90752() -> None:
    net = DisaNet()
    assert count_trainable_parameters(net) == 90_752 == PARAMETERS
    # The blur kernels are fixed buffers, not parameters.
    assert all("kernel" not in name for name, _ in net.named_parameters())
    assert sum(1 for name, _ in net.named_buffers() if name.endswith("kernel")) == 2


def test_receptive_field_matches_constant() -> None:
    assert receptive_field(DisaNet()) == RECEPTIVE_FIELD_VOXELS == 49


def test_blur_kernel_is_normalised_binomial() -> None:
    blur = BlurPool3d(3)
    k = blur.kernel
    assert k.shape == (3, 1, 5, 5, 5)
    assert torch.allclose(k.sum(dim=(1, 2, 3, 4)), torch.ones(3))
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    assert torch.allclose(k[0, 0, :, 2, 2] / k[0, 0, 2, 2, 2], taps / taps[2])
    # A constant volume stays constant (replicate padding, normalised kernel).
    x = torch.full((1, 3, 7, 6, 5), 2.5)
    assert torch.allclose(blur(x), torch.full((1, 3, 4, 3, 3), 2.5))


@pytest.mark.parametrize("shape", [(9, 10, 11), (1, 3, 2), (13, 17, 8), (4, 5, 6)])
def test_output_shape_is_ceil_ceil_half(shape: tuple[int, int, int]) -> None:
    net = make_net()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *shape))
    expected = tuple(((n + 1) // 2 + 1) // 2 for n in shape)
    assert out.shape == (2, CHANNELS, *expected)


def test_output_lies_in_unit_ball_and_clip_is_active() -> None:
    net = make_net()
    with torch.no_grad():
        x = torch.randn(1, 1, 24, 20, 16)
        raw = torch.linalg.vector_norm(net.forward_unnormalised(x), dim=1)
        norm = torch.linalg.vector_norm(net(x), dim=1)
    assert (raw > 1).any() and (raw < 1).any()
    assert norm.max() <= 1 + 1e-6
    inside = raw < 1
    assert torch.allclose(norm[inside], raw[inside])


def test_shift_by_stride_shifts_output_by_one_voxel() -> None:
    # Output voxel i is centred on input voxel 4i: moving the content by 4
    # input voxels moves the descriptors by exactly one output voxel
    # (compared away from the borders, where padding differs).
    net = make_net()
    x = torch.randn(1, 1, 72, 40, 40)
    with torch.no_grad():
        a = net(x[:, :, STRIDE:, :, :])
        b = net(x[:, :, :-STRIDE, :, :])
    inner = slice(8, 8 + 2)
    assert torch.allclose(a[:, :, inner], b[:, :, 9:11], atol=1e-5)
