"""Dense descriptor maps on physical grids (DISA network output or MIND-SSC).

A map holds one C-vector per voxel of its grid, channels last, as float32 or as
symmetric int8 codes (value = code x scale), and a validity in [0, 1] per voxel:
1 where the image has data (inside its field of view, ultrasound sector and
mask), 0 elsewhere. The registration objective reads fixed descriptors at sample
points and trilinearly interpolates moving ones and their validity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit, prange

from disa.core.grid import Grid
from disa.model.codes import INT8_SCALE


@dataclass(frozen=True)
class DescriptorMap:
    """Descriptors (Z, Y, X, C) on ``grid``; physical value = data * scale.

    ``valid`` (Z, Y, X) float32 in [0, 1], None meaning valid everywhere: where the
    image has data. Points of the other image that land where it is 0 count neither
    for nor against a pose (the overlap-normalised objective).

    ``open_faces``: which faces of the grid (x low, x high, y low, y high, z low, z high)
    lie in air, so that the objective reads a point beyond one as the face's own
    descriptor and validity (kernels.py); None: none (a point beyond the grid counts
    neither for nor against a pose).
    """

    data: np.ndarray
    grid: Grid
    scale: float = 1.0
    valid: np.ndarray | None = None
    open_faces: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 4 or tuple(self.data.shape[:3]) != tuple(self.grid.shape):
            raise ValueError(f"descriptor array {self.data.shape} does not match grid "
                             f"{self.grid.shape}")
        if self.valid is not None and tuple(self.valid.shape) != tuple(self.grid.shape):
            raise ValueError(f"validity {self.valid.shape} does not match grid "
                             f"{self.grid.shape}")

    @property
    def faces(self) -> np.ndarray:
        """``open_faces`` as the kernels take it: uint8 (6,), 1 where a face is open."""
        return np.asarray(self.open_faces or (False,) * 6, dtype=np.uint8)

    @property
    def validity(self) -> np.ndarray:
        """The validity (Z, Y, X) float32, C-contiguous (ones when none was given)."""
        if self.valid is None:
            return np.ones(self.grid.shape, dtype=np.float32)
        return np.ascontiguousarray(self.valid, dtype=np.float32)

    def with_validity(self, valid: np.ndarray | None) -> DescriptorMap:
        """The same descriptors with validity ``valid`` (bool or float on this grid)."""
        v = None if valid is None else np.ascontiguousarray(valid, dtype=np.float32)
        return DescriptorMap(self.data, self.grid, self.scale, v, self.open_faces)

    def grid_only(self) -> DescriptorMap:
        """This map's grid, scale, channels and validity with no descriptors: a read-only
        view of zeros that holds no memory. What an objective keeps of the map it samples
        once it has read the values at its sample points (``DescriptorObjective.
        release_fixed_map``); never a map to read descriptors from."""
        zeros = np.broadcast_to(np.zeros((1, 1, 1, self.channels), self.data.dtype),
                                self.data.shape)
        return DescriptorMap(zeros, self.grid, self.scale, self.valid, self.open_faces)

    @cached_property
    def valid_moments(self) -> tuple[np.ndarray, float]:
        """(mean descriptor (C,), mean squared norm) over the valid voxels, float64 physical
        values, from a regular subsample of at most ~200,000 voxels (a mean needs no more).
        Cached: every objective on this map (one per level and orientation bin) needs it.
        Compiled, one pass without float64 copies of the map (numpy's version took 30 ms
        a head map, 22 maps a registration)."""
        data = self.data.reshape(-1, self.channels)
        stride = max(1, len(data) // 200_000)
        valid = self.validity.reshape(-1)
        total, weighted, squares = _moments(data, valid, stride, float(self.scale))
        if total <= 0:  # (no valid voxel: the plain mean)
            total, weighted, squares = _moments(data, np.ones_like(valid), stride,
                                                float(self.scale))
        return weighted / total, squares / total

    @cached_property
    def _smoothings(self) -> dict[float, DescriptorMap]:
        """``smoothed`` results by sigma (voxels). Why: the re-oriented refinement smooths
        the same fixed map for the search's winner and each runner-up basin (up to 4 times
        per registration, 0.2-0.5 s each on a torso map)."""
        return {}

    @property
    def channels(self) -> int:
        return int(self.data.shape[3])

    @property
    def is_int8(self) -> bool:
        return self.data.dtype == np.int8

    def as_float(self) -> np.ndarray:
        """The descriptors as float32 values."""
        return (self.data.astype(np.float32) * np.float32(self.scale)) if self.is_int8 \
            else self.data.astype(np.float32, copy=False)

    def quantised(self) -> DescriptorMap:
        """Symmetric int8 codes round(x * 127) of a map whose values lie in [-1, 1].

        DISA descriptors lie in the unit ball, so every component is in [-1, 1]
        and the code loses at most 1/254 per component (docs/DESIGN.md, "The method
        and the network").
        """
        if self.is_int8:
            return self
        # The same codes as disa.model.codes.encode_int8 (tests/registration/
        # test_descriptor_map_speed.py checks it) in one pass without float temporaries:
        # 0.27 s -> ~0.03 s for a 12-channel torso map (numpy's four passes each
        # allocated and wrote a map-sized array).
        values = np.ascontiguousarray(self.as_float())
        codes = np.empty(values.shape, dtype=np.int8)
        _encode_int8(values.reshape(-1), codes.reshape(-1))
        return DescriptorMap(codes, self.grid, INT8_SCALE, self.valid, self.open_faces)

    def pooled(self) -> DescriptorMap:
        """Half resolution: [1, 2, 1]/4 smoothing then every second voxel.

        The binomial filter is centred, so voxel i of the result sits on voxel
        2i of this map and the grid keeps its origin (Grid.strided(2)).
        """
        # Beyond an open face the map goes on as its face (kernels.py): the filter reads
        # that too, instead of zeros that would shrink the face's descriptors by a quarter.
        values = _pooled_volume(self.data, float(self.scale) if self.is_int8 else 1.0,
                                edge=self.open_faces is not None and any(self.open_faces))
        valid = None
        if self.valid is not None:
            # A pooled node is as valid as the data its filter reads (edges taper).
            valid = _pooled_volume(self.validity[..., None], 1.0, edge=True)[..., 0]
        pooled = DescriptorMap(np.ascontiguousarray(values), self.grid.strided(2), 1.0,
                               None if valid is None else np.ascontiguousarray(valid),
                               self.open_faces)
        return pooled.quantised() if self.is_int8 else pooled

    def smoothed(self, sigma_voxels: float) -> DescriptorMap:
        """Each channel under a Gaussian of ``sigma_voxels`` (this map's voxels); same grid.

        Why (the final refinement): trilinear interpolation blurs the moving descriptors
        between their voxels and not at them, so an unsmoothed map scores poses that
        put the sample points on its lattice better, and the re-gridded moving map's
        lattice follows the current rotation: rotations stuck 1-2 mm (at the sample
        radius) from the optimum. Smoothing both maps by about a voxel makes that
        blur small against the content (t1-t2 realistic cases: TRE p50 1.2 -> 0.7 mm).
        """
        if sigma_voxels <= 0:
            return self
        key = float(sigma_voxels)
        if key not in self._smoothings:
            self._smoothings[key] = self._gaussian(key)
        return self._smoothings[key]

    def _gaussian(self, sigma_voxels: float) -> DescriptorMap:
        """``smoothed`` computed: scipy.ndimage.gaussian_filter(as_float(), (s, s, s, 0),
        mode="nearest") (truncate 4), then int8 codes again for an int8 map (in float32:
        codes one off on about one value in a million, see ``_gaussian_run``).

        Why not scipy itself: on the channel-last (Z, Y, X, 12) maps it took 0.3-0.5 s a
        call on a torso map (2.7 s on a loaded machine), 32 calls per registration. The
        numba passes below fold the int8 decode into the first pass and the encode into
        the last: 0.35 -> 0.13 s on the torso case's fixed int8 map (118, 121, 134, 12)
        with scipy's float64 arithmetic (2026-12-05); float32, flat interior runs and
        one z plane at a time (``_gaussian_volume``): 0.15-0.19 -> 0.05-0.08 s on torso
        moving maps of (110, 90, 140, 12) to (113, 106, 143, 12) (2026-12-06;
        benchmarks/README.md, "Re-orientation stage speed").
        """
        weights = gaussian_weights(sigma_voxels)
        data = self.data if self.is_int8 or self.data.dtype == np.float32 \
            else self.data.astype(np.float32)
        data = np.ascontiguousarray(data)
        # (as_float ignores the scale of a float map; so does this, for the same numbers.)
        scale = float(self.scale) if self.is_int8 else 1.0
        nz, ny, nx, nc = data.shape
        out = np.empty(data.shape, dtype=np.int8 if self.is_int8 else np.float32)
        _gaussian_volume(data.reshape(nz, ny * nx * nc), out.reshape(nz, ny * nx * nc),
                         weights, scale, ny, nc, self.is_int8)
        return DescriptorMap(out, self.grid, INT8_SCALE if self.is_int8 else 1.0, self.valid,
                             self.open_faces)

    def masked(self, mask: np.ndarray) -> DescriptorMap:
        """Validity set to 0 where ``mask`` (bool on this grid) is False: no similarity there.

        Why not zero the descriptors (as until 2026-12-04): a point on a zeroed moving
        descriptor still counted, as 0 (dot) or ||F||^2 (SSD), so a small moving mask
        pulled the fixed foreground onto it; gated by validity it no longer counts.
        """
        return self.with_validity(self.validity * mask)

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Descriptors (N, C) float32 at LPS mm ``points`` (N, 3), trilinear; NaN rows
        outside the grid. Physical values (data x scale; the scale of a float map is 1).

        A point is inside when its continuous index lies within [0, n - 1] on every axis
        (voxel centres of the first and last voxel). Plain numpy for a few thousand points
        at a time (the viewer's heatmap, a displacement field at display pixels); the
        objective's compiled kernels interpolate its sample points themselves. The
        validity is not consulted: the caller masks what it must.
        """
        data = self.data
        shape_xyz = np.array(self.grid.size_xyz)
        idx = self.grid.to_index(np.asarray(points, dtype=np.float64).reshape(-1, 3))
        eps = 1e-6
        inside = np.all((idx >= -eps) & (idx <= shape_xyz - 1 + eps), axis=1)
        idx = np.clip(idx, 0.0, shape_xyz - 1.0)
        # The last cell's base is n - 2, so that a point on the last voxel centre takes
        # weight 1 from it (and a one-voxel axis reads its one voxel twice).
        base = np.minimum(np.floor(idx).astype(np.int64), np.maximum(shape_xyz - 2, 0))
        frac = (idx - base).astype(np.float32)
        out = np.zeros((idx.shape[0], data.shape[3]), dtype=np.float32)
        for dx, dy, dz in _CORNERS:
            weight = ((frac[:, 0] if dx else 1.0 - frac[:, 0])
                      * (frac[:, 1] if dy else 1.0 - frac[:, 1])
                      * (frac[:, 2] if dz else 1.0 - frac[:, 2]))
            x = np.minimum(base[:, 0] + dx, shape_xyz[0] - 1)
            y = np.minimum(base[:, 1] + dy, shape_xyz[1] - 1)
            z = np.minimum(base[:, 2] + dz, shape_xyz[2] - 1)
            out += weight[:, None] * np.asarray(data[z, y, x], dtype=np.float32)
        if self.scale != 1.0:  # (int8 codes; a float map is returned exactly as summed)
            out *= np.float32(self.scale)
        out[~inside] = np.nan
        return out


#: The 8 corners (dx, dy, dz) of a trilinear cell, in the order ``sample`` sums them.
_CORNERS = tuple((dx, dy, dz) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1))


def _pooled_volume(data: np.ndarray, scale: float, edge: bool) -> np.ndarray:
    """[1, 2, 1]/4 along z, y and x of a (Z, Y, X, C) map (int8 codes x ``scale`` or
    float32), evaluated at every second voxel only (voxel i of the result on voxel 2i),
    zeros beyond the ends, or the edge value with ``edge``; float32.

    Compiled, one output plane at a time: numpy's axis-by-axis version (kept as the
    oracle in tests/registration/similarity/test_descriptor_map_speed.py, same float32
    numbers) wrote four temporaries per axis, 0.07 s against 0.02-0.03 s for a torso
    map (113, 106, 143, 12).
    """
    data = np.ascontiguousarray(data)
    if data.dtype != np.int8:
        data = data.astype(np.float32, copy=False)
    nz, ny, nx, nc = data.shape
    shape = ((nz + 1) // 2, (ny + 1) // 2, (nx + 1) // 2, nc)
    out = np.empty(shape, np.float32)
    _pool_planes(data.reshape(nz, ny, nx * nc), out.reshape(shape[0], shape[1], -1),
                 np.float32(scale), nc, edge)
    return out


@njit(cache=True)
def _halve_rows(src: np.ndarray, dst: np.ndarray, step: int, edge: bool
                ) -> None:  # pragma: no cover - compiled
    """dst[i] = [1, 2, 1]/4 at src's voxel 2 i along a flat (n * step,) row of voxels of
    ``step`` values, in the numpy version's order (centre, right, left, then the
    edge terms)."""
    n = src.shape[0] // step
    m = (n + 1) // 2
    half, quarter = np.float32(0.5), np.float32(0.25)
    for i in range(m):
        for k in range(step):
            dst[i * step + k] = src[2 * i * step + k] * half
    for i in range(n // 2):
        for k in range(step):
            dst[i * step + k] += src[(2 * i + 1) * step + k] * quarter
    for i in range(1, m):
        for k in range(step):
            dst[i * step + k] += src[(2 * i - 1) * step + k] * quarter
    if edge:
        for k in range(step):
            dst[k] += src[k] * quarter
        if n % 2:
            for k in range(step):
                dst[(m - 1) * step + k] += src[(n - 1) * step + k] * quarter


@njit(cache=True, parallel=True)
def _pool_planes(src: np.ndarray, dst: np.ndarray, scale: np.float32, nc: int,
                 edge: bool) -> None:  # pragma: no cover - compiled
    """``_pooled_volume`` one output z plane at a time: ``src`` (nz, ny, nx * nc), ``dst``
    (mz, my, mx * nc) float32."""
    nz, ny, row = src.shape
    mz, my = dst.shape[0], dst.shape[1]
    for k in prange(mz):
        # z: the planes 2k (x 0.5), 2k + 1 and 2k - 1 (x 0.25), decoded to float32.
        plane = np.empty((ny, row), np.float32)
        lanes = ny * row
        flat = plane.ravel()
        centre = src[2 * k].ravel()
        for q in range(lanes):
            flat[q] = (np.float32(centre[q]) * scale) * np.float32(0.5)
        if 2 * k + 1 < nz:
            right = src[2 * k + 1].ravel()
            for q in range(lanes):
                flat[q] += (np.float32(right[q]) * scale) * np.float32(0.25)
        if k >= 1:
            left = src[2 * k - 1].ravel()
            for q in range(lanes):
                flat[q] += (np.float32(left[q]) * scale) * np.float32(0.25)
        if edge and k == 0:
            for q in range(lanes):
                flat[q] += (np.float32(centre[q]) * scale) * np.float32(0.25)
        if edge and nz % 2 == 1 and k == mz - 1:
            last = src[nz - 1].ravel()
            for q in range(lanes):
                flat[q] += (np.float32(last[q]) * scale) * np.float32(0.25)
        # y (the plane as ny voxels of a row each), then x (voxels of nc values).
        halved = np.empty((my, row), np.float32)
        _halve_rows(flat, halved.ravel(), row, edge)
        for y in range(my):
            _halve_rows(halved[y], dst[k, y], nc, edge)


def pool_weights(weights: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Weights of a 2x pooled grid of ``shape``: the maximum of each 2x2x2 cell (keeps thin
    structures that a mean would dilute)."""
    padded = np.zeros(tuple(2 * n for n in shape), dtype=np.float32)
    padded[: weights.shape[0], : weights.shape[1], : weights.shape[2]] = weights
    # One axis at a time on strided halves: the same maxima as a (Z, 2, Y, 2, X, 2)
    # reshape reduced over its pair axes, ~25x faster (27 -> 1 ms a torso grid; numpy
    # reduces the six-axis view element by element, 7 grids a torso registration).
    cells = np.maximum(padded[0::2], padded[1::2])
    cells = np.maximum(cells[:, 0::2], cells[:, 1::2])
    return np.ascontiguousarray(np.maximum(cells[:, :, 0::2], cells[:, :, 1::2]))


def gaussian_weights(sigma_voxels: float, truncate: float = 4.0) -> np.ndarray:
    """The 1-D Gaussian taps (2r + 1,) float64 that scipy.ndimage.gaussian_filter1d uses for
    ``sigma_voxels`` (voxels): r = int(truncate sigma + 0.5), normalised to sum 1 (the same
    expression, so the same bits)."""
    radius = int(truncate * float(sigma_voxels) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma_voxels * sigma_voxels) * x ** 2)
    phi = phi / phi.sum()
    return np.ascontiguousarray(phi[::-1])


# (The helpers below are not inlined into their call sites: inlined, the first compile
# after an install took 10 s per map type for the Gaussian and 9 s for the pooling,
# against 5-6 s, for no measurable run time; 2 cores, 2026-12-06.)
@njit(cache=True)
def _gaussian_run(src: np.ndarray, dst: np.ndarray, lo: int, hi: int, step: int,
                  weights: np.ndarray, scale: np.float32, quantise: bool,
                  clamp_n: int) -> None:  # pragma: no cover - compiled
    """dst[q] for q in [lo, hi) of one flat (n * step,) row: taps at q -+ j * ``step``.

    ``clamp_n`` 0: every neighbour lies inside the row (the interior run, one
    contiguous loop per tap, so it vectorises even where ``step`` is the 12 channels
    of the x pass). Otherwise the row has ``clamp_n`` voxels of ``step`` values and
    neighbours beyond its ends read the end voxel ("nearest"). ``src``: int8 codes
    (value = code x ``scale``) or float32; ``dst``: float32, or int8 codes round(127 x)
    with ``quantise``. Arithmetic: scipy's order for a symmetric kernel (acc = x_i w_0,
    then acc += (x_{i-j} + x_{i+j}) w_j for j = r .. 1), in float32 rather than its
    float64: codes one off on about one value in a million.
    """
    r = (weights.shape[0] - 1) // 2
    m = hi - lo
    acc = np.empty(m, np.float32)
    centre = weights[r]
    for q in range(m):
        acc[q] = (np.float32(src[lo + q]) * scale) * centre
    for j in range(r, 0, -1):
        wj = weights[r - j]
        if clamp_n == 0:
            left = src[lo - j * step: hi - j * step]
            right = src[lo + j * step: hi + j * step]
            for q in range(m):
                acc[q] += (np.float32(left[q]) * scale + np.float32(right[q]) * scale) * wj
        else:
            for q in range(m):
                i, k = (lo + q) // step, (lo + q) % step
                left_i = max(i - j, 0)
                right_i = min(i + j, clamp_n - 1)
                acc[q] += (np.float32(src[left_i * step + k]) * scale
                           + np.float32(src[right_i * step + k]) * scale) * wj
    out = dst[lo:hi]
    if quantise:
        for q in range(m):
            code = np.rint(acc[q] * np.float32(127.0))
            out[q] = min(max(code, np.float32(-127.0)), np.float32(127.0))
    else:
        for q in range(m):
            out[q] = acc[q]


@njit(cache=True, parallel=True)
def _gaussian_volume(src: np.ndarray, dst: np.ndarray, weights: np.ndarray, scale: float,
                     ny: int, nc: int, quantise: bool) -> None:  # pragma: no cover - compiled
    """The separable Gaussian of a (nz, ny * nx * nc) map, one output z plane at a time:
    its z pass (the 2r + 1 source planes around it, neighbours beyond the ends replaced by
    the end plane), then its y pass and its x pass, each into a plane-sized buffer, so no
    map-sized intermediate is written (their fresh pages cost as much as a pass).

    ``src``: int8 codes (value = code x ``scale``) or float32; ``dst``: the same shape,
    float32, or int8 codes round(127 x) with ``quantise``. Arithmetic as ``_gaussian_run``.
    """
    nz, size = src.shape
    row = size // ny  # nx * nc
    nx = row // nc
    r = (weights.shape[0] - 1) // 2
    w = weights.astype(np.float32)
    s = np.float32(scale)
    one = np.float32(1.0)
    y_lo, y_hi = min(r, ny) * row, max(ny - r, min(r, ny)) * row
    x_lo, x_hi = min(r, nx) * nc, max(nx - r, min(r, nx)) * nc
    for z in prange(nz):
        along_z = np.empty(size, np.float32)
        centre = src[z]
        for q in range(size):
            along_z[q] = (np.float32(centre[q]) * s) * w[r]
        for j in range(r, 0, -1):
            below = src[max(z - j, 0)]
            above = src[min(z + j, nz - 1)]
            wj = w[r - j]
            for q in range(size):
                along_z[q] += (np.float32(below[q]) * s + np.float32(above[q]) * s) * wj
        along_y = np.empty(size, np.float32)
        _gaussian_run(along_z, along_y, y_lo, y_hi, row, w, one, False, 0)
        _gaussian_run(along_z, along_y, 0, y_lo, row, w, one, False, ny)
        _gaussian_run(along_z, along_y, y_hi, size, row, w, one, False, ny)
        out = dst[z]
        for y in range(ny):
            line = along_y[y * row:(y + 1) * row]
            target = out[y * row:(y + 1) * row]
            _gaussian_run(line, target, x_lo, x_hi, nc, w, one, quantise, 0)
            _gaussian_run(line, target, 0, x_lo, nc, w, one, quantise, nx)
            _gaussian_run(line, target, x_hi, row, nc, w, one, quantise, nx)


@njit(cache=True)
def _moments(data: np.ndarray, valid: np.ndarray, stride: int, scale: float
             ) -> tuple[float, np.ndarray, float]:  # pragma: no cover - compiled
    """(sum of v, sum of v m (C,), sum of v |m|^2) over every ``stride``-th row of ``data``
    (N, C) (int8 codes or float32, times ``scale``) with validities ``valid`` (N,),
    accumulated in float64."""
    n, channels = data.shape
    total = 0.0
    weighted = np.zeros(channels, np.float64)
    squares = 0.0
    for i in range(0, n, stride):
        v = np.float64(valid[i])
        if v == 0.0:
            continue
        total += v
        for c in range(channels):
            m = np.float64(data[i, c]) * scale
            weighted[c] += v * m
            squares += v * m * m
    return total, weighted, squares


@njit(cache=True)
def _encode_int8(values: np.ndarray, codes: np.ndarray) -> None:  # pragma: no cover
    """codes = disa.model.codes.encode_int8(values) for float32 ``values`` (1-D), in place:
    round half to even of x * 127 (float32), clipped to [-127, 127]."""
    for q in range(values.shape[0]):
        code = np.rint(values[q] * np.float32(127.0))
        codes[q] = min(max(code, np.float32(-127.0)), np.float32(127.0))
