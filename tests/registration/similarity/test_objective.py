"""The descriptor objective: analytic gradient, int8 codes, grid folding, point sampling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from disa.core.grid import Grid
from disa.registration.similarity.descriptor_map import DescriptorMap
from disa.registration.similarity.objective import (
    BARRIER,
    PRIOR_WEIGHT,
    DescriptorObjective,
    sample_points,
)
from disa.registration.transform.parametric import TransformModel


def _grid(shape: tuple[int, int, int], spacing: float, angle: float, origin: tuple) -> Grid:
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return Grid(shape, np.asarray(origin, float), np.full(3, spacing), direction)


def _smooth_unit_ball_map(grid: Grid, seed: int, channels: int = 16) -> DescriptorMap:
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=(*grid.shape, channels)), (1.5, 1.5, 1.5, 0))
    data /= np.maximum(np.linalg.norm(data, axis=-1, keepdims=True), 1.0) * 1.2
    return DescriptorMap(np.ascontiguousarray(data.astype(np.float32)), grid)


@pytest.fixture(scope="module")
def maps() -> tuple[DescriptorMap, DescriptorMap, np.ndarray]:
    fixed = _smooth_unit_ball_map(_grid((20, 22, 24), 4.0, 0.2, (-40.0, -45.0, -38.0)), 1)
    moving = _smooth_unit_ball_map(_grid((22, 20, 21), 4.5, -0.1, (-44.0, -40.0, -42.0)), 2)
    weights = np.random.default_rng(3).uniform(0.1, 1.0, fixed.grid.shape).astype(np.float32)
    return fixed, moving, weights


@pytest.mark.parametrize("mode", ["rigid", "affine"])
@pytest.mark.parametrize("kind", ["dot", "ssd"])
@pytest.mark.parametrize("int8", [False, True])
def test_gradient_matches_finite_differences(maps, mode: str, kind: str, int8: bool) -> None:
    fixed, moving, weights = maps
    if int8:
        fixed, moving = fixed.quantised(), moving.quantised()
    model = TransformModel(mode, np.array([2.0, -3.0, 1.0]))
    objective = DescriptorObjective(fixed, moving, weights, model, kind=kind, n_points=2000)
    theta = model.from_rigid(np.array([0.05, -0.04, 0.03, 1.7, -2.2, 0.9])) if mode == "affine" \
        else np.array([0.05, -0.04, 0.03, 1.7, -2.2, 0.9])
    _, grad = objective.cost_and_grad(theta[None, :])
    scales = model.scales(30.0)
    for k in range(model.n_params):
        step = np.zeros(model.n_params)
        step[k] = 1e-4 * scales[k]
        plus, minus = objective.cost(theta + step)[0], objective.cost(theta - step)[0]
        numeric = (plus - minus) / (2 * step[k])
        # Trilinear interpolation is piecewise smooth: a tiny step crosses few cell borders.
        assert numeric == pytest.approx(grad[0, k], rel=2e-3, abs=1e-6 / scales[k])


@pytest.mark.parametrize("kind", ["dot", "ssd"])
@pytest.mark.parametrize("shift_mm", [8.0, 70.0])
def test_normalised_gradient_matches_finite_differences(maps, kind: str,
                                                        shift_mm: float) -> None:
    """With a moving validity that cuts the overlap (a slab), the gradient of the
    normalised cost (mean over valid points, prior, and at 70 mm the barrier) is exact."""
    fixed, moving, weights = maps
    valid = np.zeros(moving.grid.shape, np.float32)
    valid[:, 4:15, :] = 1.0
    moving = moving.with_validity(valid)
    model = TransformModel("rigid", np.array([2.0, -3.0, 1.0]))
    objective = DescriptorObjective(fixed, moving, weights, model, kind=kind, n_points=2000)
    theta = np.array([0.05, -0.04, 0.03, shift_mm, -2.2, 0.9])
    overlap = objective.overlap(theta[None, :])
    assert 0.0 < overlap < 1.0
    if shift_mm > 50:
        assert overlap < objective.min_overlap  # the barrier's regime
    _, grad = objective.cost_and_grad(theta[None, :])
    scales = model.scales(30.0)
    for k in range(model.n_params):
        step = np.zeros(model.n_params)
        step[k] = 1e-4 * scales[k]
        numeric = (objective.cost(theta + step)[0] - objective.cost(theta - step)[0]) / (
            2 * step[k])
        assert numeric == pytest.approx(grad[0, k], rel=2e-3, abs=1e-6 / scales[k])


def test_a_slab_of_the_fixed_map_peaks_at_the_true_pose() -> None:
    """A moving slab cut from the fixed map, on the same physical grid: the normalised mean
    over the points that land in the slab peaks at the true pose."""
    grid = _grid((16, 18, 20), 4.0, 0.0, (0.0, 0.0, 0.0))
    fixed = _smooth_unit_ball_map(grid, 11)
    valid = np.zeros(grid.shape, np.float32)
    valid[5:11] = 1.0  # a slab of 6 planes along z
    moving = fixed.with_validity(valid)
    weights = np.ones(grid.shape, np.float32)
    model = TransformModel("rigid", grid.center)
    objective = DescriptorObjective(fixed, moving, weights, model, kind="dot",
                                    min_overlap=0.05)
    shifts = np.arange(-12.0, 12.5, 1.0)
    thetas = np.zeros((len(shifts), 6))
    thetas[:, 5] = shifts
    costs = objective.cost(thetas)
    assert shifts[np.argmin(costs)] == 0.0


def test_batched_costs_equal_single_costs(maps) -> None:
    fixed, moving, weights = maps
    model = TransformModel("rigid", np.zeros(3))
    objective = DescriptorObjective(fixed, moving, weights, model, n_points=3000)
    thetas = np.random.default_rng(4).normal(size=(7, 6)) * [0.1, 0.1, 0.1, 5, 5, 5]
    batched = objective.cost(thetas)
    single = np.array([objective.cost(t[None, :])[0] for t in thetas])
    np.testing.assert_allclose(batched, single, rtol=1e-9, atol=1e-12)
    assert objective.evaluations == 14


@pytest.mark.parametrize("jitter", [False, True])
def test_a_released_fixed_map_keeps_the_costs_and_holds_no_descriptors(maps,
                                                                        jitter: bool) -> None:
    """What the search's orientation bins rely on: the cost needs the fixed map's grid and
    the values read at construction, not the map."""
    fixed, moving, weights = maps
    model = TransformModel("rigid", np.zeros(3))
    objective = DescriptorObjective(fixed, moving, weights, model, n_points=2000, jitter=jitter)
    thetas = np.random.default_rng(5).normal(size=(6, 6)) * [0.1, 0.1, 0.1, 5, 5, 5]
    cost, grad = objective.cost_and_grad(thetas)
    objective.release_fixed_map()
    assert objective.fixed.data.strides[:3] == (0, 0, 0)  # a view of one zero vector
    assert objective.fixed.grid is fixed.grid and objective.fixed.scale == fixed.scale
    assert fixed.data.any()  # (the map itself is untouched)
    after_cost, after_grad = objective.cost_and_grad(thetas)
    np.testing.assert_array_equal(after_cost, cost)
    np.testing.assert_array_equal(after_grad, grad)


def test_int8_costs_stay_close_to_float_costs(maps) -> None:
    fixed, moving, weights = maps
    model = TransformModel("rigid", np.zeros(3))
    thetas = np.random.default_rng(5).normal(size=(20, 6)) * [0.1, 0.1, 0.1, 4, 4, 4]
    exact = DescriptorObjective(fixed, moving, weights, model).cost(thetas)
    coded = DescriptorObjective(fixed.quantised(), moving.quantised(), weights, model).cost(thetas)
    assert np.abs(exact - coded).max() < 0.01


def test_identical_maps_peak_at_the_identity_in_physical_space() -> None:
    """Same descriptors on two differently placed grids: the optimum is where grids coincide."""
    grid = _grid((16, 18, 20), 4.0, 0.3, (-30.0, -36.0, -32.0))
    fixed = _smooth_unit_ball_map(grid, 7)
    weights = np.ones(grid.shape, dtype=np.float32)
    model = TransformModel("rigid", grid.center)
    objective = DescriptorObjective(fixed, fixed, weights, model, kind="ssd")
    # A perfect match over the whole overlap: only the prior's pull towards chance is left.
    at_identity = objective.cost(model.identity()[None, :])[0]
    prior = PRIOR_WEIGHT * objective.chance_cost / (1 + PRIOR_WEIGHT)
    assert at_identity == pytest.approx(prior, rel=1e-6)
    assert objective.match_quality(at_identity) == pytest.approx(1 / (1 + PRIOR_WEIGHT))
    shifted = np.array([0, 0, 0, 2.0, 0, 0])
    assert objective.cost(shifted[None, :])[0] > at_identity + 1e-3


def test_a_pose_without_overlap_costs_chance_plus_the_barrier(maps) -> None:
    """No point lands on moving data: no similarity is counted, the prior leaves the chance
    cost, and the barrier refuses the pose (worse than chance by BARRIER contrasts)."""
    fixed, moving, weights = maps
    model = TransformModel("rigid", np.zeros(3))
    objective = DescriptorObjective(fixed, moving, weights, model)
    far = np.array([[0, 0, 0, 1000.0, 0, 0]])
    contrast = objective.chance_cost - objective.match_cost
    assert objective.cost(far)[0] == pytest.approx(objective.chance_cost + BARRIER * contrast)
    assert objective.overlap(far) == 0.0
    assert objective.overlap(model.identity()[None, :]) > 0.5


def test_sample_points_importance_sample_the_weights() -> None:
    weights = np.zeros((10, 10, 10), dtype=np.float32)
    weights[2, 3, 4] = 5.0
    weights[7, 1, 1] = 1.0
    points, w = sample_points(weights, None, np.random.default_rng(0))
    assert points.tolist() == [[4.0, 3.0, 2.0], [1.0, 1.0, 7.0]]  # (x, y, z)
    np.testing.assert_allclose(w, [5 / 6, 1 / 6], rtol=1e-6)
    dense = np.random.default_rng(1).uniform(0, 1, (20, 20, 20)).astype(np.float32)
    points, w = sample_points(dense, 500, np.random.default_rng(0))
    assert len(points) == 500 and len(np.unique(points, axis=0)) == 500
    # Drawn in proportion to the weight: the mean weight of the sample exceeds the average.
    sampled = dense[points[:, 2].astype(int), points[:, 1].astype(int), points[:, 0].astype(int)]
    assert sampled.mean() > dense.mean() + 0.1


def test_pooled_map_keeps_its_origin_and_halves_resolution(maps) -> None:
    fixed, _, _ = maps
    pooled = fixed.pooled()
    assert pooled.grid.shape == tuple(-(-n // 2) for n in fixed.grid.shape)
    np.testing.assert_allclose(pooled.grid.origin, fixed.grid.origin)
    np.testing.assert_allclose(pooled.grid.spacing, fixed.grid.spacing * 2)


def _sinusoid_map(grid: Grid, shift_mm: np.ndarray, seed: int = 5) -> DescriptorMap:
    """16 channels of smooth sinusoids (wavelengths 30-60 mm) of the physical point minus
    ``shift_mm``, sampled on ``grid``: a map of the same anatomy moved by the shift."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(16, 3))
    k *= (2 * np.pi / rng.uniform(30.0, 60.0, 16) / np.linalg.norm(k, axis=1))[:, None]
    phase = rng.uniform(0, 2 * np.pi, 16)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape[::-1]], indexing="ij"),
                   axis=-1).reshape(-1, 3).astype(float)
    points = grid.to_physical(idx) - shift_mm
    values = 0.25 * np.cos(points @ k.T + phase)  # (N, 16), norm <= 1
    data = values.reshape(*grid.shape[::-1], 16).transpose(2, 1, 0, 3)
    return DescriptorMap(np.ascontiguousarray(data.astype(np.float32)), grid)


def test_jittered_points_remove_the_grid_alignment_bias() -> None:
    """Shared 8 mm grids, truth a 3 mm shift along x: read at fixed nodes, the dot-product
    cost is piecewise linear with its kinks at grid alignment and snaps to 0 or 8 mm;
    jittered within the cells, its minimum lies at the true shift."""
    grid = Grid((14, 14, 14), np.full(3, -52.0), np.full(3, 8.0), np.eye(3))
    truth = np.array([3.0, 0.0, 0.0])
    fixed, moving = _sinusoid_map(grid, np.zeros(3)), _sinusoid_map(grid, truth)
    weights = np.zeros(grid.shape, dtype=np.float32)
    weights[3:-3, 3:-3, 3:-3] = 1.0  # inner points: every shift stays inside the moving map
    model = TransformModel("rigid", np.zeros(3))
    shifts = np.arange(-2.0, 10.01, 0.25)
    theta = np.zeros((len(shifts), 6))
    theta[:, 3] = shifts
    found = {}
    for jitter in (False, True):
        objective = DescriptorObjective(fixed, moving, weights, model, kind="dot",
                                        n_points=4096, jitter=jitter)
        found[jitter] = shifts[np.argmin(objective.cost(theta))]
    assert found[False] in (0.0, 8.0)
    assert abs(found[True] - truth[0]) <= 0.5


def test_affine_stage_keeps_the_rigid_stage_jitter() -> None:
    """The affine refinement of a jittered DISA rigid result samples the same way. Read
    at the nodes, the cost is piecewise linear between grid alignments and L-BFGS
    does not move from a rigid result 2 mm off; jittered, it reaches the 3 mm truth."""
    from disa.registration.pipeline import _affine_stage

    grid = Grid((14, 14, 14), np.full(3, -52.0), np.full(3, 8.0), np.eye(3))
    fixed = _sinusoid_map(grid, np.zeros(3))
    moving = _sinusoid_map(grid, np.array([3.0, 0.0, 0.0]))
    weights = np.zeros(grid.shape, dtype=np.float32)
    weights[3:-3, 3:-3, 3:-3] = 1.0
    rigid_model = TransformModel("rigid", np.zeros(3))
    rigid = DescriptorObjective(fixed, moving, weights, rigid_model, kind="dot", n_points=4096,
                                jitter=True)
    rigid_theta = np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0])
    affine_model = TransformModel("affine", np.zeros(3))
    theta, _ = _affine_stage("disa", affine_model, rigid_theta, rigid, 40.0, None, None, None)
    moved = affine_model.matrices(theta[None, :])[0][0] @ np.array([0.0, 0.0, 0.0, 1.0])
    assert abs(moved[0] - 3.0) <= 0.75 and np.all(np.abs(moved[1:]) <= 0.75)
