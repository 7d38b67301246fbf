"""MIND-SSC self-similarity context descriptors (Heinrich et al., MICCAI 2013).

The classical modality-independent baseline that DISA is compared with. Each
voxel gets 12 numbers that describe how its neighbourhood resembles itself,
not its intensities, so two modalities of the same anatomy give similar
descriptors and plain SSD between descriptor maps works as a multimodal
similarity.

Construction (all offsets in voxels, numpy axis order (z, y, x)):

* six neighbours at +-d along each axis (the vertices of an octahedron);
* the 12 pairs of those neighbours at squared distance 2 d^2 (its edges);
* per pair (a, b): D(p) = (I(p + a) - I(p + b))^2, box-averaged over a
  (2r + 1)^3 cube; shifts and the box filter replicate the border voxels;
* subtract the per-voxel minimum over the 12 channels, divide by the per-voxel
  mean over the channels (a local variance estimate, clamped to
  [1e-3, 1e3] x its mean over the volume) and map through exp(-x).

The result is invariant to affine intensity changes a * I + b with a > 0 (every
D scales by a^2, and so does the variance estimate).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["MIND_CHANNELS", "mind_pairs", "mind_ssc"]

MIND_CHANNELS = 12

# The variance estimate is clamped relative to its volume mean, so that flat
# regions (variance ~ 0) do not blow noise up to full contrast and a few very
# strong edges do not flatten everything else.
_VAR_CLAMP = (1e-3, 1e3)


def mind_pairs(dilation: int = 2) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 neighbour pairs (a, b) of MIND-SSC, as (dz, dy, dx) voxel offsets.

    Channel ``c`` of :func:`mind_ssc` compares the neighbours ``pairs[c]``.
    Pairs are the octahedron edges: two neighbours on different axes, so
    ``|a - b|^2 = 2 d^2``. Order: axis pairs (z, y), (z, x), (y, x), and within
    each the sign combinations (+, +), (+, -), (-, +), (-, -).
    """
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1 voxel, got {dilation}")
    pairs = []
    for ax_a, ax_b in itertools.combinations(range(3), 2):
        for sa, sb in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            a = [0, 0, 0]
            b = [0, 0, 0]
            a[ax_a] = sa * dilation
            b[ax_b] = sb * dilation
            pairs.append((tuple(a), tuple(b)))
    return pairs  # type: ignore[return-value]


def _box_sum(x: np.ndarray, radius: int) -> None:
    """Sum over the (2r + 1)^3 cube around each voxel, in place, replicate border.

    Separable running sums by slicing: for small r this is several times faster
    than scipy.ndimage.uniform_filter, whose passes along the slow axis stride
    through memory. Neighbours beyond the border take the edge voxel's value
    (the same as uniform_filter with mode="nearest", up to the factor).
    """
    if radius == 0:
        return
    for axis in range(x.ndim):
        n = x.shape[axis]
        src = np.moveaxis(x.copy(), axis, 0)
        acc = np.moveaxis(x, axis, 0)
        for k in range(1, radius + 1):
            if k < n:
                acc[k:] += src[: n - k]
                acc[: n - k] += src[k:]
            # Neighbours beyond the border replicate the edge slice.
            acc[: min(k, n)] += src[0]
            acc[max(n - k, 0) :] += src[-1]


def mind_ssc(volume: np.ndarray, radius: int = 1, dilation: int = 2) -> np.ndarray:
    """MIND-SSC descriptors of a 3D volume.

    Args:
        volume: (Z, Y, X) intensities in any units (numpy order of a SimpleITK
            array: z is the slowest axis). Voxels are treated as cubes; resample
            anisotropic volumes first if the neighbourhood should be isotropic
            in millimetres.
        radius: box-filter radius r in voxels; the patch is (2r + 1)^3.
        dilation: neighbour distance d in voxels.

    Returns:
        (Z, Y, X, 12) float32, channels last, C-contiguous, values in [0, 1]:
        exp(-x) with x >= 0, and every voxel has at least one channel equal to 1
        (its most self-similar pair). Very dissimilar pairs may underflow to 0
        in float32. Channel c compares the pair ``mind_pairs(dilation)[c]``.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (Z, Y, X), got shape {vol.shape}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0 voxels, got {radius}")
    pairs = mind_pairs(dilation)

    # Centre in float64 before going to float32: a large intensity offset
    # (CT in HU, +1000) would otherwise eat float32 precision in differences.
    centred = vol.astype(np.float64)
    centred -= centred.mean()
    d = dilation
    padded = np.pad(centred.astype(np.float32), d, mode="edge")
    shape = vol.shape

    def shifted(offset: tuple[int, int, int]) -> np.ndarray:
        # View of the edge-padded volume whose voxel p holds I(clamp(p + offset)).
        return padded[tuple(slice(d + o, d + o + n) for o, n in zip(offset, shape, strict=True))]

    # Channels-first while computing: reductions over 12 contiguous volumes are
    # much faster than over a length-12 last axis; one transposing copy at the
    # end gives the channels-last layout.
    dist = np.empty((MIND_CHANNELS, *shape), dtype=np.float32)
    for c, (a, b) in enumerate(pairs):
        np.subtract(shifted(a), shifted(b), out=dist[c])
        np.square(dist[c], out=dist[c])
        _box_sum(dist[c], radius)
    # Box sums rather than means: the constant factor (2r + 1)^3 cancels in the
    # division by the variance estimate (and in its clamp, which is relative).

    dist -= dist.min(axis=0)
    variance = dist.mean(axis=0)
    mean_variance = float(variance.mean(dtype=np.float64))
    if mean_variance > 0.0:
        np.clip(
            variance, _VAR_CLAMP[0] * mean_variance, _VAR_CLAMP[1] * mean_variance, out=variance
        )
    else:
        # Constant volume: every distance is 0 and any positive divisor gives
        # exp(0) = 1 in all channels.
        variance.fill(1.0)
    np.negative(variance, out=variance)  # exp(dist / -variance) = exp(-x)
    dist /= variance
    np.exp(dist, out=dist)
    out = np.ascontiguousarray(dist.transpose(1, 2, 3, 0))
    return out
