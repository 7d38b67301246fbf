"""Linear correlation of linear combination (LC2), the similarity DISA learns.

LC2 is asymmetric. One volume plays the "MR role" (called *source* here): it
gives the intensity p and the gradient magnitude g. The other plays the "US
role" (called *target*): its intensity u is explained by a local linear model

    u ~ a p + b g + c

fitted by least squares in a cube of radius r (side 2r+1 voxels) around a
centre voxel. In covariance form, with C = Cov([p, g]) and v = Cov([p, g], u)
taken over the cube (population moments, i.e. normalised by the voxel count N):

    [a, b] = (C + ridge I)^-1 v,   c = mean(u) - a mean(p) - b mean(g)
    residual = mean((u - a p - b g - c)^2)
    LC2 = (Var(u) - residual) / max(Var(u), var_floor),  clamped to [0, 1]

with ridge = 1e-3 and var_floor = 0.01 (intensity units of the z-scored
volumes): an R^2 that is damped for low-contrast targets. LC2 is invariant to
affine intensity changes and sign flips of either input, up to the ridge and
the floor (both small against unit-variance volumes). The multi-scale LC2 used
for training averages radii 3, 5 and 7.

Units and frames: all arrays are numpy (z, y, x) voxel arrays on one isotropic
grid; radii and gradients are in voxel units (no spacing is applied).

Border conventions (the same for every function here):

* Gradient: central differences over +-1 voxel with edge replication, so on the
  first and last slice of an axis the difference is half the one-sided one.
* Cubes are clipped to the volume (and to ``mask`` when given): the moments of
  a centre near the border use only the voxels inside, N varies accordingly.
  Where fewer than ``min_count`` voxels remain, LC2 is defined as 0.
* ``lc2_against_all`` is the exception: it only scores positions whose full
  cube of the largest radius lies inside the searched volume and returns NaN
  elsewhere, because a sliding patch must be compared like for like.

Fast paths. Every moment of a cube is a box sum: integral volumes (cumulative
sums, float64, means removed first to limit cancellation) give all of them for
every voxel or any set of voxels in O(1) each. For one fixed patch against all
positions of a volume the cross moments sum(p u), sum(g u) are
cross-correlations, done with FFTs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import fft as sp_fft

RIDGE = 1e-3
VAR_FLOOR = 0.01
DEFAULT_RADII: tuple[int, ...] = (3, 5, 7)
MIN_COUNT = 10

# Order of the ten moments carried around internally.
_N, _SP, _SG, _SU, _SPP, _SPG, _SGG, _SPU, _SGU, _SUU = range(10)


def gradient_magnitude(volume: np.ndarray) -> np.ndarray:
    """Gradient magnitude by central differences (+-1 voxel), in intensity per voxel.

    Borders replicate the edge voxel. Returns float64, same shape as ``volume``.
    """
    v = np.asarray(volume, dtype=np.float64)
    if v.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {v.shape}")
    padded = np.pad(v, 1, mode="edge")
    gz = (padded[2:, 1:-1, 1:-1] - padded[:-2, 1:-1, 1:-1]) * 0.5
    gy = (padded[1:-1, 2:, 1:-1] - padded[1:-1, :-2, 1:-1]) * 0.5
    gx = (padded[1:-1, 1:-1, 2:] - padded[1:-1, 1:-1, :-2]) * 0.5
    return np.sqrt(gz * gz + gy * gy + gx * gx)


def lc2_from_moments(
    moments: Sequence[np.ndarray] | np.ndarray,
    ridge: float = RIDGE,
    var_floor: float = VAR_FLOOR,
    min_count: float = MIN_COUNT,
) -> np.ndarray:
    """LC2 from the ten raw cube moments (n, Sp, Sg, Su, Spp, Spg, Sgg, Spu, Sgu, Suu).

    Each entry is an array of sums over the cube (same shape for all). Exposed so
    that callers holding sums from another source (FFT, box filter) share one
    formula.
    """
    n, sp, sg, su, spp, spg, sgg, spu, sgu, suu = (np.asarray(m, dtype=np.float64) for m in moments)
    ok = n >= min_count
    inv_n = 1.0 / np.where(ok, n, 1.0)
    mp, mg, mu = sp * inv_n, sg * inv_n, su * inv_n
    cpp = np.maximum(spp * inv_n - mp * mp, 0.0)
    cgg = np.maximum(sgg * inv_n - mg * mg, 0.0)
    cuu = np.maximum(suu * inv_n - mu * mu, 0.0)
    cpg = spg * inv_n - mp * mg
    cpu = spu * inv_n - mp * mu
    cgu = sgu * inv_n - mg * mu
    # Closed-form 2x2 ridge solve; det >= ridge^2 > 0 because C is PSD.
    app, agg = cpp + ridge, cgg + ridge
    det = app * agg - cpg * cpg
    a = (agg * cpu - cpg * cgu) / det
    b = (app * cgu - cpg * cpu) / det
    # Var(u) - residual, written out so the large Var(u) terms cancel exactly.
    explained = 2.0 * (a * cpu + b * cgu) - (a * a * cpp + 2.0 * a * b * cpg + b * b * cgg)
    lc2 = explained / np.maximum(cuu, var_floor)
    return np.where(ok, np.clip(lc2, 0.0, 1.0), 0.0)


class _IntegralVolumes:
    """Zero-padded integral volumes of several quantities, for clipped box sums.

    Quantity k at voxel x contributes to every cube containing x; voxels outside
    the volume contribute nothing, which is how cubes get clipped.
    """

    def __init__(self, quantities: Sequence[np.ndarray], pad: int) -> None:
        self.pad = pad
        self.shape = quantities[0].shape
        self.tables = [self._integral(q, pad) for q in quantities]

    @staticmethod
    def _integral(q: np.ndarray, pad: int) -> np.ndarray:
        # One extra leading zero plane per axis so that table[i] = sum of q[< i].
        t = np.zeros(tuple(s + 2 * pad + 1 for s in q.shape), dtype=np.float64)
        z, y, x = q.shape
        t[1 + pad : 1 + pad + z, 1 + pad : 1 + pad + y, 1 + pad : 1 + pad + x] = q
        np.cumsum(t, axis=0, out=t)
        np.cumsum(t, axis=1, out=t)
        np.cumsum(t, axis=2, out=t)
        return t

    def box_sums_grid(self, radius: int) -> list[np.ndarray]:
        """Sums over the cube of ``radius`` centred at every voxel (clipped)."""
        if radius > self.pad:
            raise ValueError("radius exceeds the padding of the integral volumes")
        z, y, x = self.shape
        lo = self.pad - radius  # table index of the cube's first voxel for centre 0
        hi = self.pad + radius + 1
        out = []
        for t in self.tables:

            def s(a: int, b: int, c: int, t: np.ndarray = t) -> np.ndarray:
                return t[a : a + z, b : b + y, c : c + x]

            out.append(
                s(hi, hi, hi)
                - s(lo, hi, hi)
                - s(hi, lo, hi)
                - s(hi, hi, lo)
                + s(lo, lo, hi)
                + s(lo, hi, lo)
                + s(hi, lo, lo)
                - s(lo, lo, lo)
            )
        return out

    def box_sums_points(self, points: np.ndarray, radius: int) -> list[np.ndarray]:
        """Sums over the cube of ``radius`` centred at ``points`` (K, 3) voxel indices."""
        if radius > self.pad:
            raise ValueError("radius exceeds the padding of the integral volumes")
        p = np.asarray(points, dtype=np.int64)
        lo = p + (self.pad - radius)
        hi = p + (self.pad + radius + 1)
        corners = [
            (hi, hi, hi, 1.0),
            (lo, hi, hi, -1.0),
            (hi, lo, hi, -1.0),
            (hi, hi, lo, -1.0),
            (lo, lo, hi, 1.0),
            (lo, hi, lo, 1.0),
            (hi, lo, lo, 1.0),
            (lo, lo, lo, -1.0),
        ]
        out = []
        for t in self.tables:
            acc = np.zeros(len(p), dtype=np.float64)
            for a, b, c, sign in corners:
                acc += sign * t[a[:, 0], b[:, 1], c[:, 2]]
            out.append(acc)
        return out


def _moment_quantities(
    target: np.ndarray, source: np.ndarray, mask: np.ndarray | None
) -> list[np.ndarray]:
    """The ten per-voxel products whose box sums are the cube moments."""
    u = np.asarray(target, dtype=np.float64)
    p = np.asarray(source, dtype=np.float64)
    if u.shape != p.shape or u.ndim != 3:
        raise ValueError(f"target and source must be 3D of one shape, got {u.shape}, {p.shape}")
    g = gradient_magnitude(p)
    w = np.ones(u.shape) if mask is None else np.asarray(mask, dtype=bool).astype(np.float64)
    if w.shape != u.shape:
        raise ValueError("mask must have the shape of the volumes")
    # Moments are shift invariant: removing global means keeps the sums small,
    # which limits cancellation in E[x^2] - E[x]^2.
    total = max(w.sum(), 1.0)
    p = (p - (w * p).sum() / total) * w
    g = (g - (w * g).sum() / total) * w
    u = (u - (w * u).sum() / total) * w
    # Products of masked values carry w^2 = w, so masking is applied once.
    return [w, p, g, u, p * p, p * g, g * g, p * u, g * u, u * u]


def _check_radii(radii: int | Sequence[int]) -> tuple[int, ...]:
    r = (radii,) if isinstance(radii, int | np.integer) else tuple(int(x) for x in radii)
    if not r or min(r) < 1:
        raise ValueError(f"radii must be positive integers, got {radii!r}")
    return r


def local_lc2_per_radius(
    target: np.ndarray,
    source: np.ndarray,
    radii: int | Sequence[int] = DEFAULT_RADII,
    mask: np.ndarray | None = None,
    points: np.ndarray | None = None,
    ridge: float = RIDGE,
    var_floor: float = VAR_FLOOR,
) -> list[np.ndarray]:
    """Local LC2 of two aligned volumes for each radius (list in ``radii`` order).

    With ``points`` (K, 3) integer voxel indices (z, y, x) only those centres are
    evaluated and each entry has shape (K,); otherwise every voxel is.
    """
    rr = _check_radii(radii)
    iv = _IntegralVolumes(_moment_quantities(target, source, mask), pad=max(rr))
    out = []
    for r in rr:
        sums = iv.box_sums_grid(r) if points is None else iv.box_sums_points(points, r)
        out.append(lc2_from_moments(sums, ridge, var_floor))
    return out


def local_lc2(
    target: np.ndarray,
    source: np.ndarray,
    radius: int,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """LC2 of the cube of ``radius`` voxels centred at every voxel of two aligned volumes.

    ``source`` plays the MR role (intensity and gradient), ``target`` the US role.
    ``mask`` (same shape, bool) restricts the voxels each cube uses; cubes are
    clipped to the volume (see the module docstring). Returns float64 in [0, 1].
    """
    return local_lc2_per_radius(target, source, (radius,), mask)[0]


def local_lc2_multi(
    target: np.ndarray,
    source: np.ndarray,
    radii: Sequence[int] = DEFAULT_RADII,
    mask: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> np.ndarray:
    """Mean of ``local_lc2`` over ``radii`` (the training target), at every voxel or ``points``."""
    per = local_lc2_per_radius(target, source, radii, mask, points)
    return np.mean(per, axis=0)


def local_std(volume: np.ndarray, radius: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Standard deviation of the (clipped, masked) cube of ``radius`` around every voxel."""
    v = np.asarray(volume, dtype=np.float64)
    w = np.ones(v.shape) if mask is None else np.asarray(mask, dtype=bool).astype(np.float64)
    total = max(w.sum(), 1.0)
    v = (v - (w * v).sum() / total) * w
    n, s, ss = _IntegralVolumes([w, v, v * v], pad=radius).box_sums_grid(radius)
    n_safe = np.maximum(n, 1.0)
    var = np.maximum(ss / n_safe - (s / n_safe) ** 2, 0.0)
    return np.where(n >= 1, np.sqrt(var), 0.0)


def global_lc2(
    target: np.ndarray,
    source: np.ndarray,
    radii: Sequence[int] = DEFAULT_RADII,
    mask: np.ndarray | None = None,
    min_std: float = 1e-3,
) -> float:
    """Global LC2 (Wein et al. 2008): local LC2 averaged with the target patch std as weight.

    Per radius, the weighted mean over centres (inside ``mask`` when given) of
    local LC2 with weight = std of the target cube; cubes with std < ``min_std``
    are skipped. The result is the mean over radii (0 if every cube is flat).
    """
    rr = _check_radii(radii)
    per = local_lc2_per_radius(target, source, rr, mask)
    centre_ok = np.ones(np.shape(target), bool) if mask is None else np.asarray(mask, bool)
    values = []
    for r, lc2 in zip(rr, per, strict=True):
        w = local_std(target, r, mask)
        w = np.where((w >= min_std) & centre_ok, w, 0.0)
        total = w.sum()
        values.append(float((w * lc2).sum() / total) if total > 0 else 0.0)
    return float(np.mean(values))


def lc2_patch_naive(
    target_patch: np.ndarray,
    source_patch: np.ndarray,
    gradient_patch: np.ndarray | None = None,
    mask_patch: np.ndarray | None = None,
    ridge: float = RIDGE,
    var_floor: float = VAR_FLOOR,
) -> float:
    """LC2 of one cube by a direct least-squares fit: the reference for tests.

    Without ``gradient_patch`` the source patch must carry a 1-voxel margin
    (shape = target shape + 2 per axis); its gradient is taken by central
    differences there and the margin dropped. With ``gradient_patch`` all
    patches share one shape. ``mask_patch`` selects the voxels used.
    """
    u = np.asarray(target_patch, dtype=np.float64)
    s = np.asarray(source_patch, dtype=np.float64)
    if gradient_patch is None:
        if s.shape != tuple(d + 2 for d in u.shape):
            raise ValueError("source_patch needs a 1-voxel margin around the target cube")
        gz = (s[2:, 1:-1, 1:-1] - s[:-2, 1:-1, 1:-1]) / 2.0
        gy = (s[1:-1, 2:, 1:-1] - s[1:-1, :-2, 1:-1]) / 2.0
        gx = (s[1:-1, 1:-1, 2:] - s[1:-1, 1:-1, :-2]) / 2.0
        g = np.sqrt(gz**2 + gy**2 + gx**2)
        p = s[1:-1, 1:-1, 1:-1]
    else:
        g = np.asarray(gradient_patch, dtype=np.float64)
        p = s
    sel = np.ones(u.shape, bool) if mask_patch is None else np.asarray(mask_patch, bool)
    u, p, g = u[sel], p[sel], g[sel]
    if u.size < MIN_COUNT:
        return 0.0
    x = np.stack([p - p.mean(), g - g.mean()], axis=1)
    uc = u - u.mean()
    cov = x.T @ x / u.size + ridge * np.eye(2)
    coef = np.linalg.solve(cov, x.T @ uc / u.size)
    residual = float(np.mean((uc - x @ coef) ** 2))
    var_u = float(np.mean(uc**2))
    return float(np.clip((var_u - residual) / max(var_u, var_floor), 0.0, 1.0))


class LC2AgainstAll:
    """LC2 of fixed-size patches against every position of one volume (FFT based).

    The volume's FFT and box sums are computed once, so many patches can be
    scored against the same volume cheaply (the paper's sampling scores each
    drawn patch of M against all patches of F).

    ``patch_role``: "source" -- the patch plays the MR role and the volume the
    US role; the patch has side 2R+3 (R = max radius: one extra voxel each side
    for its own gradient). "target" -- the patch plays the US role (side 2R+1)
    and the volume the MR role, its gradient taken over the whole volume.
    """

    def __init__(
        self,
        volume: np.ndarray,
        radii: int | Sequence[int] = DEFAULT_RADII,
        patch_role: Literal["source", "target"] = "source",
        ridge: float = RIDGE,
        var_floor: float = VAR_FLOOR,
    ) -> None:
        if patch_role not in ("source", "target"):
            raise ValueError("patch_role must be 'source' or 'target'")
        self.radii = _check_radii(radii)
        self.rmax = max(self.radii)
        self.role = patch_role
        self.ridge, self.var_floor = ridge, var_floor
        v = np.asarray(volume, dtype=np.float64)
        if v.ndim != 3 or min(v.shape) < 2 * self.rmax + 1:
            raise ValueError(f"volume {v.shape} too small for radius {self.rmax}")
        self.shape = v.shape
        # Centring is harmless (moments are shift invariant) and keeps FFT
        # round-off small relative to the covariances.
        if patch_role == "source":
            u = v - v.mean()
            self._corr_inputs = [u]
            quantities = [u, u * u]
        else:
            p = v - v.mean()
            g = gradient_magnitude(v)
            g = g - g.mean()
            self._corr_inputs = [p, g]
            quantities = [p, g, p * p, p * g, g * g]
        self._box = _IntegralVolumes(quantities, pad=self.rmax).box_sums_grid
        self._box_cache = {r: self._valid(self._box(r)) for r in self.radii}
        self._fft_shape = tuple(
            sp_fft.next_fast_len(s + 2 * self.rmax + 1, real=True) for s in self.shape
        )
        self._spectra = [sp_fft.rfftn(x, self._fft_shape) for x in self._corr_inputs]

    def _valid(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        r = self.rmax
        return [a[r : a.shape[0] - r, r : a.shape[1] - r, r : a.shape[2] - r] for a in arrays]

    def _correlate(self, spectrum: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        """sum_k kernel[k] * x[c + k - r] for every centre c with the full R-cube inside."""
        r = kernel.shape[0] // 2
        # Correlation = convolution with the flipped kernel; 'valid' part only.
        kf = sp_fft.rfftn(kernel[::-1, ::-1, ::-1], self._fft_shape)
        full = sp_fft.irfftn(spectrum * kf, self._fft_shape)
        # Convolution index of centre c is c + r; keep centres rmax..size-1-rmax.
        off = r + self.rmax
        z, y, x = (s - 2 * self.rmax for s in self.shape)
        return full[off : off + z, off : off + y, off : off + x]

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        """Multi-radius LC2 at every position (NaN where the R-cube leaves the volume)."""
        q = np.asarray(patch, dtype=np.float64)
        rm = self.rmax
        side = 2 * rm + 3 if self.role == "source" else 2 * rm + 1
        if q.shape != (side,) * 3:
            raise ValueError(f"patch must have shape {(side,) * 3} for role {self.role!r}")
        if self.role == "source":
            g_full = gradient_magnitude(q)[1:-1, 1:-1, 1:-1]
            p_full = q[1:-1, 1:-1, 1:-1]
        else:
            u_full = q
        acc = np.zeros(tuple(s - 2 * rm for s in self.shape))
        for r in self.radii:
            sl = slice(rm - r, rm + r + 1)
            n = float((2 * r + 1) ** 3)
            if self.role == "source":
                p = p_full[sl, sl, sl] - p_full[sl, sl, sl].mean()
                g = g_full[sl, sl, sl] - g_full[sl, sl, sl].mean()
                su, suu = self._box_cache[r]
                spu = self._correlate(self._spectra[0], p)
                sgu = self._correlate(self._spectra[0], g)
                moments = [
                    n,
                    0.0,
                    0.0,
                    su,
                    (p * p).sum(),
                    (p * g).sum(),
                    (g * g).sum(),
                    spu,
                    sgu,
                    suu,
                ]
            else:
                u = u_full[sl, sl, sl] - u_full[sl, sl, sl].mean()
                sp, sg, spp, spg, sgg = self._box_cache[r]
                spu = self._correlate(self._spectra[0], u)
                sgu = self._correlate(self._spectra[1], u)
                moments = [n, sp, sg, 0.0, spp, spg, sgg, spu, sgu, (u * u).sum()]
            acc += lc2_from_moments(
                [np.broadcast_to(np.asarray(m, dtype=np.float64), acc.shape) for m in moments],
                self.ridge,
                self.var_floor,
            )
        out = np.full(self.shape, np.nan)
        out[rm : self.shape[0] - rm, rm : self.shape[1] - rm, rm : self.shape[2] - rm] = acc / len(
            self.radii
        )
        return out


def lc2_against_points(
    patch: np.ndarray,
    volume: np.ndarray,
    centres: np.ndarray,
    radii: int | Sequence[int] = DEFAULT_RADII,
    patch_role: Literal["source", "target"] = "source",
) -> np.ndarray:
    """``lc2_against_all`` at chosen centres only: (K,) multi-radius LC2 values.

    ``centres`` (K, 3) are voxel indices whose cube of the largest radius must
    lie inside ``volume`` (ValueError otherwise). The cubes are gathered and
    the cross moments taken as dot products, which beats the FFT when K is a
    few thousand (a descriptor grid). With patch_role "target" the volume's
    gradient is taken over the whole volume, as in ``local_lc2``.
    """
    rr = _check_radii(radii)
    rm = max(rr)
    q = np.asarray(patch, dtype=np.float64)
    v = np.asarray(volume, dtype=np.float64)
    c = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    if np.any(c < rm) or np.any(c >= np.array(v.shape) - rm):
        raise ValueError("every centre's cube must lie inside the volume")
    side = 2 * rm + 3 if patch_role == "source" else 2 * rm + 1
    if q.shape != (side,) * 3:
        raise ValueError(f"patch must have shape {(side,) * 3} for role {patch_role!r}")
    offsets = np.arange(-rm, rm + 1)
    # Index of every cube voxel: (K, S, S, S) per axis, S = 2 rm + 1.
    iz = c[:, 0, None, None, None] + offsets[None, :, None, None]
    iy = c[:, 1, None, None, None] + offsets[None, None, :, None]
    ix = c[:, 2, None, None, None] + offsets[None, None, None, :]
    if patch_role == "source":
        p_full = q[1:-1, 1:-1, 1:-1]
        g_full = gradient_magnitude(q)[1:-1, 1:-1, 1:-1]
        u_cubes = v[iz, iy, ix] - v.mean()
    elif patch_role == "target":
        u_full = q
        p_cubes = v[iz, iy, ix] - v.mean()
        g_vol = gradient_magnitude(v)
        g_cubes = g_vol[iz, iy, ix] - g_vol.mean()
    else:
        raise ValueError("patch_role must be 'source' or 'target'")
    acc = np.zeros(len(c))
    for r in rr:
        sl = slice(rm - r, rm + r + 1)
        cube = (slice(None), sl, sl, sl)
        n = np.full(len(c), float((2 * r + 1) ** 3))
        zero = np.zeros(len(c))
        if patch_role == "source":
            p = p_full[sl, sl, sl] - p_full[sl, sl, sl].mean()
            g = g_full[sl, sl, sl] - g_full[sl, sl, sl].mean()
            u = u_cubes[cube]
            moments = [
                n,
                zero,
                zero,
                u.sum((1, 2, 3)),
                zero + (p * p).sum(),
                zero + (p * g).sum(),
                zero + (g * g).sum(),
                np.einsum("kabc,abc->k", u, p),
                np.einsum("kabc,abc->k", u, g),
                (u * u).sum((1, 2, 3)),
            ]
        else:
            u = u_full[sl, sl, sl] - u_full[sl, sl, sl].mean()
            p, g = p_cubes[cube], g_cubes[cube]
            moments = [
                n,
                p.sum((1, 2, 3)),
                g.sum((1, 2, 3)),
                zero,
                (p * p).sum((1, 2, 3)),
                (p * g).sum((1, 2, 3)),
                (g * g).sum((1, 2, 3)),
                np.einsum("kabc,abc->k", p, u),
                np.einsum("kabc,abc->k", g, u),
                zero + (u * u).sum(),
            ]
        acc += lc2_from_moments(moments)
    return acc / len(rr)


def lc2_against_all(
    patch: np.ndarray,
    volume: np.ndarray,
    radii: int | Sequence[int] = DEFAULT_RADII,
    patch_role: Literal["source", "target"] = "source",
) -> np.ndarray:
    """LC2 of one patch against the patch at every position of ``volume``.

    Returns an array of ``volume.shape``: entry c is the multi-radius LC2 between
    ``patch`` and the cube of ``volume`` centred at c; NaN where that cube of the
    largest radius R does not fit inside the volume. See ``LC2AgainstAll`` for
    the roles and patch sizes (2R+3 with the gradient margin for "source").
    """
    return LC2AgainstAll(volume, radii, patch_role)(patch)
