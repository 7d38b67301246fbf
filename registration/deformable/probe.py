"""Ultrasound probe compression: rigid pose plus two compression parameters (paper, 4.3).

A hand-held probe presses the tissue under it: tissue near the probe face is
pushed along the probe axis into the body, deep tissue hardly moves. The model
is one-dimensional along the probe axis n (unit, pointing into the body) with
the probe face centre o (LPS mm), both in the ultrasound image's frame:

    depth(y) = max(0, (y - o) . n)                         mm below the probe face
    u(y)     = a * exp(-depth(y) / L) * n                  displacement, LPS mm

with a the amplitude (mm; > 0: pushed into the body, i.e. compression) and L
the decay length (mm). Why this profile: it is smooth in both parameters, has
the right limits (u = a n at the face, u -> 0 deep) and the mapping
y -> y + u(y) is monotonic along n, hence invertible, whenever a < L (its
derivative along n is 1 - (a / L) exp(-depth / L) > 0). The model keeps
a in [-0.5 L, 0.8 L] and L in [``DECAY_MIN_MM``, ``DECAY_MAX_MM``] so it always
is. Points above the face (depth < 0: gel, air) move with the face.

Direction of the mapping (the engine maps fixed points to moving points):

* ultrasound = "moving" (default; the paper registers the ultrasound to the
  CT/MR): T(x) = C(R(x)) with R the rigid part and C(y) = y + u(y) the
  compression, applied in the ultrasound frame to the undeformed anatomy.
* ultrasound = "fixed": T(x) = R(x - u(x)), the same family used as the
  decompression of the ultrasound's points before the rigid part. (Not the
  exact inverse of the "moving" form, but the same physics with the same
  meaning of a and L, fitted directly.)

Parameters theta (8): Euler angles (rad, R = Rz Ry Rx), translation (mm) about
the fixed image centre, as ``TransformModel("rigid")``, then a (mm) and L (mm).

Matched-deformation refinement: descriptors are not invariant to the strain of
the compression (up to a / L at the probe face), which biased the decay length
by 20-50 % on phantoms. As the re-oriented refinement re-grids the moving
image along the current rotation, it also resamples it through the current
estimate (parameters c) so that both images show the tissue in the same state:

* ultrasound moving: M'(z) = M(C_c(z)) (the ultrasound decompressed); the model
  maps to C_c^-1(T_theta(x)) in that image;
* ultrasound fixed: M'(y) = M(W(y)), W = R_c D_c R_c^-1 (the CT/MR compressed
  like the ultrasound); the model maps to W^-1(T_theta(x)) = R_c D_c^-1 R_c^-1 T_theta(x).

Both inverses are one-dimensional along the axis (Newton on depth); theta stays
the absolute parameters (``referenced``, ``regrid_transform``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import numpy as np
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.grid import Grid
from disa.registration.transform.parametric import TransformModel

Ultrasound = Literal["moving", "fixed"]

#: Starting decay length of the compression (mm): a typical abdominal probe footprint.
DECAY_START_MM = 40.0
#: Shortest decay length (mm) the model accepts; shorter is not tissue mechanics.
DECAY_MIN_MM = 5.0
#: Longest decay length (mm): beyond it the compression is a translation along the axis,
#: which the rigid part already has (the two then drift together; seen on phantoms).
DECAY_MAX_MM = 150.0
#: Amplitude bounds as fractions of L: a < L keeps the mapping invertible (see above).
AMPLITUDE_RANGE = (-0.5, 0.8)
#: How far (mm) the probe face centre may lie outside the ultrasound image's field of view
#: (the skin line a few mm above a cropped first row); farther is a frame or unit mistake.
ORIGIN_MARGIN_MM = 10.0


def compression_profile(depth: np.ndarray, amplitude: np.ndarray, decay: np.ndarray
                        ) -> tuple[np.ndarray, ...]:
    """u = a exp(-max(depth, 0) / L) and its derivatives (du/ddepth, du/da, du/dL).

    ``depth`` (B, N) mm; ``amplitude`` and ``decay`` (B,) mm, clamped as the
    module docstring says, L to [DECAY_MIN_MM, DECAY_MAX_MM] (the derivative of a
    clamped parameter is zero).
    """
    decay_eff = np.clip(decay, DECAY_MIN_MM, DECAY_MAX_MM)
    amp = np.clip(amplitude, AMPLITUDE_RANGE[0] * decay_eff, AMPLITUDE_RANGE[1] * decay_eff)
    free_a = (amp == amplitude).astype(np.float64)[:, None]
    free_l = (decay_eff == decay).astype(np.float64)[:, None]
    d = np.maximum(depth, 0.0)
    e = np.exp(-d / decay_eff[:, None])
    u = amp[:, None] * e
    du_ddepth = np.where(depth > 0.0, -u / decay_eff[:, None], 0.0)
    du_da = e * free_a
    du_dl = u * d / decay_eff[:, None] ** 2 * free_l
    return u, du_ddepth, du_da, du_dl


@dataclass(frozen=True)
class ProbeGeometry:
    """Probe face centre ``origin`` (LPS mm) and unit ``axis`` into the body (LPS)."""

    origin: np.ndarray
    axis: np.ndarray
    source: str = "options"

    def as_dict(self) -> dict[str, object]:
        return {"origin_mm": [float(v) for v in self.origin],
                "axis": [float(v) for v in self.axis], "source": self.source}

    def checked(self, image: sitk.Image) -> ProbeGeometry:
        """This geometry, or InputError when it cannot describe a probe on ``image`` (the
        ultrasound volume; both in its LPS mm frame).

        The face centre must lie within ``ORIGIN_MARGIN_MM`` of the image's field of
        view (voxel edges), and the image must reach deeper than ``DECAY_MIN_MM`` below
        the face: above the face every point moves with it, so an origin beyond the far
        side or an axis pointing out of the body makes the compression a translation,
        which the rigid part already has (the fit then reports meaningless a and L).
        """
        if self.origin.shape != (3,) or not np.all(np.isfinite(self.origin)):
            raise InputError(f"probe_origin must be 3 finite numbers (LPS mm), "
                             f"got {self.origin.tolist()}")
        grid = Grid.from_image(image)
        size = np.asarray(grid.size_xyz, dtype=np.float64)
        index = grid.to_index(self.origin[None, :])[0]
        # Distance outside the field of view along each grid axis, in mm (0 inside).
        outside = np.maximum(np.maximum(-0.5 - index, index - (size - 0.5)), 0.0) * grid.spacing
        if np.linalg.norm(outside) > ORIGIN_MARGIN_MM:
            raise InputError(
                f"probe_origin {[round(float(v), 2) for v in self.origin]} lies "
                f"{np.linalg.norm(outside):.0f} mm outside the ultrasound image's field of "
                f"view: give the probe face centre in LPS mm of the ultrasound image")
        corners = grid.to_physical(np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64)
                                   * size - 0.5)
        deepest = float(np.max((corners - self.origin) @ self.axis))
        if deepest <= DECAY_MIN_MM:
            raise InputError(
                f"the ultrasound image lies above the probe face along probe_axis "
                f"{[round(float(v), 3) for v in self.axis]} (at most {deepest:.1f} mm deep): "
                f"the axis must point from the probe into the body")
        return self


@dataclass(frozen=True)
class ProbeModel:
    """Rigid pose + probe compression (8 parameters), fixed points -> moving points (mm).

    Implements the ``PointModel`` protocol of ``objective.PointObjective`` and
    the parts of ``TransformModel`` the search uses (scales, apply, identity,
    linear_part for the re-oriented refinement, to_sitk for the rigid part).
    """

    center: np.ndarray
    probe: ProbeGeometry
    ultrasound: Ultrasound = "moving"
    decay_start_mm: float = DECAY_START_MM
    #: Parameters c whose deformation the moving map was resampled with (see above).
    reference: tuple[float, ...] | None = None
    rigid: TransformModel = field(init=False)
    mode: str = field(init=False, default="rigid+probe")
    #: No step criterion for L-BFGS (TransformModel.step_tolerance_mm): the decay
    #: length is a flat direction whose steps stay small far from its optimum.
    step_tolerance_mm: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rigid", TransformModel("rigid", np.asarray(self.center)))

    @property
    def n_params(self) -> int:
        return 8

    def identity(self) -> np.ndarray:
        return np.concatenate([self.rigid.identity(), [0.0, self.decay_start_mm]])

    def scales(self, radius_mm: float) -> np.ndarray:
        """Displacement units: the amplitude is mm already; a change of L by a quarter of
        its start value moves tissue by about a millimetre at typical amplitudes."""
        return np.concatenate([self.rigid.scales(radius_mm), [1.0, self.decay_start_mm / 20]])

    def linear_part(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rigid rotation R (B, 3, 3) and dR/dtheta (B, 8, 3, 3)."""
        theta = np.atleast_2d(theta)
        r, dr = self.rigid.linear_part(theta[:, :6])
        dm = np.zeros((len(theta), 8, 3, 3))
        dm[:, :6] = dr
        return r, dm

    def _depth(self, points: np.ndarray) -> np.ndarray:
        return (points - self.probe.origin) @ self.probe.axis

    def referenced(self, theta: np.ndarray) -> ProbeModel:
        """This model for a moving map resampled with ``regrid_transform(theta, ...)``."""
        theta = np.asarray(theta, dtype=np.float64).ravel()
        return replace(self, reference=tuple(float(v) for v in theta))

    def _axial_field(self, theta: np.ndarray, grid: Grid, sign: float) -> sitk.Transform:
        """y -> y + sign u(y) n sampled on ``grid`` (ultrasound frame), as an ITK transform."""
        z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
        points = grid.to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(float))
        u, *_ = compression_profile(self._depth(points)[None], theta[None, 6], theta[None, 7])
        field_ = (sign * u[0][:, None] * self.probe.axis).reshape(*grid.shape, 3)
        return sitk.DisplacementFieldTransform(grid.image_like(field_, is_vector=True))

    def regrid_transform(self, theta: np.ndarray, moving_grid: Grid, fixed_grid: Grid
                         ) -> sitk.Transform:
        """The transform to resample the moving image with so that it shows the tissue
        deformed as the fixed image does under theta (module docstring): C_c sampled on
        ``moving_grid`` (ultrasound moving) or R_c D_c R_c^-1 with D_c on ``fixed_grid``
        (ultrasound fixed)."""
        theta = np.asarray(theta, dtype=np.float64).ravel()
        if self.ultrasound == "moving":
            return self._axial_field(theta, moving_grid, 1.0)
        rigid = self.to_sitk(theta)
        composite = sitk.CompositeTransform(3)
        composite.AddTransform(rigid)
        composite.AddTransform(self._axial_field(theta, fixed_grid, -1.0))
        composite.AddTransform(rigid.GetInverse())
        return composite

    def _axial_inverse(self, y: np.ndarray, sign: float) -> tuple[np.ndarray, np.ndarray]:
        """z with z + sign u(z) n = y for the reference's (a, L), and dz/dy along the axis
        (both (B, N, ...)), by Newton on depth (monotonic: a < L)."""
        assert self.reference is not None
        a0, l0 = np.array([self.reference[6]]), np.array([self.reference[7]])
        target = self._depth(y)
        shape = target.shape
        t = target.reshape(1, -1)
        d = t - sign * compression_profile(t, a0, l0)[0]
        for _ in range(8):
            u, du, *_ = compression_profile(d, a0, l0)
            d = d - (d + sign * u - t) / (1.0 + sign * du)
        _, du, *_ = compression_profile(d, a0, l0)
        z = y + (d - t).reshape(shape)[..., None] * self.probe.axis
        return z, (1.0 / (1.0 + sign * du)).reshape(shape)

    def _reference_rigid(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.reference is not None
        p, _ = self.rigid.matrices(np.asarray(self.reference[:6])[None, :])
        return p[0, :, :3], p[0, :, 3]

    def _undo_reference(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where a moving point y (B, N, 3) lies in the resampled moving map, and the axial
        factor of that map's Jacobian there (B, N)."""
        if self.ultrasound == "moving":
            return self._axial_inverse(y, 1.0)
        m, o = self._reference_rigid()
        w, factor = self._axial_inverse((y - o) @ np.linalg.inv(m).T, -1.0)
        return w @ m.T + o, factor

    def _pull_reference(self, y: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """d cost / d y from d cost / d (the point in the resampled map) ``grad``."""
        n = self.probe.axis
        if self.ultrasound == "moving":
            _, factor = self._axial_inverse(y, 1.0)
            return grad + ((factor - 1.0) * (grad @ n))[..., None] * n
        m, o = self._reference_rigid()
        _, factor = self._axial_inverse((y - o) @ np.linalg.inv(m).T, -1.0)
        g_w = grad @ m
        g_z = g_w + ((factor - 1.0) * (g_w @ n))[..., None] * n
        return g_z @ np.linalg.inv(m)

    def map_points(self, theta: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Moving points (B, N, 3) of fixed points (N, 3) for parameters (B, 8); LPS mm."""
        theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
        p, _ = self.rigid.matrices(theta[:, :6])
        n = self.probe.axis
        if self.ultrasound == "moving":
            y = np.einsum("bij,nj->bni", p[:, :, :3], points) + p[:, None, :, 3]
            u, *_ = compression_profile(self._depth(y), theta[:, 6], theta[:, 7])
            moved = y + u[..., None] * n
        else:
            depth = np.broadcast_to(self._depth(points), (len(theta), len(points)))
            u, *_ = compression_profile(depth, theta[:, 6], theta[:, 7])
            z = points[None] - u[..., None] * n
            moved = np.einsum("bij,bnj->bni", p[:, :, :3], z) + p[:, None, :, 3]
        return moved if self.reference is None else self._undo_reference(moved)[0]

    def map_points_unreferenced(self, theta: np.ndarray, points: np.ndarray) -> np.ndarray:
        """T_theta(x) (B, N, 3) in the moving image's own frame, ignoring ``reference``."""
        return replace(self, reference=None).map_points(theta, points)

    def pullback(self, theta: np.ndarray, points: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """d cost / d theta (B, 8) from d cost / d moving point ``grad`` (B, N, 3)."""
        theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
        p, dp = self.rigid.matrices(theta[:, :6])
        n = self.probe.axis
        out = np.zeros((len(theta), 8))
        if self.reference is not None:  # first back through the resampled map's frame
            grad = self._pull_reference(self.map_points_unreferenced(theta, points), grad)
        if self.ultrasound == "moving":
            y = np.einsum("bij,nj->bni", p[:, :, :3], points) + p[:, None, :, 3]
            _, du_dd, du_da, du_dl = compression_profile(self._depth(y), theta[:, 6],
                                                         theta[:, 7])
            along = grad @ n  # (B, N): d cost / d u
            grad_y = grad + (along * du_dd)[..., None] * n  # (I + du/dd n n^T)^T grad
            rigid_points = np.broadcast_to(points, grad.shape)
        else:
            depth = np.broadcast_to(self._depth(points), (len(theta), len(points)))
            u, _, du_da, du_dl = compression_profile(depth, theta[:, 6], theta[:, 7])
            rigid_points = points[None] - u[..., None] * n
            grad_y = grad
            along = -(grad @ p[:, :, :3]) @ n  # d cost / d u through z = x - u n, y = M z + o
        # d cost / d P (B, 3, 4) = sum_n grad_y (x_n, 1)^T, then the rigid chain rule.
        grad_p = np.concatenate([np.einsum("bni,bnj->bij", grad_y, rigid_points),
                                 grad_y.sum(axis=1)[..., None]], axis=2)
        out[:, :6] = np.einsum("bij,bkij->bk", grad_p, dp)
        out[:, 6] = np.sum(along * du_da, axis=1)
        out[:, 7] = np.sum(along * du_dl, axis=1)
        return out

    def apply(self, theta: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Moving points (N, 3) of fixed points (N, 3) for one parameter set."""
        return self.map_points(np.asarray(theta)[None, :], np.asarray(points, np.float64))[0]

    def to_sitk(self, theta: np.ndarray) -> sitk.Transform:
        """The rigid part as a SimpleITK Euler3D transform (the compression is not linear:
        the full mapping is written as a displacement field, see ``displacement``)."""
        return self.rigid.to_sitk(np.asarray(theta, dtype=np.float64).ravel()[:6])

    def matrix_4x4(self, theta: np.ndarray) -> np.ndarray:
        """Homogeneous matrix of the rigid part (fixed -> moving, LPS mm)."""
        return self.rigid.matrix_4x4(np.asarray(theta, dtype=np.float64).ravel()[:6])

    def describe(self, theta: np.ndarray) -> dict[str, object]:
        """result.json facts: probe geometry and the fitted (clamped) parameters."""
        theta = np.asarray(theta, dtype=np.float64).ravel()
        decay = float(np.clip(theta[7], DECAY_MIN_MM, DECAY_MAX_MM))
        amp = float(np.clip(theta[6], AMPLITUDE_RANGE[0] * decay, AMPLITUDE_RANGE[1] * decay))
        return {**self.probe.as_dict(), "ultrasound": self.ultrasound,
                "amplitude_mm": amp, "decay_length_mm": decay,
                "model": "u = a exp(-max(0, (y - origin).axis) / L) axis"}


def probe_from_image(image: sitk.Image, max_dim: int = 128) -> ProbeGeometry:
    """Probe face and axis from an ultrasound volume's field of view (heuristic).

    Ultrasound volumes are zero outside the scanned sector, and a sector
    widens with depth. For each grid axis, compare the non-zero cross-section
    near its two ends; the axis and end with the largest ratio (narrow end
    first) is the probe side. The probe face centre is the centroid of the
    first non-zero slice on that side, the axis the grid axis pointing from it
    into the volume. Raises InputError when no side is clearly narrower (a
    linear probe, or a volume without a zero background): give probe_origin
    and probe_axis then.
    """
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, int(np.ceil(max(array.shape) / max_dim)))
    sub = np.asarray(array[::step, ::step, ::step])
    mask = sub > sub.min()
    if mask.mean() > 0.98 or mask.sum() < 64:
        raise InputError("cannot find the ultrasound sector (no zero background): "
                         "give probe_origin and probe_axis")
    best: tuple[float, int, int] | None = None  # (ratio, numpy axis, side)
    for axis in range(3):
        area = mask.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
        occupied = np.flatnonzero(area > 0)
        lo, hi = int(occupied[0]), int(occupied[-1])
        band = max(1, (hi - lo + 1) * 15 // 100)
        near_lo, near_hi = area[lo:lo + band].mean(), area[hi - band + 1:hi + 1].mean()
        ratio, side = (near_hi / near_lo, 0) if near_lo <= near_hi else (near_lo / near_hi, 1)
        if best is None or ratio > best[0]:
            best = (ratio, axis, side)
    assert best is not None
    ratio, axis, side = best
    if ratio < 1.3:
        raise InputError("the ultrasound sector has no clearly narrow side (linear probe?): "
                         "give probe_origin and probe_axis")
    area = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    occupied = np.flatnonzero(area > 0)
    face = int(occupied[0] if side == 0 else occupied[-1])
    idx = np.argwhere(np.take(mask, face, axis=axis))  # the other two numpy axes
    zyx = np.zeros(3)
    others = [a for a in range(3) if a != axis]
    zyx[others] = idx.mean(axis=0)
    zyx[axis] = face
    index_xyz = (zyx * step)[::-1]
    origin = np.asarray(image.TransformContinuousIndexToPhysicalPoint(
        tuple(float(v) for v in index_xyz)))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    into = direction[:, 2 - axis] * (1.0 if side == 0 else -1.0)
    return ProbeGeometry(origin, into / np.linalg.norm(into), source="image")


def resolve_probe(origin: tuple[float, float, float] | None,
                  axis: tuple[float, float, float] | None,
                  ultrasound_image: sitk.Image) -> ProbeGeometry:
    """Probe geometry from the options (both LPS mm / LPS direction) or, for what they
    leave out, from the ultrasound image's field of view (``probe_from_image``)."""
    guess = None if origin is not None and axis is not None \
        else probe_from_image(ultrasound_image)
    o = np.asarray(origin, dtype=np.float64) if origin is not None else guess.origin
    a = np.asarray(axis, dtype=np.float64) if axis is not None else guess.axis
    source = "options" if guess is None else ("image" if origin is None and axis is None
                                              else "options+image")
    return ProbeGeometry(o, _unit_axis(a), source=source).checked(ultrasound_image)


def _unit_axis(axis: np.ndarray) -> np.ndarray:
    """``axis`` scaled to unit length; InputError for a zero or non-finite vector.

    Divided by its largest component first: the plain norm of (1e300, 1e300, 0)
    overflows to inf and the axis became (0, 0, 0), a silently rigid model.
    """
    if axis.shape != (3,) or not np.all(np.isfinite(axis)) or not np.any(axis):
        raise InputError(f"probe_axis must be a non-zero vector of 3 finite numbers, "
                         f"got {axis.tolist()}")
    scaled = axis / np.max(np.abs(axis))
    return scaled / np.linalg.norm(scaled)
