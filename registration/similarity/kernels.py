"""Compiled inner loops of the descriptor objective (numba).

Why numba: the global search evaluates the objective for hundreds of
transforms on thousands of points, each a trilinear gather of 16-vectors. A
numpy version (gather + einsum) measured ~20x slower here and needs memory
proportional to starts x points x channels; the kernel streams through points
once, works on int8 maps directly and runs both cores. See benchmarks/.

Frames: ``points`` are continuous indices (x, y, z) of the fixed descriptor
grid; ``mats[b]`` (3x4) maps them to continuous indices (x, y, z) of the
moving descriptor map (the physical transform folded with both grids).
Every point's term is gated by the moving map's validity v (trilinear, 1 where
the moving image has data, 0 outside its field of view, sector or mask): the
kernels return the gated sum s = sum w v c and the overlap w = sum w v, and the
objective takes their ratio, so points outside the moving data count neither
for nor against a pose. Beyond an open face of the moving map (the image meets
air there, fov.open_faces) the map carries on as that face: a point there is
read as air, and counts against a pose that puts tissue on it.
"""

from __future__ import annotations

import types

import numba
import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True, inline="always")
def _corner_weights(frac: float, upper: int, flat: bool = False) -> tuple[float, float]:
    """Linear weight of a corner and its derivative along one axis (0 where ``flat``)."""
    slope = 0.0 if flat else 1.0
    if upper:
        return frac, slope
    return 1.0 - frac, -slope


@njit(cache=True, fastmath=True, inline="always")
def _onto_open_face(coordinate: float, n: int, low_open: int, high_open: int
                    ) -> tuple[float, bool]:
    """(coordinate, moved): a continuous index past an open end of an axis of ``n`` voxels
    moved onto that end voxel (the map carries on as its face there)."""
    if coordinate < 0.0 and low_open != 0:
        return 0.0, True
    if coordinate > n - 1.0 and high_open != 0:
        return n - 1.0, True
    return coordinate, False


@njit(cache=True, fastmath=True, inline="always")
def _point_term(f_vec, moving, valid, faces, mx, my, mz, scale_moving, ssd, m_val, m_gx, m_gy,
                m_gz):
    """Cost of one point whose moving-map index is (mx, my, mz), its validity, and gradients.

    ``f_vec``: the (dequantised) fixed descriptor; ``valid`` (Z, Y, X): the moving map's
    validity (1 where the moving image has data, 0 outside its field of view, sector or
    mask); ``faces`` (6,) uint8: its open faces (x low, x high, y low, ..., z high: air
    there); ``m_*``: scratch arrays of the channel count. Returns (cost, d cost/d mx,
    d/d my, d/d mz, v, d v/d mx, d v/d my, d v/d mz), cost = -<F, M> (dot) or
    ||F - M||^2 (ssd), M and v trilinear, zero outside the map but past an open face
    (there the face's, flat). Inlined into both kernels: the hot loop pays no call.
    """
    n_chan = f_vec.shape[0]
    nz, ny, nx = moving.shape[0], moving.shape[1], moving.shape[2]
    mx, clamp_x = _onto_open_face(mx, nx, faces[0], faces[1])
    my, clamp_y = _onto_open_face(my, ny, faces[2], faces[3])
    mz, clamp_z = _onto_open_face(mz, nz, faces[4], faces[5])
    if not (mx > -1.0 and my > -1.0 and mz > -1.0 and mx < nx and my < ny and mz < nz):
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    ix = int(np.floor(mx))
    iy = int(np.floor(my))
    iz = int(np.floor(mz))
    fx = mx - ix
    fy = my - iy
    fz = mz - iz
    val = gx = gy = gz = 0.0
    v = vx = vy = vz = 0.0
    if ssd:
        for c in range(n_chan):
            m_val[c] = 0.0
            m_gx[c] = 0.0
            m_gy[c] = 0.0
            m_gz[c] = 0.0
    for corner in range(8):
        ux = corner & 1
        uy = (corner >> 1) & 1
        uz = (corner >> 2) & 1
        cx = ix + ux
        cy = iy + uy
        cz = iz + uz
        if cx < 0 or cy < 0 or cz < 0 or cx >= nx or cy >= ny or cz >= nz:
            continue
        # (Clamped onto a face, the value no longer moves with the coordinate: no slope.)
        wx, dwx = _corner_weights(fx, ux, clamp_x)
        wy, dwy = _corner_weights(fy, uy, clamp_y)
        wz, dwz = _corner_weights(fz, uz, clamp_z)
        q = valid[cz, cy, cx]
        v += wx * wy * wz * q
        vx += dwx * wy * wz * q
        vy += wx * dwy * wz * q
        vz += wx * wy * dwz * q
        if ssd:
            for c in range(n_chan):
                mv = moving[cz, cy, cx, c] * scale_moving
                m_val[c] += wx * wy * wz * mv
                m_gx[c] += dwx * wy * wz * mv
                m_gy[c] += wx * dwy * wz * mv
                m_gz[c] += wx * wy * dwz * mv
        else:
            d = 0.0
            for c in range(n_chan):
                d += f_vec[c] * moving[cz, cy, cx, c]
            d *= scale_moving
            val += wx * wy * wz * d
            gx += dwx * wy * wz * d
            gy += wx * dwy * wz * d
            gz += wx * wy * dwz * d
    if ssd:
        for c in range(n_chan):
            r = f_vec[c] - m_val[c]
            val += r * r
            gx -= 2.0 * r * m_gx[c]
            gy -= 2.0 * r * m_gy[c]
            gz -= 2.0 * r * m_gz[c]
        return val, gx, gy, gz, v, vx, vy, vz
    return -val, -gx, -gy, -gz, v, vx, vy, vz


@njit(cache=True, fastmath=True, inline="always")
def _add_outer(g, gx, gy, gz, px, py, pz):
    """g (3x4) += (gx, gy, gz)^T (px, py, pz, 1): a point's gradient w.r.t. a 3x4 matrix."""
    g[0, 0] += gx * px
    g[0, 1] += gx * py
    g[0, 2] += gx * pz
    g[0, 3] += gx
    g[1, 0] += gy * px
    g[1, 1] += gy * py
    g[1, 2] += gy * pz
    g[1, 3] += gy
    g[2, 0] += gz * px
    g[2, 1] += gz * py
    g[2, 2] += gz * pz
    g[2, 3] += gz


@njit(cache=True, fastmath=True, inline="always")
def _chunk_sums(fixed, weights, points, moving, valid, faces, m, start, stop, scale_fixed,
                scale_moving, ssd, want_grad, gs, gw):
    """Gated sums over the points ``start:stop`` under one matrix ``m`` (3x4, fixed index
    -> moving index, both (x, y, z)): returns (sum_p w_p v_p c_p, sum_p w_p v_p) and, with
    ``want_grad``, adds their gradients w.r.t. ``m`` to ``gs`` and ``gw`` (3x4).

    Arguments as ``_descriptor_cost``. Inlined into its prange body, so every parallel
    work item keeps its own scratch vectors and the hot loop pays no call.
    """
    n_chan = fixed.shape[1]
    # Scratch of the channel count, reused for every point of the chunk.
    f_vec = np.empty(n_chan)
    m_val = np.zeros(n_chan)
    m_gx = np.zeros(n_chan)
    m_gy = np.zeros(n_chan)
    m_gz = np.zeros(n_chan)
    acc = 0.0
    overlap = 0.0
    for p in range(start, stop):
        px = points[p, 0]
        py = points[p, 1]
        pz = points[p, 2]
        w = weights[p]
        mx = m[0, 0] * px + m[0, 1] * py + m[0, 2] * pz + m[0, 3]
        my = m[1, 0] * px + m[1, 1] * py + m[1, 2] * pz + m[1, 3]
        mz = m[2, 0] * px + m[2, 1] * py + m[2, 2] * pz + m[2, 3]
        for c in range(n_chan):
            f_vec[c] = fixed[p, c] * scale_fixed
        term, gx, gy, gz, v, vx, vy, vz = _point_term(
            f_vec, moving, valid, faces, mx, my, mz, scale_moving, ssd, m_val, m_gx, m_gy, m_gz)
        acc += w * v * term
        overlap += w * v
        if want_grad:
            # d (v c) = v dc + c dv
            sx = w * (v * gx + term * vx)
            sy = w * (v * gy + term * vy)
            sz = w * (v * gz + term * vz)
            _add_outer(gs, sx, sy, sz, px, py, pz)
            _add_outer(gw, w * vx, w * vy, w * vz, px, py, pz)
    return acc, overlap


@njit(cache=True, fastmath=True, inline="always")
def _sum_chunks(part_s, part_w, part_gs, part_gw):
    """Per-transform totals (B,), (B,), (B, 3, 4), (B, 3, 4) of the chunks' partial sums
    (B, K), (B, K), (B, K, 3, 4), (B, K, 3, 4), added in chunk order.

    Why partial sums at all: the prange work items are (transform, chunk) pairs, and a
    reduction into shared totals would race; summing in a fixed order afterwards also
    keeps the result independent of how the threads ran.
    """
    n_batch, n_chunks = part_s.shape
    s_out = np.zeros(n_batch)
    w_out = np.zeros(n_batch)
    gs_out = np.zeros((n_batch, 3, 4))
    gw_out = np.zeros((n_batch, 3, 4))
    for b in range(n_batch):
        for k in range(n_chunks):
            s_out[b] += part_s[b, k]
            w_out[b] += part_w[b, k]
            for a in range(3):
                for j in range(4):
                    gs_out[b, a, j] += part_gs[b, k, a, j]
                    gw_out[b, a, j] += part_gw[b, k, a, j]
    return s_out, w_out, gs_out, gw_out


def _descriptor_cost(fixed, weights, points, moving, valid, faces, mats, scale_fixed,
                     scale_moving, ssd, want_grad, n_chunks):
    """Validity-gated weighted descriptor sums of B transforms, and their gradients.

    Args:
        fixed: (N, C) fixed descriptors at the points (int8 or float32).
        weights: (N,) float32 point weights, summing to 1.
        points: (N, 3) float32 fixed-grid indices (x, y, z).
        moving: (Z, Y, X, C) moving descriptor map (int8 or float32).
        valid: (Z, Y, X) float32 moving validity in [0, 1] (see ``_point_term``).
        faces: (6,) uint8, the moving map's open faces (see ``_point_term``).
        mats: (B, 3, 4) float64 fixed index -> moving index.
        scale_fixed, scale_moving: dequantisation factors (1/127 for int8 codes).
        ssd: False -> c_p = -<F_p, M(T p)> (maximise the dot product);
             True  -> c_p = ||F_p - M(T p)||^2 (MIND-SSC style SSD).
        want_grad: also return the gradients w.r.t. mats.
        n_chunks: point chunks per transform (parallel work items = B x n_chunks).

    Returns:
        s (B,) = sum_p w_p v_p c_p, the similarity over points that land where the
        moving image has data; w (B,) = sum_p w_p v_p, the weighted overlap fraction;
        d s / d mats and d w / d mats (B, 3, 4) (zeros when want_grad is False).
        The objective divides s by w: a weighted mean, independent of how many points
        overlap (docs/DESIGN.md, "Overlap-normalised objective").
    """
    n_points = points.shape[0]
    n_batch = mats.shape[0]
    part_s = np.zeros((n_batch, n_chunks))
    part_w = np.zeros((n_batch, n_chunks))
    part_gs = np.zeros((n_batch, n_chunks, 3, 4))
    part_gw = np.zeros((n_batch, n_chunks, 3, 4))
    chunk = (n_points + n_chunks - 1) // n_chunks
    for task in prange(n_batch * n_chunks):
        b = task // n_chunks
        k = task % n_chunks
        start = k * chunk
        stop = min(n_points, start + chunk)
        gs = np.zeros((3, 4))
        gw = np.zeros((3, 4))
        acc, overlap = _chunk_sums(fixed, weights, points, moving, valid, faces, mats[b], start,
                                   stop, scale_fixed, scale_moving, ssd, want_grad, gs, gw)
        part_s[b, k] = acc
        part_w[b, k] = overlap
        for a in range(3):
            for j in range(4):
                part_gs[b, k, a, j] = gs[a, j]
                part_gw[b, k, a, j] = gw[a, j]
    return _sum_chunks(part_s, part_w, part_gs, part_gw)


def _compiled(func, parallel: bool):
    """``func`` compiled (cached) for one or several threads, as its own kernel.

    Why a renamed copy: numba names a function's cache files after its module,
    qualified name and line, and keys the index by signature and bytecode, not by
    the compile options. A serial and a parallel njit of one Python function
    therefore share one cache, and both load whichever compiled first: the
    "parallel" objective ran on one thread (process CPU time = wall time) until
    the copies got names of their own (tests/registration/similarity/test_kernels.py).
    """
    suffix = "_parallel" if parallel else "_serial"
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__ + suffix,
                              func.__defaults__, func.__closure__)
    copy.__qualname__ = func.__qualname__ + suffix
    copy.__doc__ = func.__doc__
    return njit(parallel=parallel, fastmath=True, cache=True)(copy)


_cost_parallel = _compiled(_descriptor_cost, parallel=True)
_cost_serial = _compiled(_descriptor_cost, parallel=False)

#: Below this many point evaluations (transforms x points) the serial kernel runs: waking
#: the thread pool costs as much as it saves. Measured on 2 cores (AVX2), 2026-12-03, with
#: the passive wait policy: 1 x 4096 and 1 x 16384 points (an L-BFGS evaluation) the same
#: either way (0.6 / 1.4 ms); 8 x 4096 points 4.5 -> 2.4 ms; the coarse stage's 500 x 512
#: 36 -> 17 ms; beside a busy-looping process 8 x 4096 4.7 -> 3.3 ms, 500 x 512 43 -> 32 ms.
#: (An earlier 400k threshold was set while the parallel kernel, through the cache
#: collision that ``_compiled`` avoids, actually ran on one thread.)
PARALLEL_MIN_WORK = 32_768
#: One mapping of many points (the deformable stage: 41k-512k points at 160^3) runs the
#: parallel per-point kernel only from this much work: splitting one mapping's points gained
#: nothing measurable there at 32k (Adam phase 1.4-1.9 s either way, 2026-12-03,
#: benchmarks/deformable.py --speed). Batches of mappings (the probe model's search) follow
#: PARALLEL_MIN_WORK, like the matrix kernel's batches.
POINT_PARALLEL_MIN_WORK = 400_000


def descriptor_cost(fixed, weights, points, moving, valid, faces, mats, scale_fixed, scale_moving,
                    ssd, want_grad):
    """Dispatch to the serial or the parallel kernel by the amount of work (see above).

    Returns (s, w, d s / d mats, d w / d mats): see ``_descriptor_cost``.
    """
    work = mats.shape[0] * points.shape[0]
    threads = numba.get_num_threads()
    if threads == 1 or work < PARALLEL_MIN_WORK:
        return _cost_serial(fixed, weights, points, moving, valid, faces, mats, scale_fixed,
                            scale_moving, ssd, want_grad, 1)
    n_chunks = max(1, -(-4 * threads // mats.shape[0]))
    return _cost_parallel(fixed, weights, points, moving, valid, faces, mats, scale_fixed,
                          scale_moving, ssd, want_grad, n_chunks)


# ------------------------------------------------------------------ per-point mappings
#
# The kernel above folds the transform into a 3x4 matrix, which covers affine
# families only. The one below takes the moving-index coordinate of every point
# for every candidate transform, so any non-linear mapping (the probe
# compression model, a dense displacement field) can evaluate the same cost and
# chain its own Jacobian to the per-point gradient in numpy.


def _point_descriptor_cost(fixed, weights, coords, moving, valid, faces, scale_fixed,
                           scale_moving, ssd, want_grad, n_chunks):
    """Validity-gated weighted descriptor sums of B mappings given per-point moving coordinates.

    Args:
        fixed: (N, C) fixed descriptors at the points (int8 or float32).
        weights: (N,) float32 point weights.
        coords: (B, N, 3) float32/float64 continuous moving-map indices (x, y, z)
            where each mapping sends each point.
        moving: (Z, Y, X, C) moving descriptor map (int8 or float32).
        valid: (Z, Y, X) float32 moving validity in [0, 1].
        faces: (6,) uint8, the moving map's open faces (see ``_point_term``).
        scale_fixed, scale_moving: dequantisation factors (1/127 for int8 codes).
        ssd: False -> c_p = -<F_p, M(y_p)>; True -> c_p = ||F_p - M(y_p)||^2.
        want_grad: also return the per-point gradients.
        n_chunks: point chunks per mapping (parallel work items = B x n_chunks).

    Returns:
        s (B,) = sum_p w_p v_p c_p, w (B,) = sum_p w_p v_p, and per point
        d s / d moving index and d w / d moving index (B, N, 3) float64 (shape
        (B, 0, 3) when want_grad is False).
    """
    n_batch = coords.shape[0]
    n_points = coords.shape[1]
    n_chan = fixed.shape[1]
    part_s = np.zeros((n_batch, n_chunks))
    part_w = np.zeros((n_batch, n_chunks))
    grad_s = np.zeros((n_batch, n_points if want_grad else 0, 3))
    grad_w = np.zeros((n_batch, n_points if want_grad else 0, 3))
    chunk = (n_points + n_chunks - 1) // n_chunks
    for task in prange(n_batch * n_chunks):
        b = task // n_chunks
        k = task % n_chunks
        start = k * chunk
        stop = min(n_points, start + chunk)
        f_vec = np.empty(n_chan)
        m_val = np.zeros(n_chan)
        m_gx = np.zeros(n_chan)
        m_gy = np.zeros(n_chan)
        m_gz = np.zeros(n_chan)
        acc = 0.0
        overlap = 0.0
        for p in range(start, stop):
            w = weights[p]
            mx = coords[b, p, 0]
            my = coords[b, p, 1]
            mz = coords[b, p, 2]
            for c in range(n_chan):
                f_vec[c] = fixed[p, c] * scale_fixed
            term, gx, gy, gz, v, vx, vy, vz = _point_term(
                f_vec, moving, valid, faces, mx, my, mz, scale_moving, ssd, m_val, m_gx, m_gy,
                m_gz)
            acc += w * v * term
            overlap += w * v
            if want_grad:
                # Each (b, p) is written by exactly one task: no reduction needed.
                grad_s[b, p, 0] = w * (v * gx + term * vx)
                grad_s[b, p, 1] = w * (v * gy + term * vy)
                grad_s[b, p, 2] = w * (v * gz + term * vz)
                grad_w[b, p, 0] = w * vx
                grad_w[b, p, 1] = w * vy
                grad_w[b, p, 2] = w * vz
        part_s[b, k] = acc
        part_w[b, k] = overlap
    s_out = np.zeros(n_batch)
    w_out = np.zeros(n_batch)
    for b in range(n_batch):
        for k in range(n_chunks):
            s_out[b] += part_s[b, k]
            w_out[b] += part_w[b, k]
    return s_out, w_out, grad_s, grad_w


_point_parallel = _compiled(_point_descriptor_cost, parallel=True)
_point_serial = _compiled(_point_descriptor_cost, parallel=False)


def point_descriptor_cost(fixed, weights, coords, moving, valid, faces, scale_fixed, scale_moving,
                          ssd, want_grad):
    """Dispatch the per-point kernel to its serial or parallel compilation by work size.

    Same conventions as ``descriptor_cost`` (trilinear, zero outside the map,
    int8 or float32 maps, dot or ssd) but ``coords`` (B, N, 3) holds the moving
    index (x, y, z) of every point under every mapping, and the gradient is
    per point: (B, N, 3) d cost / d moving index coordinate.
    """
    work = coords.shape[0] * coords.shape[1]
    threads = numba.get_num_threads()
    floor = PARALLEL_MIN_WORK if coords.shape[0] > 1 else POINT_PARALLEL_MIN_WORK
    if threads == 1 or work < floor:
        return _point_serial(fixed, weights, coords, moving, valid, faces, scale_fixed,
                             scale_moving, ssd, want_grad, 1)
    n_chunks = max(1, -(-4 * threads // coords.shape[0]))
    return _point_parallel(fixed, weights, coords, moving, valid, faces, scale_fixed,
                           scale_moving, ssd, want_grad, n_chunks)


def _sample_descriptors(moving, coords, scale, out):
    """Trilinear samples (N, C) float32 of a map at continuous indices (N, 3) (x, y, z),
    zero outside the map (the objective's convention)."""
    n_chan = moving.shape[3]
    nz, ny, nx = moving.shape[0], moving.shape[1], moving.shape[2]
    for p in prange(coords.shape[0]):
        mx = coords[p, 0]
        my = coords[p, 1]
        mz = coords[p, 2]
        for c in range(n_chan):
            out[p, c] = 0.0
        if not (mx > -1.0 and my > -1.0 and mz > -1.0 and mx < nx and my < ny and mz < nz):
            continue
        ix = int(np.floor(mx))
        iy = int(np.floor(my))
        iz = int(np.floor(mz))
        fx = mx - ix
        fy = my - iy
        fz = mz - iz
        for corner in range(8):
            ux = corner & 1
            uy = (corner >> 1) & 1
            uz = (corner >> 2) & 1
            cx = ix + ux
            cy = iy + uy
            cz = iz + uz
            if cx < 0 or cy < 0 or cz < 0 or cx >= nx or cy >= ny or cz >= nz:
                continue
            wx, _ = _corner_weights(fx, ux)
            wy, _ = _corner_weights(fy, uy)
            wz, _ = _corner_weights(fz, uz)
            w = wx * wy * wz * scale
            for c in range(n_chan):
                out[p, c] += w * moving[cz, cy, cx, c]


_sample_parallel = njit(parallel=True, fastmath=True, cache=True)(_sample_descriptors)


def sample_descriptors(moving: np.ndarray, coords: np.ndarray, scale: float) -> np.ndarray:
    """Moving descriptors (N, C) float32 at continuous indices ``coords`` (N, 3), (x, y, z).

    Used to warp a moving map onto a grid in the fixed frame once, so that a
    search over many displacements becomes plain array shifts.
    """
    out = np.empty((coords.shape[0], moving.shape[3]), dtype=np.float32)
    _sample_parallel(moving, np.ascontiguousarray(coords, dtype=np.float64), float(scale), out)
    return out
