"""Parametric transforms that map fixed points to moving points (LPS mm).

Convention (ITK resampling): T maps a point x of the fixed image to the point
T(x) of the moving image, so ``sitk.Resample(moving, fixed, T)`` is the moving
image on the fixed grid. Every family here writes T as

    T(x) = M(theta) (x - c) + c + t(theta)   =   [M | o] (x, 1)

about a fixed centre c (the fixed image centre, mm). The optimiser works with
the 3x4 matrix P = [M | o] and its derivatives dP/dtheta, so one objective
kernel serves rigid and affine alike.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

Mode = Literal["rigid", "affine"]


def _rotations(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elementary rotations (B, 3, 3) about x, y and z for angles (B, 3) in radians."""
    a, b, g = angles[:, 0], angles[:, 1], angles[:, 2]
    n = len(angles)
    rx = np.zeros((n, 3, 3))
    ry = np.zeros((n, 3, 3))
    rz = np.zeros((n, 3, 3))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    rx[:, 0, 0] = 1
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = ca, -sa, sa, ca
    ry[:, 1, 1] = 1
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = cb, sb, -sb, cb
    rz[:, 2, 2] = 1
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = cg, -sg, sg, cg
    return rx, ry, rz


def _rotation_derivatives(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R = Rz Ry Rx (ITK Euler3D, ComputeZYX on) and dR/d(angle) as (B, 3, 3, 3)."""
    rx, ry, rz = _rotations(angles)
    a, b, g = angles[:, 0], angles[:, 1], angles[:, 2]
    drx = np.zeros_like(rx)
    dry = np.zeros_like(ry)
    drz = np.zeros_like(rz)
    sa, ca, sb, cb, sg, cg = np.sin(a), np.cos(a), np.sin(b), np.cos(b), np.sin(g), np.cos(g)
    drx[:, 1, 1], drx[:, 1, 2], drx[:, 2, 1], drx[:, 2, 2] = -sa, -ca, ca, -sa
    dry[:, 0, 0], dry[:, 0, 2], dry[:, 2, 0], dry[:, 2, 2] = -sb, cb, -cb, -sb
    drz[:, 0, 0], drz[:, 0, 1], drz[:, 1, 0], drz[:, 1, 1] = -sg, -cg, cg, -sg
    r = rz @ ry @ rx
    d = np.stack([rz @ ry @ drx, rz @ dry @ rx, drz @ ry @ rx], axis=1)
    return r, d


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrices R = Rz Ry Rx for angles (..., 3) in radians about x, y, z."""
    angles = np.atleast_2d(np.asarray(angles_rad, dtype=np.float64))
    r, _ = _rotation_derivatives(angles)
    return r.reshape((*np.shape(angles_rad)[:-1], 3, 3))


def euler_from_matrix(r: np.ndarray) -> np.ndarray:
    """Angles (x, y, z) in radians with R = Rz Ry Rx (inverse of rotation_matrix).

    scipy's Rotation does the conversion: R = Rz Ry Rx is its extrinsic "xyz"
    sequence (ITK Euler3D with ComputeZYX). Angles y stay within +-90 degrees; at
    the gimbal lock (y = +-90) scipy sets the z angle to 0 and warns, and the
    angles still reproduce R.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gimbal lock: still a valid answer
        return Rotation.from_matrix(np.asarray(r, dtype=np.float64)).as_euler("xyz")


@dataclass(frozen=True)
class TransformModel:
    """A transform family about a fixed centre (mm): rigid (6) or affine (12).

    Parameters theta:
      rigid:  (angle_x, angle_y, angle_z [rad], t_x, t_y, t_z [mm]), M = Rz Ry Rx.
      affine: (m00, m01, ..., m22, t_x, t_y, t_z), M row-major, t in mm.
    """

    #: L-BFGS counts as converged when two iterations in a row move no parameter by
    #: more than this in displacement units (mm at the sample radius, see scales).
    #: Why a step and not scipy's ftol/gtol: those are in units of the cost, which
    #: differ between DISA dot products and MIND-SSC SSD; a step in mm means the
    #: same for both. On the twelve CT-MR capture-range cases 0.01 mm cut DISA's
    #: L-BFGS evaluations from ~47 to ~11 a run with every TRE within 0.1 mm.
    step_tolerance_mm: ClassVar[float] = 0.01

    mode: Mode
    center: np.ndarray

    @property
    def n_params(self) -> int:
        return 6 if self.mode == "rigid" else 12

    def identity(self) -> np.ndarray:
        if self.mode == "rigid":
            return np.zeros(6)
        return np.concatenate([np.eye(3).ravel(), np.zeros(3)])

    def scales(self, radius_mm: float) -> np.ndarray:
        """Parameter units that move a point at ``radius_mm`` from the centre by ~1 mm.

        The optimisers work on theta / scale so that every coordinate is in mm of
        displacement, which makes step sizes and tolerances meaningful.
        """
        if self.mode == "rigid":
            return np.array([1.0 / radius_mm] * 3 + [1.0] * 3)
        return np.array([1.0 / radius_mm] * 9 + [1.0] * 3)

    def linear_part(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """M (B, 3, 3) and dM/dtheta (B, P, 3, 3) for parameters theta (B, P)."""
        theta = np.atleast_2d(theta)
        n = len(theta)
        if self.mode == "rigid":
            r, dr = _rotation_derivatives(theta[:, :3])
            dm = np.zeros((n, 6, 3, 3))
            dm[:, :3] = dr
            return r, dm
        m = theta[:, :9].reshape(n, 3, 3)
        dm = np.zeros((n, 12, 3, 3))
        for k in range(9):
            dm[:, k, k // 3, k % 3] = 1.0
        return m, dm

    def matrices(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P = [M | o] (B, 3, 4) with o = c - M c + t, and dP/dtheta (B, P, 3, 4)."""
        theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
        m, dm = self.linear_part(theta)
        c = self.center
        t = theta[:, -3:]
        p = np.empty((len(theta), 3, 4))
        p[:, :, :3] = m
        p[:, :, 3] = c[None, :] - m @ c + t
        dp = np.zeros((len(theta), self.n_params, 3, 4))
        dp[:, :, :, :3] = dm
        dp[:, :, :, 3] = -(dm @ c)
        for k in range(3):
            dp[:, self.n_params - 3 + k, k, 3] += 1.0
        return p, dp

    def apply(self, theta: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Map fixed points (N, 3) in LPS mm to moving points (N, 3)."""
        p, _ = self.matrices(theta)
        return points @ p[0, :, :3].T + p[0, :, 3]

    def to_sitk(self, theta: np.ndarray) -> sitk.Transform:
        """The same mapping as a SimpleITK transform (fixed -> moving points)."""
        theta = np.asarray(theta, dtype=np.float64).ravel()
        center = tuple(float(v) for v in self.center)
        if self.mode == "rigid":
            tx = sitk.Euler3DTransform()
            tx.SetComputeZYX(True)  # R = Rz Ry Rx, as rotation_matrix()
            tx.SetCenter(center)
            tx.SetRotation(*(float(v) for v in theta[:3]))
            tx.SetTranslation(tuple(float(v) for v in theta[3:]))
            return tx
        tx = sitk.AffineTransform(3)
        tx.SetCenter(center)
        tx.SetMatrix(tuple(float(v) for v in theta[:9]))
        tx.SetTranslation(tuple(float(v) for v in theta[9:]))
        return tx

    def from_rigid(self, rigid_theta: np.ndarray) -> np.ndarray:
        """Affine parameters equal to a rigid transform with the same centre."""
        if self.mode == "rigid":
            return np.asarray(rigid_theta, dtype=np.float64).copy()
        r = rotation_matrix(np.asarray(rigid_theta[:3]))
        return np.concatenate([r.ravel(), np.asarray(rigid_theta[3:], dtype=np.float64)])

    def matrix_4x4(self, theta: np.ndarray) -> np.ndarray:
        """Homogeneous 4x4 matrix of the fixed -> moving mapping (LPS mm)."""
        p, _ = self.matrices(theta)
        h = np.eye(4)
        h[:3] = p[0]
        return h


def linear_matrix(transform: sitk.Transform) -> np.ndarray:
    """The homogeneous 4x4 matrix (fixed -> moving, LPS mm) of a linear SimpleITK transform.

    Accepts every transform whose mapping is x -> A x + b (Euler, versor, similarity,
    scale, affine, translation, and composites of them), read by probing the mapping at
    the origin and the unit vectors, which needs no knowledge of the transform's class.
    Raises ValueError for a mapping that is not linear (a displacement field, a B-spline),
    checked at points 100 mm out along each axis and its diagonal.
    """
    def at(point: np.ndarray) -> np.ndarray:
        return np.asarray(transform.TransformPoint(tuple(float(v) for v in point)), float)

    b = at(np.zeros(3))
    a = np.stack([at(e) - b for e in np.eye(3)], axis=1)
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        raise ValueError("the transform maps points to non-finite coordinates")
    for probe in (*(100.0 * e for e in np.eye(3)), np.array([-70.0, 80.0, -90.0])):
        if np.linalg.norm(at(probe) - (a @ probe + b)) > 1e-3:
            raise ValueError("the transform is not linear (x -> A x + b); give a rigid or "
                             "affine transform")
    if abs(np.linalg.det(a)) < 1e-6:
        raise ValueError("the transform's matrix is singular")
    h = np.eye(4)
    h[:3, :3] = a
    h[:3, 3] = b
    return h


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The proper rotation nearest to a 3x3 matrix (polar decomposition)."""
    u, _, vt = np.linalg.svd(matrix)
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] *= -1
    return u @ vt


def rigid_parameters(matrix: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Rigid theta (rad, mm) about ``center`` closest to a 4x4 fixed -> moving matrix.

    The rotation is the nearest proper rotation to the linear part (polar decomposition,
    so a small scale or shear in a given affine is dropped); the translation makes the
    rigid map agree with the matrix at ``center``.
    """
    r = nearest_rotation(matrix[:3, :3])
    c = np.asarray(center, dtype=np.float64)
    t = matrix[:3, :3] @ c + matrix[:3, 3] - c
    return np.concatenate([euler_from_matrix(r), t])
