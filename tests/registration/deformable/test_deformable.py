"""Deformable stage: per-point kernel, regularisers, field metrics, recovery and conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from disa.cli import EXIT_INPUT, EXIT_OK, main
from disa.core.grid import Grid
from disa.core.io.images import write_image
from disa.registration.deformable.regularise import diffusion, jacobian_penalty
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.kernels import descriptor_cost, point_descriptor_cost
from disa.registration.transform.displacement import (
    covering_grid,
    dense_displacement,
    jacobian_metrics,
    residual_transform,
)
from disa.training import phantom as ph


def _map(shape: tuple[int, int, int], seed: int, channels: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=(*shape, channels)), (1.5, 1.5, 1.5, 0))
    data /= np.maximum(np.linalg.norm(data, axis=-1, keepdims=True), 1.0) * 1.2
    return np.ascontiguousarray(data.astype(np.float32))


@pytest.mark.parametrize("ssd", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_point_kernel_matches_the_matrix_kernel_and_its_gradient(ssd: bool, int8: bool) -> None:
    rng = np.random.default_rng(0)
    moving = _map((18, 20, 22), 1)
    n = 500
    fixed = _map((n, 1, 1), 2).reshape(n, -1)
    scale = 1.0
    if int8:
        moving = np.round(moving * 127).astype(np.int8)
        fixed = np.round(fixed * 127).astype(np.int8)
        scale = 1 / 127
    points = rng.uniform(0, 18, (n, 3)).astype(np.float32)
    weights = np.full(n, 1.0 / n, dtype=np.float32)
    mats = np.array([[[0.98, 0.05, 0.0, 1.3], [-0.04, 1.01, 0.02, 0.7], [0.0, 0.03, 0.97, 1.1]],
                     [[1.0, 0.0, 0.0, -0.4], [0.0, 1.0, 0.0, 2.2], [0.0, 0.0, 1.0, 3.1]]])
    coords = np.einsum("bij,nj->bni", mats[:, :, :3], points) + mats[:, None, :, 3]
    # Validity: smooth in space, so both sums have informative gradients everywhere.
    z, y, x = np.meshgrid(*(np.arange(k) for k in moving.shape[:3]), indexing="ij")
    valid = np.clip(0.5 + 0.4 * np.sin(0.3 * x + 0.2 * y - 0.25 * z), 0, 1).astype(np.float32)
    faces = np.array([0, 1, 1, 0, 0, 1], np.uint8)  # some points lie beyond these
    args = (scale, scale, ssd)
    matrix = descriptor_cost(fixed, weights, points, moving, valid, faces, mats, *args, True)
    point = point_descriptor_cost(fixed, weights, coords, moving, valid, faces, *args, True)
    for k in (0, 1):  # s and w
        np.testing.assert_allclose(point[k], matrix[k], rtol=1e-6, atol=1e-9)
    # Chaining the per-point gradients through the affine map gives the matrix gradients.
    homogeneous = np.concatenate([points, np.ones((n, 1))], axis=1)
    for k in (2, 3):
        np.testing.assert_allclose(np.einsum("bni,nj->bij", point[k], homogeneous),
                                   matrix[k], rtol=1e-5, atol=1e-9)
    # Finite differences on a few points' coordinates, for both sums.
    for b, p, axis in ((0, 3, 0), (1, 10, 2), (0, 57, 1)):
        step = np.zeros_like(coords)
        step[b, p, axis] = 1e-4
        plus = point_descriptor_cost(fixed, weights, coords + step, moving, valid, faces, *args,
                                     False)
        minus = point_descriptor_cost(fixed, weights, coords - step, moving, valid, faces, *args,
                                      False)
        for k in (0, 1):
            assert (plus[k][b] - minus[k][b]) / 2e-4 == pytest.approx(point[k + 2][b, p, axis],
                                                                     rel=1e-3, abs=1e-7)
    no_grad = point_descriptor_cost(fixed, weights, coords, moving, valid, faces, *args,
                                    False)
    assert no_grad[2].shape == (2, 0, 3)


def test_regulariser_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(5, 6, 7, 3)) * 2.5  # strong enough that some corners fold
    direction = ph.rigid_truth((10.0, 0.0, 20.0), (0.0, 0.0, 0.0)).GetMatrix()
    a = np.asarray(direction).reshape(3, 3) * np.array([4.0, 5.0, 6.0])[None, :]
    spacing = np.array([4.0, 5.0, 6.0])
    e_jac, g_jac, min_det = jacobian_penalty(v, a, 0.3)
    _, g_dif = diffusion(v, spacing)
    assert e_jac > 0 and min_det < 0.3
    for index in ((1, 2, 3, 0), (4, 5, 6, 2), (0, 0, 0, 1), (2, 3, 1, 1)):
        step = np.zeros_like(v)
        step[index] = 1e-6
        numeric_jac = (jacobian_penalty(v + step, a, 0.3)[0]
                       - jacobian_penalty(v - step, a, 0.3)[0]) / 2e-6
        numeric_dif = (diffusion(v + step, spacing)[0] - diffusion(v - step, spacing)[0]) / 2e-6
        assert numeric_jac == pytest.approx(g_jac[index], rel=1e-4, abs=1e-6)
        assert numeric_dif == pytest.approx(g_dif[index], rel=1e-6, abs=1e-9)


def test_jacobian_metrics_of_known_fields() -> None:
    grid = ph.make_grid((20, 22, 24), (2.0, 2.5, 3.0))
    points = ph.grid_points(grid)
    linear = np.array([[1.1, 0.05, 0.0], [0.0, 0.9, 0.1], [0.02, 0.0, 1.2]])
    u = (points @ linear.T - points).reshape(*grid.shape, 3)
    metrics = jacobian_metrics(grid.image_like(u.astype(np.float32), is_vector=True))
    assert metrics["jacobian_min"] == pytest.approx(np.linalg.det(linear), rel=1e-4)
    assert metrics["sd_log_jacobian"] < 1e-4 and metrics["negative_jacobian_fraction"] == 0.0
    # A fold: x -> -x along x in a slab reverses orientation there.
    folded = np.zeros((*grid.shape, 3), dtype=np.float32)
    folded[:, :, 8:16, 0] = -2.0 * points.reshape(*grid.shape, 3)[:, :, 8:16, 0]
    metrics = jacobian_metrics(grid.image_like(folded, is_vector=True))
    assert metrics["negative_jacobian_fraction"] > 0.1


def test_residual_transform_is_linear_after_the_field_and_covers_the_image() -> None:
    image = ph.make_grid((30, 20, 25), (2.0, 2.0, 2.0)).reference_image()
    grid, inner = covering_grid(Grid.from_image(image).strided(4), image)
    assert all(s.start >= 1 for s in inner)
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint((x, y, z))
                        for x in (-0.5, 29.5) for y in (-0.5, 19.5) for z in (-0.5, 24.5)])
    index = grid.to_index(corners)
    assert index.min() >= 0 and np.all(index.max(axis=0) <= np.asarray(grid.size_xyz) - 1)
    residual = np.zeros((*grid.shape, 3))
    residual[..., 0] = 3.0  # 3 mm along x before the linear part
    linear = ph.rigid_truth((0.0, 0.0, 90.0), (1.0, 2.0, 3.0))
    transform = residual_transform(linear, residual, grid)
    x = np.array([4.0, -6.0, 5.0])
    expected = np.asarray(linear.TransformPoint(tuple(x + np.array([3.0, 0.0, 0.0]))))
    np.testing.assert_allclose(transform.TransformPoint(tuple(x)), expected, atol=1e-9)
    u = sitk.GetArrayFromImage(dense_displacement(transform, image))
    voxel = image.TransformIndexToPhysicalPoint((5, 6, 7))
    np.testing.assert_allclose(u[7, 6, 5], np.asarray(transform.TransformPoint(voxel)) - voxel,
                               atol=1e-4)


def test_options_and_cli_accept_the_new_modes() -> None:
    assert RegistrationOptions(mode="deformable", regularisation=2.0).deformable_from == "affine"
    with pytest.raises(ValueError):
        RegistrationOptions(mode="deformable", similarity="lc2")
    with pytest.raises(ValueError):
        RegistrationOptions(mode="rigid", probe_axis=(0.0, 1.0, 0.0))
    with pytest.raises(ValueError):
        RegistrationOptions(mode="rigid+probe", probe_axis=(0.0, 0.0, 0.0))
    assert main(["register", "a.nii.gz", "b.nii.gz", "-o", "out", "--mode", "deformable",
                 "--similarity", "lc2"]) == EXIT_INPUT


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def deformed_pair() -> ph.PhantomPair:
    """Four Gaussian bumps of up to 6 mm on top of a 4 mm / 3 degree rigid offset."""
    grid = ph.make_grid((56, 56, 56), (2.0, 2.0, 2.0))
    bumps = ph.random_bumps(np.random.default_rng(0), count=4, max_mm=6.0, sigma_mm=16.0,
                            extent_mm=28.0)
    linear = ph.rigid_truth((3.0, -2.0, 2.0), (4.0, -3.0, 3.0))
    return ph.make_deformed_pair(linear, bumps, grid, seed=1,
                                 anatomy=ph.default_anatomy(scale_mm=45.0))


def _dice(pair: ph.PhantomPair, transform: sitk.Transform) -> float:
    fixed = sitk.GetArrayFromImage(pair.fixed_labels)
    warped = sitk.GetArrayFromImage(sitk.Resample(pair.moving_labels, pair.fixed_labels,
                                                  transform, sitk.sitkNearestNeighbor, 0))
    return float(np.mean([2 * np.sum((warped == k) & (fixed == k))
                          / (np.sum(warped == k) + np.sum(fixed == k)) for k in range(1, 9)]))


@pytest.fixture(scope="module")
def deformable_result(deformed_pair):
    options = RegistrationOptions(similarity="mind", mode="deformable", deformable_from="rigid",
                                  init="geometry", starts=50, rotation_range=10,
                                  translation_range=15)
    return register(deformed_pair.fixed, deformed_pair.moving, options)


def test_deformable_recovers_a_smooth_deformation_without_folding(deformed_pair,
                                                                  deformable_result) -> None:
    result = deformable_result
    perfect = _dice(deformed_pair, deformed_pair.truth)
    rigid_only = _dice(deformed_pair, result.transform)
    deformed = _dice(deformed_pair, result.field_transform)
    assert deformed >= 0.9 * perfect
    # The field does work the rigid part cannot (measured: 0.841 -> 0.863, perfect 0.915).
    assert deformed >= rigid_only + 0.01
    assert result.deformation["negative_jacobian_fraction"] == 0.0
    assert 0.0 < result.deformation["sd_log_jacobian"] < 0.1
    assert result.mode == "deformable" and len(result.theta) == 6
    summary = result.summary()
    assert summary["deformation"]["linear_stage"] == "rigid"


def test_written_field_and_transform_follow_the_itk_convention(deformed_pair, tmp_path) -> None:
    """transform.h5 and displacement.nii.gz, read back by SimpleITK, land moving labels on the
    fixed labels exactly as the in-memory result does."""
    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    write_image(deformed_pair.fixed, fixed_path)
    write_image(deformed_pair.moving, moving_path)
    out = tmp_path / "out"
    code = main(["register", str(fixed_path), str(moving_path), "-o", str(out), "--mode",
                 "deformable", "--deformable-from", "rigid", "--similarity", "mind", "--starts",
                 "40", "--rotation-range", "10", "--translation-range", "15", "--init",
                 "geometry", "--quiet"])
    assert code == EXIT_OK
    data = json.loads((out / "result.json").read_text())
    assert {"transform.h5", "displacement.nii.gz"} <= set(data["files"])
    assert data["deformation"]["negative_jacobian_fraction"] == 0.0
    assert "sd_log_jacobian" in data["deformation"]
    full = sitk.ReadTransform(str(out / "transform.h5"))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == deformed_pair.fixed.GetSize()
    from_field = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    perfect = _dice(deformed_pair, deformed_pair.truth)
    assert _dice(deformed_pair, full) >= 0.9 * perfect
    assert _dice(deformed_pair, from_field) == pytest.approx(_dice(deformed_pair, full),
                                                             abs=0.005)
    # u(x) = T(x) - x at voxel centres, and the .tfm is the linear part of T.
    u = sitk.GetArrayFromImage(field)
    linear = sitk.ReadTransform(str(out / "transform.tfm"))
    for index in ((10, 20, 30), (28, 28, 28), (40, 12, 33)):
        x = np.asarray(deformed_pair.fixed.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(u[index[::-1]], np.asarray(full.TransformPoint(tuple(x))) - x,
                                   atol=1e-3)
    assert type(linear).__name__ != "CompositeTransform"
    registered = sitk.ReadImage(str(out / "registered.nii.gz"))
    expected = sitk.Resample(deformed_pair.moving, deformed_pair.fixed, full, sitk.sitkLinear,
                             float(sitk.GetArrayViewFromImage(deformed_pair.moving).min()))
    np.testing.assert_allclose(sitk.GetArrayFromImage(registered),
                               sitk.GetArrayFromImage(expected), atol=1e-2)


def test_deformable_works_on_any_descriptor_map() -> None:
    """The stage sees DescriptorMap objects only: 16-channel unit-ball maps at stride 4
    (DISA's layout) shifted by a known amount give that shift back."""
    from disa.registration.deformable.stage import deformable_stage

    image = ph.make_grid((64, 64, 64), (2.0, 2.0, 2.0)).reference_image()
    grid = Grid.from_image(image).strided(4)
    data = _map((grid.shape[0] + 8, grid.shape[1] + 8, grid.shape[2] + 8), 5, channels=16)
    fixed = DescriptorMap(np.ascontiguousarray(data[4:-4, 4:-4, 4:-4]), grid).quantised()
    # The same descriptors on a grid 8 mm further to -x: what the fixed map shows at x the
    # moving map shows at x - 8 mm, so v = (-8, 0, 0) mm (a uniform shift costs no diffusion).
    moving_grid = Grid(grid.shape, grid.origin + np.array([-8.0, 0.0, 0.0]), grid.spacing,
                       grid.direction)
    moving = DescriptorMap(np.ascontiguousarray(data[4:-4, 4:-4, 4:-4]), moving_grid).quantised()
    weights = np.ones(grid.shape, dtype=np.float32)
    linear = np.hstack([np.eye(3), np.zeros((3, 1))])
    stage = deformable_stage(fixed, moving, weights, linear, "dot", image, 2.0)
    inner = stage.field[3:-3, 3:-3, 3:-3]
    np.testing.assert_allclose(np.median(inner.reshape(-1, 3), axis=0), [-8.0, 0.0, 0.0],
                               atol=1.0)
    assert stage.min_corner_jacobian > 0


def _sinusoids(grid: Grid, shift_mm: np.ndarray) -> DescriptorMap:
    """16 smooth sinusoid channels (wavelengths 40-70 mm) of the physical point minus
    ``shift_mm`` on ``grid``: the same content moved by the shift."""
    rng = np.random.default_rng(9)
    k = rng.normal(size=(16, 3))
    k *= (2 * np.pi / rng.uniform(40.0, 70.0, 16) / np.linalg.norm(k, axis=1))[:, None]
    phase = rng.uniform(0, 2 * np.pi, 16)
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(float)
    values = 0.25 * np.cos((grid.to_physical(index) - shift_mm) @ k.T + phase)
    return DescriptorMap(np.ascontiguousarray(values.reshape(*grid.shape, 16), np.float32), grid)


def test_sub_cell_shift_on_a_shared_coarse_grid() -> None:
    """Fixed and moving maps on one 8 mm grid, content moved by 3 mm along x (so v = +3 mm):
    with the similarity integrated over each cell (sub-points, what the pipeline uses for
    DISA) the field comes within 1 mm of 3 mm; read at the nodes it snaps towards grid
    alignment (1.3 mm when this test was written, against 2.3 mm with sub-points)."""
    from disa.registration.deformable.stage import DeformableSettings, deformable_stage

    image = ph.make_grid((64, 64, 64), (2.0, 2.0, 2.0)).reference_image()
    grid = Grid.from_image(image).strided(4)
    fixed = _sinusoids(grid, np.zeros(3))
    moving = _sinusoids(grid, np.array([3.0, 0.0, 0.0]))
    weights = np.zeros(grid.shape, dtype=np.float32)
    weights[2:-2, 2:-2, 2:-2] = 1.0  # inner nodes: no point leaves the moving map
    linear = np.hstack([np.eye(3), np.zeros((3, 1))])
    error = {}
    for sub_points in (0, 8):
        stage = deformable_stage(fixed, moving, weights, linear, "dot", image, 2.0,
                                 DeformableSettings(sub_points=sub_points))
        error[sub_points] = abs(np.median(stage.field[4:-4, 4:-4, 4:-4, 0]) - 3.0)
    assert error[8] < 1.0
    assert error[0] > error[8] + 0.5


def test_sub_point_gather_and_scatter_are_adjoint() -> None:
    """d cost / d node = the transpose of the node -> sub-point interpolation."""
    from disa.registration.deformable.stage import (
        _point_coords,
        _scatter_to_nodes,
        similarity_points,
    )

    grid = Grid((6, 7, 8), np.zeros(3), np.full(3, 8.0), np.eye(3))
    f_map = DescriptorMap(np.random.default_rng(1).normal(size=(6, 7, 8, 4)).astype(np.float32),
                          grid)
    nodes = np.array([[1, 2, 3], [4, 5, 2], [7, 6, 5], [0, 0, 0]])
    sampled = similarity_points(nodes, np.zeros(3, dtype=int), grid, f_map, np.ones(4), 5)
    points, corners, weights, values = (sampled.positions, sampled.corners,
                                        sampled.corner_weights, sampled.fixed_values)
    assert np.allclose(weights.sum(axis=1), 1.0) and values.shape == (20, 4)
    rng = np.random.default_rng(2)
    field = rng.normal(size=(grid.shape[0] * grid.shape[1] * grid.shape[2], 3))
    a = rng.normal(size=(3, 3))
    coords = np.empty((1, len(points), 3))
    _point_coords(field, corners, weights, np.zeros((len(points), 3)), a, coords)
    g = rng.normal(size=(1, len(points), 3))
    back = np.zeros_like(field)
    _scatter_to_nodes(g, corners, weights, a, back)
    assert np.isclose(np.sum(g * coords), np.sum(back * field))
