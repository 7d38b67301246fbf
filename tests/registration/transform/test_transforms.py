"""Transform families: conventions against SimpleITK and analytic derivatives."""

from __future__ import annotations

import numpy as np
import pytest

from disa.registration.transform.parametric import (
    TransformModel,
    euler_from_matrix,
    rotation_matrix,
)

CENTER = np.array([10.0, -5.0, 3.0])
POINTS = np.random.default_rng(0).normal(size=(20, 3)) * 50.0


def _theta(mode: str) -> np.ndarray:
    rigid = np.array([0.3, -0.2, 0.5, 4.0, 5.0, -6.0])
    if mode == "rigid":
        return rigid
    stretch = np.array([[1.1, 0.05, 0.0], [0.0, 0.95, 0.02], [0.03, 0, 1.05]])
    m = rotation_matrix(rigid[:3]) @ stretch
    return np.concatenate([m.ravel(), rigid[3:]])


@pytest.mark.parametrize("mode", ["rigid", "affine"])
def test_points_map_as_simpleitk_maps_them(mode: str) -> None:
    model = TransformModel(mode, CENTER)
    theta = _theta(mode)
    tx = model.to_sitk(theta)
    expected = np.array([tx.TransformPoint(tuple(p)) for p in POINTS])
    np.testing.assert_allclose(model.apply(theta, POINTS), expected, atol=1e-9)


@pytest.mark.parametrize("mode", ["rigid", "affine"])
def test_matrix_derivatives_match_finite_differences(mode: str) -> None:
    model = TransformModel(mode, CENTER)
    theta = _theta(mode)
    _, dp = model.matrices(theta)
    for k in range(model.n_params):
        step = np.zeros(model.n_params)
        step[k] = 1e-6
        p_plus, _ = model.matrices(theta + step)
        p_minus, _ = model.matrices(theta - step)
        np.testing.assert_allclose((p_plus - p_minus) / 2e-6, dp[:, k], atol=1e-6)


def test_identity_maps_points_to_themselves() -> None:
    for mode in ("rigid", "affine"):
        model = TransformModel(mode, CENTER)
        np.testing.assert_allclose(model.apply(model.identity(), POINTS), POINTS, atol=1e-12)


def test_rotation_is_about_the_centre() -> None:
    model = TransformModel("rigid", CENTER)
    theta = np.array([0.4, 0.1, -0.3, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(model.apply(theta, CENTER[None, :])[0], CENTER, atol=1e-12)


def test_euler_angles_round_trip() -> None:
    angles = np.array([0.3, -0.4, 1.2])
    np.testing.assert_allclose(euler_from_matrix(rotation_matrix(angles)), angles, atol=1e-12)


def test_euler_angles_are_those_of_the_nearest_rotation() -> None:
    """A matrix with rounding noise (a REG read back from 16-character decimals, a
    header's cosines) gives the angles of its nearest rotation (scipy's Rotation), and at
    the gimbal lock the angles still reproduce the rotation."""
    from disa.registration.transform.parametric import nearest_rotation

    rng = np.random.default_rng(4)
    noisy = rotation_matrix(np.array([0.7, -0.2, 2.5])) + rng.normal(0, 1e-4, (3, 3))
    np.testing.assert_allclose(rotation_matrix(euler_from_matrix(noisy)),
                               nearest_rotation(noisy), atol=1e-9)
    locked = rotation_matrix(np.array([0.3, np.pi / 2, 0.2]))
    np.testing.assert_allclose(rotation_matrix(euler_from_matrix(locked)), locked, atol=1e-9)


def test_affine_from_rigid_is_the_same_mapping() -> None:
    rigid = TransformModel("rigid", CENTER)
    affine = TransformModel("affine", CENTER)
    theta = _theta("rigid")
    np.testing.assert_allclose(affine.apply(affine.from_rigid(theta), POINTS),
                               rigid.apply(theta, POINTS), atol=1e-9)


def test_scales_give_millimetres_at_the_radius() -> None:
    model = TransformModel("rigid", np.zeros(3))
    scales = model.scales(radius_mm=50.0)
    # One unit of the first angle (scaled) moves a point 50 mm from the centre by ~1 mm.
    moved = model.apply(np.array([scales[0], 0, 0, 0, 0, 0]), np.array([[0.0, 50.0, 0.0]]))
    assert abs(np.linalg.norm(moved - [0.0, 50.0, 0.0]) - 1.0) < 1e-3
