"""Synthetic multimodal phantoms with a known transform (tests, benchmarks, demos).

A phantom is a set of labelled ellipsoids inside a body, defined as a
continuous function of physical position (LPS mm), so it can be sampled on any
grid and under any transform without resampling error. Two "modalities" map
the labels through different random intensity tables (one of them
non-monotonic) with texture, bias field and noise, which is the situation of
multimodal registration: same anatomy, unrelated intensities.

The moving image of a pair with ground truth T (fixed point x -> moving point
T(x), the engine's convention) is M(y) = B(T^-1(y)): sampling it at T(x)
gives the second contrast of the anatomy found at x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from disa.core.grid import Grid
from disa.registration.transform.displacement import residual_transform


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles: tuple[float, float, float]
    label: int


def default_anatomy(scale_mm: float = 60.0, seed: int = 7) -> list[Ellipsoid]:
    """A body with asymmetric organs: no rotation or mirror maps it onto itself.

    The body's three radii differ by at least 15 %: with nearly equal radii a
    rotation about the third axis is constrained by the small organs alone.
    """
    rng = np.random.default_rng(seed)
    parts = [Ellipsoid((0.0, 0.0, 0.0), (scale_mm, 0.7 * scale_mm, 0.85 * scale_mm), (0, 0, 0), 1)]
    for label in range(2, 9):
        center = tuple(float(v) for v in rng.uniform(-0.5, 0.5, 3) * scale_mm)
        radii = tuple(float(v) for v in rng.uniform(0.12, 0.3, 3) * scale_mm)
        angles = tuple(float(v) for v in rng.uniform(-np.pi, np.pi, 3))
        parts.append(Ellipsoid(center, radii, angles, label))
    return parts


def _rot(angles: tuple[float, float, float]) -> np.ndarray:
    from disa.registration.transform.parametric import rotation_matrix

    return rotation_matrix(np.asarray(angles, dtype=np.float64))


def label_map(points: np.ndarray, anatomy: list[Ellipsoid], softness_mm: float = 1.0
              ) -> np.ndarray:
    """Soft label memberships (N, L+1) at physical points (N, 3); column 0 is background."""
    n_labels = max(e.label for e in anatomy) + 1
    member = np.zeros((len(points), n_labels))
    occupied = np.zeros(len(points))
    for e in sorted(anatomy, key=lambda e: -e.label):  # later organs sit inside the body
        local = (points - np.asarray(e.center)) @ _rot(e.angles)
        r = np.sqrt(np.sum((local / np.asarray(e.radii)) ** 2, axis=1))
        inside = 1.0 / (1.0 + np.exp((r - 1.0) * min(e.radii) / softness_mm))
        share = inside * (1.0 - occupied)
        member[:, e.label] += share
        occupied += share
    member[:, 0] = 1.0 - occupied
    return member


def contrast_table(n_labels: int, seed: int, non_monotonic: bool = False) -> np.ndarray:
    """Intensity per label (background 0): random, optionally re-ordered non-monotonically."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.2, 1.0, n_labels)
    if non_monotonic:
        values = np.abs(np.sin(values * 9.0)) * 0.9 + 0.1
    values[0] = 0.0
    return values


def render(points: np.ndarray, anatomy: list[Ellipsoid], table: np.ndarray, seed: int,
           texture: float = 0.05, bias: float = 0.2) -> np.ndarray:
    """Intensities at physical points (N, 3): label table, smooth texture and bias field.

    Texture and bias are smooth functions of anatomical position, so they move
    with the anatomy (texture) or are defined in the same frame (bias)."""
    rng = np.random.default_rng(seed)
    member = label_map(points, anatomy)
    values = member @ table
    k = rng.normal(size=(4, 3)) / 25.0
    phase = rng.uniform(0, 2 * np.pi, 4)
    tex = sum(np.sin(points @ k[i] + phase[i]) for i in range(4)) / 4.0
    b = rng.normal(size=3) / 300.0
    field = 1.0 + bias * np.tanh(points @ b)
    inside = 1.0 - member[:, 0]
    return (values * (1.0 + texture * tex * inside)) * field


@dataclass
class PhantomPair:
    """A fixed/moving pair with the ground-truth mapping fixed -> moving (sitk transform)."""

    fixed: sitk.Image
    moving: sitk.Image
    truth: sitk.Transform
    fixed_labels: sitk.Image
    moving_labels: sitk.Image


def grid_points(grid: Grid) -> np.ndarray:
    """Physical points (Z*Y*X, 3) of every voxel, in array (z, y, x) order."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    idx = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
    return grid.to_physical(idx)


def make_grid(size: tuple[int, int, int] = (48, 48, 48), spacing: tuple[float, float, float]
              = (3.0, 3.0, 3.0), direction: np.ndarray | None = None,
              center: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Grid:
    """A grid of ``size`` (x, y, z) voxels centred on ``center`` (mm)."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    s = np.asarray(spacing, dtype=np.float64)
    half = (np.asarray(size, dtype=np.float64) - 1) / 2.0
    origin = np.asarray(center) - d @ (s * half)
    return Grid(shape=(size[2], size[1], size[0]), origin=origin, spacing=s, direction=d)


def make_pair(truth: sitk.Transform, fixed_grid: Grid | None = None,
              moving_grid: Grid | None = None, seed: int = 0, noise: float = 0.02,
              anatomy: list[Ellipsoid] | None = None,
              inverse: Callable[[np.ndarray], np.ndarray] | None = None) -> PhantomPair:
    """Two contrasts of one phantom: fixed on ``fixed_grid``, moving with M(y) = B(T^-1(y)).

    ``moving_grid`` defaults to the fixed grid moved by the truth (so the moving
    field of view follows the anatomy, as a second scanner's would).
    ``inverse`` maps moving points (N, 3, mm) to fixed points, T^-1, when the
    truth has no inverse that ITK can compute (a non-linear truth).
    """
    anatomy = anatomy or default_anatomy()
    fixed_grid = fixed_grid or make_grid()
    n_labels = max(e.label for e in anatomy) + 1
    table_a = contrast_table(n_labels, seed + 1)
    table_b = contrast_table(n_labels, seed + 2, non_monotonic=True)
    rng = np.random.default_rng(seed + 3)
    if moving_grid is None:
        center = np.asarray(truth.TransformPoint(tuple(float(v) for v in fixed_grid.center)))
        moving_grid = make_grid(fixed_grid.size_xyz, tuple(fixed_grid.spacing),
                                fixed_grid.direction, tuple(center))
    fixed_pts = grid_points(fixed_grid)
    fixed_values = render(fixed_pts, anatomy, table_a, seed + 4)
    fixed_values += noise * rng.normal(size=fixed_values.shape)
    moving_pts = grid_points(moving_grid)
    if inverse is not None:
        anatomical = inverse(moving_pts)
    elif isinstance(truth, sitk.AffineTransform | sitk.Euler3DTransform):
        anatomical = _apply_affine(truth.GetInverse(), moving_pts)
    else:
        inv = truth.GetInverse()
        anatomical = np.array([inv.TransformPoint(tuple(p)) for p in moving_pts])
    moving_values = render(anatomical, anatomy, table_b, seed + 5)
    moving_values += noise * rng.normal(size=moving_values.shape)
    fixed_labels = np.argmax(label_map(fixed_pts, anatomy), axis=1)
    moving_labels = np.argmax(label_map(anatomical, anatomy), axis=1)

    def image(values: np.ndarray, grid: Grid, dtype: type) -> sitk.Image:
        return grid.image_like(values.reshape(grid.shape).astype(dtype))

    return PhantomPair(
        fixed=image(fixed_values, fixed_grid, np.float32),
        moving=image(moving_values * 1000.0 - 200.0, moving_grid, np.float32),
        truth=truth,
        fixed_labels=image(fixed_labels, fixed_grid, np.uint8),
        moving_labels=image(moving_labels, moving_grid, np.uint8),
    )


def _apply_affine(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Vectorised TransformPoint for matrix transforms (Euler3D, Affine)."""
    m = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c = np.asarray(transform.GetCenter())
    t = np.asarray(transform.GetTranslation())
    return (points - c) @ m.T + c + t


def target_registration_error(estimate: sitk.Transform, truth: sitk.Transform,
                              points: np.ndarray) -> float:
    """Mean distance (mm) between where the estimate and the truth map ``points`` (N, 3)."""
    est = np.array([estimate.TransformPoint(tuple(p)) for p in points])
    ref = np.array([truth.TransformPoint(tuple(p)) for p in points])
    return float(np.mean(np.linalg.norm(est - ref, axis=1)))


def rigid_truth(angles_deg: tuple[float, float, float], translation_mm: tuple[float, float, float],
                center: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    """An Euler3D ground truth (R = Rz Ry Rx, ITK ZYX convention) about ``center``."""
    tx = sitk.Euler3DTransform()
    tx.SetComputeZYX(True)
    tx.SetCenter(center)
    tx.SetRotation(*np.deg2rad(angles_deg))
    tx.SetTranslation(translation_mm)
    return tx


@dataclass(frozen=True)
class GaussianBumps:
    """A smooth displacement g(z) = sum_k a_k exp(-|z - c_k|^2 / (2 s_k^2)) (LPS mm).

    ``centers`` (K, 3) mm, ``amplitudes`` (K, 3) mm vectors, ``sigmas`` (K,) mm.
    z -> z + g(z) is invertible when |dg/dz| < 1 (max |a| / s < e^0.5 per bump).
    """

    centers: np.ndarray
    amplitudes: np.ndarray
    sigmas: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        d2 = np.sum((points[:, None, :] - self.centers[None]) ** 2, axis=2)
        return np.exp(-d2 / (2 * self.sigmas[None] ** 2)) @ self.amplitudes

    def inverse(self, points: np.ndarray, iterations: int = 40) -> np.ndarray:
        """r(x) with x + r(x) the inverse of z -> z + g(z): fixed-point z = x - g(z)."""
        z = points.copy()
        for _ in range(iterations):
            z = points - self(z)
        return z - points


def random_bumps(rng: np.random.Generator, count: int = 4, max_mm: float = 6.0,
                 sigma_mm: float = 18.0, extent_mm: float = 40.0) -> GaussianBumps:
    """``count`` bumps of up to ``max_mm`` each, centres within +-``extent_mm`` of 0."""
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    amplitudes = directions * rng.uniform(0.6, 1.0, (count, 1)) * max_mm
    return GaussianBumps(rng.uniform(-extent_mm, extent_mm, (count, 3)), amplitudes,
                         np.full(count, sigma_mm))


def make_deformed_pair(linear: sitk.Transform, bumps: GaussianBumps, fixed_grid: Grid,
                       moving_grid: Grid | None = None, seed: int = 0, noise: float = 0.02,
                       anatomy: list[Ellipsoid] | None = None) -> PhantomPair:
    """A pair whose truth is T(x) = linear(x + r(x)), x + r(x) the inverse of z + g(z).

    The moving image at y shows the anatomy at S(linear^-1(y)), S(z) = z + g(z)
    (``bumps``), so the truth is the engine's form (``displacement``): a
    composite of ``linear`` and a displacement field r on the fixed grid.
    """
    inv_linear = linear.GetInverse()

    def inverse(points: np.ndarray) -> np.ndarray:
        z = _apply_affine(inv_linear, points)
        return z + bumps(z)

    points = grid_points(fixed_grid)
    residual = bumps.inverse(points).reshape(*fixed_grid.shape, 3)
    truth = residual_transform(linear, residual, fixed_grid)
    return make_pair(truth, fixed_grid=fixed_grid, moving_grid=moving_grid or fixed_grid,
                     seed=seed, noise=noise, anatomy=anatomy, inverse=inverse)
