"""The DISA descriptor network (PyTorch), used by training and ONNX export only.

The runtime never imports this module: it runs the exported ONNX graph through
ONNX Runtime (see `disa.model.runtime`). Architecture (docs/DESIGN.md,
"The method and the network"):

    conv 1->8, res 8, conv 8->16, blur, res 16, conv 16->32, blur, res 32,
    1x1x1 conv 32->16 (no bias, no activation), clip to the unit ball.

Input: (N, 1, Z, Y, X) float32, per-volume z-scored intensities on the card's
isotropic grid. Output: (N, 16, ceil(ceil(Z/2)/2), ...) with output voxel i
centred on input voxel 4i (every stride-2 step keeps the even input voxels).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from disa.model.card import CHANNELS, RECEPTIVE_FIELD_VOXELS, STRIDE

__all__ = [
    "CHANNELS",
    "LEAKY_SLOPE",
    "RECEPTIVE_FIELD_VOXELS",
    "STRIDE",
    "BlurPool3d",
    "ConvBlock",
    "DisaNet",
    "ResidualBlock",
    "clip_to_unit_ball",
]

LEAKY_SLOPE = 0.01


class ConvBlock(nn.Module):
    """Conv3d (kernel 3, stride 1, zero padding 1, bias) followed by LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), LEAKY_SLOPE)


class ResidualBlock(nn.Module):
    """Two conv blocks; the block's input is added after the second activation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = ConvBlock(channels, channels)
        self.second = ConvBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.second(self.first(x))


class BlurPool3d(nn.Module):
    """Anti-aliased downsampling by 2: depthwise 5x5x5 binomial filter, stride 2.

    The filter is fixed (a buffer, not a parameter, so it is neither trained
    nor counted). Replicate padding of 2 keeps output voxel j centred on input
    voxel 2j and avoids darkening the border as zero padding would.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
        kernel = kernel / kernel.sum()
        self.channels = channels
        self.register_buffer("kernel", kernel.expand(channels, 1, 5, 5, 5).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2, 2, 2), mode="replicate")
        return F.conv3d(x, self.kernel, stride=2, groups=self.channels)


def clip_to_unit_ball(d: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Divide each descriptor vector (along `dim`) by max(norm, 1).

    Vectors inside the unit ball are unchanged; the others are projected onto
    the sphere, so every component and every dot product lies in [-1, 1].
    """
    norm = torch.linalg.vector_norm(d, dim=dim, keepdim=True)
    return d / torch.clamp(norm, min=1.0)


class DisaNet(nn.Module):
    """Fully convolutional 3D descriptor network: 90,752 trainable parameters, stride 4."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBlock(1, 8),
            ResidualBlock(8),
            ConvBlock(8, 16),
            BlurPool3d(16),
            ResidualBlock(16),
            ConvBlock(16, 32),
            BlurPool3d(32),
            ResidualBlock(32),
        )
        self.head = nn.Conv3d(32, CHANNELS, kernel_size=1, bias=False)

    def forward_unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors before the unit-ball clip, (N, 16, Z', Y', X').

        Training may want the raw head output (e.g. to penalise norms above 1).
        """
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, Z, Y, X) z-scored intensities -> (N, 16, Z', Y', X') unit-ball descriptors."""
        return clip_to_unit_ball(self.forward_unnormalised(x), dim=1)


def count_trainable_parameters(net: nn.Module) -> int:
    """Number of trainable scalars (the blur kernels are buffers and do not count)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def receptive_field(net: DisaNet | None = None) -> int:
    """Receptive field of one output voxel in input voxels, from the layer sequence.

    Walks the layers: a kernel k at cumulative stride j widens the field by
    (k - 1) * j. Kept as code so that a change of architecture cannot leave
    `RECEPTIVE_FIELD_VOXELS` (used for the tiling halo) silently stale.
    """
    net = net if net is not None else DisaNet()
    field, jump = 1, 1
    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            k, s = module.kernel_size[0], module.stride[0]
        elif isinstance(module, BlurPool3d):
            k, s = 5, 2
        else:
            continue
        field += (k - 1) * jump
        jump *= s
    return field
