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
  (2r + 1)^3 cube; the image is read with its border voxels replicated, for the
  shifts and the cube alike (D is defined beyond the border too);
* subtract the per-voxel minimum over the 12 channels, divide by the per-voxel
  mean over the channels (a local variance estimate, clamped to
  [1e-3, 1e3] x its mean over the volume) and map through exp(-x).

The result is invariant to affine intensity changes a * I + b with a > 0 (every
D scales by a^2, and so does the variance estimate).
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit, prange

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


def _unique_shifts(pairs: list[tuple[tuple[int, int, int], tuple[int, int, int]]]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct difference shifts u of the pairs, up to sign, and for each channel
    which shift it uses and at which offset it reads that shift's distances.

    Channel (a, b) has D(p) = (I(p + a) - I(p + b))^2. With s = b - a and
    E_u(q) = (I(q) - I(q + u))^2: D(p) = E_s(p + a), and for s = -u,
    D(p) = E_u(p + b). The 12 octahedron edges have only 6 distinct shifts up to
    sign, so 6 box-filtered distance volumes serve all 12 channels.
    """
    shifts: list[tuple[int, int, int]] = []
    channel_shift = np.empty(len(pairs), np.int64)
    channel_offset = np.empty((len(pairs), 3), np.int64)
    for c, (a, b) in enumerate(pairs):
        s = tuple(bi - ai for ai, bi in zip(a, b, strict=True))
        negative = tuple(-si for si in s)
        if negative in shifts:
            channel_shift[c], channel_offset[c] = shifts.index(negative), b
        else:
            if s not in shifts:
                shifts.append(s)  # type: ignore[arg-type]
            channel_shift[c], channel_offset[c] = shifts.index(s), a  # type: ignore[arg-type]
    return np.array(shifts, np.int64), channel_shift, channel_offset


@njit(cache=True, parallel=True)
def _boxed_distances(padded: np.ndarray, shifts: np.ndarray, radius: int, dilation: int,
                     shape: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """B[u, j] = sum over the (2r + 1)^3 cube around q of E_u, for q = j - d (voxels).

    ``padded``: the image edge-padded by m = 2 d + r voxels per side (so every read of
    the extended image is in range); ``shape``: the image's (Z, Y, X). B covers the
    image grown by d per side, the farthest any channel reads (its offset a or b).
    Separable running sums: x on the fly as E is computed, y over a ring of the last
    2r + 1 rows, then z. The innermost loops run along x so that they vectorise.
    """
    nz, ny, nx = shape[0], shape[1], shape[2]
    d, width = dilation, 2 * radius + 1
    ez, ey = nz + 2 * d + 2 * radius, ny + 2 * d + 2 * radius  # E's extent, z and y
    bz, by, bx = nz + 2 * d, ny + 2 * d, nx + 2 * d  # B's extent
    ex = bx + 2 * radius
    boxed = np.empty((shifts.shape[0], bz, by, bx), np.float32)
    along_y = np.empty((ez, by, bx), np.float32)
    for u in range(shifts.shape[0]):
        uz, uy, ux = shifts[u, 0], shifts[u, 1], shifts[u, 2]
        for iz in prange(ez):
            ring = np.empty((width, bx), np.float32)  # x sums of the last 2r + 1 E rows
            e = np.empty(ex, np.float32)
            for iy in range(ey):
                # E at E-index i reads the padded image at i + d and at i + d + u.
                a = padded[iz + d, iy + d, d:]
                b = padded[iz + d + uz, iy + d + uy, d + ux:]
                for i in range(ex):
                    diff = a[i] - b[i]
                    e[i] = diff * diff
                slot = ring[iy % width]
                for jx in range(bx):
                    slot[jx] = e[jx]
                for t in range(1, width):
                    for jx in range(bx):
                        slot[jx] += e[jx + t]
                if iy >= width - 1:  # rows iy - 2r .. iy are in: their y sum
                    out = along_y[iz, iy - width + 1]
                    first = ring[(iy + 1) % width]
                    for jx in range(bx):
                        out[jx] = first[jx]
                    for t in range(1, width):
                        other = ring[(iy + 1 + t) % width]
                        for jx in range(bx):
                            out[jx] += other[jx]
        for jz in prange(bz):
            for jy in range(by):
                out = boxed[u, jz, jy]
                first = along_y[jz, jy]
                for jx in range(bx):
                    out[jx] = first[jx]
                for t in range(1, width):
                    other = along_y[jz + t, jy]
                    for jx in range(bx):
                        out[jx] += other[jx]
    return boxed


# (Inlined into both passes: as a function of its own the first compile after an install
# took 12 s against 7 s.)
@njit(cache=True, inline="always")
def _gather_row(boxed: np.ndarray, channel_shift: np.ndarray, channel_offset: np.ndarray,
                d: int, z: int, y: int, rows: np.ndarray, low: np.ndarray
                ) -> None:  # pragma: no cover - compiled
    """rows[c, x] = D_c(z, y, x) - min over the channels; low[x] scratch."""
    n_chan, nx = rows.shape
    for c in range(n_chan):
        source = boxed[channel_shift[c], z + d + channel_offset[c, 0],
                       y + d + channel_offset[c, 1], d + channel_offset[c, 2]:]
        row = rows[c]
        for x in range(nx):
            row[x] = source[x]
    low[:] = rows[0]
    for c in range(1, n_chan):
        for x in range(nx):
            low[x] = min(low[x], rows[c, x])
    for c in range(n_chan):
        for x in range(nx):
            rows[c, x] -= low[x]


@njit(cache=True, parallel=True)
def _variance(boxed: np.ndarray, channel_shift: np.ndarray, channel_offset: np.ndarray,
              dilation: int, variance: np.ndarray) -> None:  # pragma: no cover - compiled
    """variance[p] = mean over the channels of D_c(p) - min_c D_c(p)."""
    nz, ny, nx = variance.shape
    n_chan = channel_shift.shape[0]
    for z in prange(nz):
        rows = np.empty((n_chan, nx), np.float32)
        low = np.empty(nx, np.float32)
        for y in range(ny):
            _gather_row(boxed, channel_shift, channel_offset, dilation, z, y, rows, low)
            mean = variance[z, y]
            mean[:] = rows[0]
            for c in range(1, n_chan):
                for x in range(nx):
                    mean[x] += rows[c, x]
            for x in range(nx):
                mean[x] /= n_chan


@njit(cache=True, parallel=True)
def _exponents(boxed: np.ndarray, channel_shift: np.ndarray, channel_offset: np.ndarray,
               dilation: int, variance: np.ndarray, low: float, high: float,
               out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[p, c] = -(D_c(p) - min_c D_c(p)) / clip(variance[p], low, high), channels last."""
    nz, ny, nx, n_chan = out.shape
    for z in prange(nz):
        rows = np.empty((n_chan, nx), np.float32)
        scratch = np.empty(nx, np.float32)
        for y in range(ny):
            _gather_row(boxed, channel_shift, channel_offset, dilation, z, y, rows, scratch)
            for x in range(nx):
                scratch[x] = np.float32(-1.0) / min(max(variance[z, y, x], np.float32(low)),
                                                    np.float32(high))
            for c in range(n_chan):  # channels first here: this loop vectorises
                row = rows[c]
                for x in range(nx):
                    row[x] *= scratch[x]
            out_row = out[z, y]
            for x in range(nx):
                for c in range(n_chan):
                    out_row[x, c] = rows[c, x]


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
    shifts, channel_shift, channel_offset = _unique_shifts(pairs)

    # Centre in float64 before going to float32: a large intensity offset
    # (CT in HU, +1000) would otherwise eat float32 precision in differences.
    centred = vol.astype(np.float64)
    centred -= centred.mean()
    padded = np.pad(centred.astype(np.float32), 2 * dilation + radius, mode="edge")
    # Compiled rather than numpy: 6 box-filtered distance volumes serve the 12
    # channels, and the last pass writes the channels-last layout directly (numpy
    # needed 12 box filters, per-channel temporaries and a transposing copy).
    boxed = _boxed_distances(padded, shifts, radius, dilation,
                             np.array(vol.shape, np.int64))
    variance = np.empty(vol.shape, np.float32)
    _variance(boxed, channel_shift, channel_offset, dilation, variance)
    # Box sums rather than means: the constant factor (2r + 1)^3 cancels in the
    # division by the variance estimate (and in its clamp, which is relative).
    mean_variance = float(variance.mean(dtype=np.float64))
    if mean_variance > 0.0:
        low, high = _VAR_CLAMP[0] * mean_variance, _VAR_CLAMP[1] * mean_variance
    else:
        # Constant volume: every distance is 0 and any positive divisor gives
        # exp(0) = 1 in all channels.
        low = high = 1.0
    out = np.empty((*vol.shape, MIND_CHANNELS), np.float32)
    _exponents(boxed, channel_shift, channel_offset, dilation, variance, low, high, out)
    np.exp(out, out=out)  # numpy's SIMD exp: 3x numba's scalar one here
    return out
