"""Global search pieces: starts, batched Adam, L-BFGS, confidence assessment."""

from __future__ import annotations

import numpy as np
import pytest

from disa.registration.search.global_search import (
    RefinedSolution,
    SearchSettings,
    adam_steps,
    assess,
    draw_starts,
    global_search,
    lbfgs_refine,
    rivals,
)
from disa.registration.transform.parametric import TransformModel


class Counted:
    """The Objective protocol's bookkeeping: evaluation count and cost from cost_and_grad."""

    differentiable = True
    evaluations = 0

    def cost(self, theta: np.ndarray) -> np.ndarray:
        return self.cost_and_grad(theta)[0]

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class Quadratic(Counted):
    """cost = ||theta - target||^2 (scaled), a stand-in objective with a known optimum."""

    def __init__(self, model: TransformModel, target: np.ndarray) -> None:
        self.model = model
        self.target = target

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = np.atleast_2d(theta)
        self.evaluations += len(theta)
        d = (theta - self.target) * [100, 100, 100, 1, 1, 1]
        return np.sum(d * d, axis=1), 2 * d * [100, 100, 100, 1, 1, 1]


def test_starts_are_deterministic_and_within_the_ranges() -> None:
    model = TransformModel("rigid", np.zeros(3))
    settings = SearchSettings(starts=300, rotation_range_deg=30)
    init = np.array([0.1, 0, 0, 5, 0, 0])
    a = draw_starts(model, init, settings, np.random.default_rng(1), np.array([50.0]))
    b = draw_starts(model, init, settings, np.random.default_rng(1), np.array([50.0]))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], init)
    assert a.shape == (300, 6)
    assert np.abs(a[:, :3] - init[:3]).max() <= np.deg2rad(30)
    assert np.abs(a[:, 3:] - init[3:]).max() <= 50
    # The ranges are explored, not just the centre.
    assert np.abs(a[:, 3:] - init[3:]).max() > 45


def test_starts_are_shared_among_initial_poses_with_their_own_spreads() -> None:
    """Several initial poses (header, centroids, placements): each is a start itself, gets
    its share of the others and its own translation spread."""
    model = TransformModel("rigid", np.zeros(3))
    anchors = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 200.0, 0, 0], [0, 0, 0, 0, 300.0, 0]])
    starts = draw_starts(model, anchors, SearchSettings(starts=403, rotation_range_deg=10),
                         np.random.default_rng(2), np.array([50.0, 10.0, 10.0]),
                         np.array([0.5, 0.25, 0.25]))
    np.testing.assert_array_equal(starts[:3], anchors)
    near = [np.abs(starts[:, 3:] - a[3:]).max(axis=1) <= s
            for a, s in zip(anchors, (50.0, 10.0, 10.0), strict=True)]
    assert np.all(near[0] | near[1] | near[2])
    assert [int(n.sum()) for n in near] == [201, 101, 101]


def test_affine_starts_are_rotated_copies_of_the_initial_matrix() -> None:
    model = TransformModel("affine", np.zeros(3))
    starts = draw_starts(model, model.identity(), SearchSettings(starts=10),
                         np.random.default_rng(0))
    for s in starts:
        m = s[:9].reshape(3, 3)
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)


def test_adam_and_lbfgs_reach_the_optimum() -> None:
    model = TransformModel("rigid", np.zeros(3))
    target = np.array([0.1, -0.05, 0.2, 10.0, -4.0, 3.0])
    objective = Quadratic(model, target)
    scales = model.scales(50.0)
    starts = np.zeros((4, 6))
    theta, cost = adam_steps(objective, starts, scales, 60, 5.0, 0.1)
    assert cost.max() < objective.cost(starts).min()
    refined, final = lbfgs_refine(objective, theta[0], scales, 100, step_tolerance_mm=0.0)
    np.testing.assert_allclose(refined, target, atol=1e-5)
    assert final < 1e-8


def test_lbfgs_stops_on_small_steps_near_the_optimum() -> None:
    """The rigid model's step tolerance (mm of displacement) ends the run early, close
    to the optimum in mm, with fewer evaluations than running to scipy's own tolerances."""
    model = TransformModel("rigid", np.zeros(3))
    target = np.array([0.1, -0.05, 0.2, 10.0, -4.0, 3.0])
    scales = model.scales(50.0)
    start = np.array([0.3, 0.1, -0.1, 30.0, 10.0, -20.0])
    exact, tolerant = Quadratic(model, target), Quadratic(model, target)
    lbfgs_refine(exact, start, scales, 100, step_tolerance_mm=0.0)
    refined, _ = lbfgs_refine(tolerant, start, scales, 100,
                              step_tolerance_mm=model.step_tolerance_mm)
    assert np.abs((refined - target) / scales).max() < 0.05  # mm at the sample radius
    assert tolerant.evaluations < exact.evaluations


def test_assess_counts_agreement_and_flags_ambiguity() -> None:
    model = TransformModel("rigid", np.zeros(3))
    points = np.random.default_rng(0).normal(size=(100, 3)) * 40
    best = RefinedSolution(np.zeros(6), -1.0, 0)
    near = RefinedSolution(np.array([0, 0, 0, 1.0, 0, 0]), -0.99, 1)
    far_bad = RefinedSolution(np.array([0, 0, 0, 40.0, 0, 0]), -0.2, 2)
    far_good = RefinedSolution(np.array([0, 0, 0, -40.0, 0, 0]), -0.99, 3)
    settings = SearchSettings(agree_tolerance_mm=5.0, ambiguity_margin=0.05)
    assert assess(model, [best, near, far_bad], points, settings, contrast=1.0) == (2, 2 / 3,
                                                                                   False)
    agreeing, confidence, ambiguous = assess(model, [best, near, far_bad, far_good], points,
                                             settings, contrast=1.0)
    assert (agreeing, confidence, ambiguous) == (2, 0.5, True)


def test_rivals_are_the_close_scoring_other_basins_one_each() -> None:
    model = TransformModel("rigid", np.zeros(3))
    points = np.random.default_rng(0).normal(size=(100, 3)) * 40
    best = RefinedSolution(np.zeros(6), -1.0, 0)
    near = RefinedSolution(np.array([0, 0, 0, 1.0, 0, 0]), -0.999, 1)  # the same answer
    other = RefinedSolution(np.array([0, 0, 0, -40.0, 0, 0]), -0.99, 2)
    other_again = RefinedSolution(np.array([0, 0, 0, -41.0, 0, 0]), -0.985, 3)
    third = RefinedSolution(np.array([0, 0, 0, 0, 30.0, 0]), -0.98, 4)
    far_bad = RefinedSolution(np.array([0, 0, 0, 40.0, 0, 0]), -0.2, 5)
    settings = SearchSettings(agree_tolerance_mm=5.0, ambiguity_margin=0.05)
    found = rivals(model, [best, near, other, other_again, third, far_bad], points, settings,
                   contrast=1.0)
    assert [s.start_index for s in found] == [2, 4]
    assert rivals(model, [best, near, far_bad], points, settings, contrast=1.0) == []
    # The runners-up: every other basin, one each, whatever its cost.
    basins = rivals(model, [best, near, other, other_again, third, far_bad], points,
                    settings, contrast=1.0, within_margin=False)
    assert [s.start_index for s in basins] == [2, 4, 5]


class TwoBasins(Counted):
    """Two clipped Quadratic basins: a decoy at ``decoy`` with depth ``decoy_depth`` and
    the true one at ``target`` with depth ``target_depth`` (lower cost wins)."""

    def __init__(self, target: np.ndarray, decoy: np.ndarray, target_depth: float,
                 decoy_depth: float) -> None:
        model = TransformModel("rigid", np.zeros(3))
        self.basins = [(Quadratic(model, target), target_depth),
                       (Quadratic(model, decoy), decoy_depth)]

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = np.atleast_2d(theta)
        self.evaluations += len(theta)
        costs, grads = [], []
        for basin, depth in self.basins:
            cost, grad = basin.cost_and_grad(theta)
            inside = cost < 400.0  # flat beyond the basin's rim
            costs.append(np.where(inside, cost, 400.0) - depth)
            grads.append(np.where(inside[:, None], grad, 0.0))
        pick = np.argmin(costs, axis=0)
        rows = np.arange(len(theta))
        return np.array(costs)[pick, rows], np.array(grads)[pick, rows]


def test_global_search_keeps_the_initial_pose_to_the_refinement() -> None:
    """At the coarse level the decoy looks deeper and attracts every random start; at
    full resolution the basin around the initial pose is the deeper one. The initial
    pose must survive the cuts, so the search returns it rather than the decoy."""
    model = TransformModel("rigid", np.zeros(3))
    init = np.array([0.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    target = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    decoy = np.array([0.0, 0.0, 0.0, 40.0, 10.0, 0.0])
    coarse = TwoBasins(target, decoy, target_depth=100.0, decoy_depth=300.0)
    fine = TwoBasins(target, decoy, target_depth=100.0, decoy_depth=300.0)
    refine = TwoBasins(target, decoy, target_depth=500.0, decoy_depth=300.0)
    settings = SearchSettings(starts=200, rotation_range_deg=0.0, top_k=2, seed=3)
    result = global_search(coarse, fine, refine, model, init, settings, radius_mm=50.0,
                           coarse_spacing_mm=4.0, fine_spacing_mm=2.0,
                           check_points=np.zeros((1, 3)), spreads_mm=np.array([60.0]))
    np.testing.assert_allclose(result.theta, target, atol=1e-3)
    assert any(s.start_index == 0 for s in result.solutions)


def test_last_coarse_cut_ranks_on_the_fine_objective() -> None:
    """The pooled maps can rank a wrong basin first while full resolution ranks the true
    one first (a thin T2 slab: coarse 1.12 wrong against 1.23 true, fine 1.65 against
    1.45). Both basins' starts survive the first round here; the last coarse cut must keep
    the true basin's by their fine cost, and ranking on the coarse cost loses it."""
    model = TransformModel("rigid", np.zeros(3))
    init = np.array([0.0, 0.0, 0.0, 10.0, 0.0, 0.0])  # inside the decoy's basin
    target = np.array([0.0, 0.0, 0.0, -15.0, 0.0, 0.0])
    decoy = np.array([0.0, 0.0, 0.0, 15.0, 0.0, 0.0])

    def search(fine_ranked_cut: bool) -> np.ndarray:
        coarse = TwoBasins(target, decoy, target_depth=100.0, decoy_depth=300.0)
        fine = TwoBasins(target, decoy, target_depth=500.0, decoy_depth=300.0)
        refine = TwoBasins(target, decoy, target_depth=500.0, decoy_depth=300.0)
        settings = SearchSettings(starts=200, rotation_range_deg=0.0, top_k=2, seed=3,
                                  coarse_rounds=((8, 1.0), (12, 0.25)),
                                  fine_ranked_cut=fine_ranked_cut)
        return global_search(coarse, fine, refine, model, init, settings, radius_mm=50.0,
                             coarse_spacing_mm=4.0, fine_spacing_mm=2.0,
                             check_points=np.zeros((1, 3)), spreads_mm=np.array([20.0])).theta

    np.testing.assert_allclose(search(True), target, atol=1e-3)
    np.testing.assert_allclose(search(False), decoy, atol=1e-3)


class Recorded(Quadratic):
    """A Quadratic that keeps every batch of poses it was asked for."""

    def __init__(self, model: TransformModel, target: np.ndarray) -> None:
        super().__init__(model, target)
        self.calls: list[np.ndarray] = []

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(np.atleast_2d(theta).copy())
        return super().cost_and_grad(theta)


def test_a_placed_start_takes_shorter_coarse_steps() -> None:
    """A placed anchor (a scanned pose) takes coarse steps placed_step_fraction
    as long as the random starts': Adam's first step moves each coordinate by exactly
    its step length (mm at the sample radius)."""
    model = TransformModel("rigid", np.zeros(3))
    target = np.array([0.1, -0.1, 0.2, 30.0, -20.0, 10.0])
    anchors = np.array([np.zeros(6), [0.05, 0.0, 0.0, 5.0, 5.0, 5.0]])
    coarse = Recorded(model, target)
    settings = SearchSettings(starts=40, rotation_range_deg=10.0, top_k=2, seed=1)
    global_search(coarse, Quadratic(model, target), Quadratic(model, target), model, anchors,
                  settings, radius_mm=50.0, coarse_spacing_mm=4.0, fine_spacing_mm=2.0,
                  check_points=np.zeros((1, 3)), spreads_mm=np.array([30.0, 0.0]),
                  placed=np.array([False, True]))
    scales = model.scales(50.0)
    first, second = coarse.calls[1], coarse.calls[2]  # (calls[0]: the starts' costs)
    step = np.abs(second - first) / scales
    long_step = settings.coarse_step_spacings * 4.0
    np.testing.assert_allclose(step[0], long_step, rtol=1e-6)
    np.testing.assert_allclose(step[1], settings.placed_step_fraction * long_step, rtol=1e-6)
    np.testing.assert_allclose(step[2:], long_step, rtol=1e-6)


class Offset(Quadratic):
    """A Quadratic whose costs all lie ``offset`` lower (the pooled coarse maps' costs run
    lower than the fine level's)."""

    def __init__(self, model: TransformModel, target: np.ndarray, offset: float) -> None:
        super().__init__(model, target)
        self.offset = offset

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cost, grad = super().cost_and_grad(theta)
        return cost - self.offset, grad


def test_contrast_measures_the_starts_on_the_fine_level() -> None:
    """The contrast compares the starts' fine-level costs with the best fine cost: a coarse
    level whose costs run far lower (the pooled maps) does not shrink it to nothing."""
    model = TransformModel("rigid", np.zeros(3))
    target = np.array([0.0, 0.0, 0.0, 10.0, 0.0, 0.0])
    settings = SearchSettings(starts=128, rotation_range_deg=0.0, top_k=2, seed=2)
    result = global_search(Offset(model, target, 1e6), Quadratic(model, target),
                           Quadratic(model, target), model, np.zeros(6), settings,
                           radius_mm=50.0, coarse_spacing_mm=4.0, fine_spacing_mm=2.0,
                           check_points=np.zeros((1, 3)), spreads_mm=np.array([30.0]))
    starts = draw_starts(model, np.zeros((1, 6)), settings, np.random.default_rng(2),
                         np.array([30.0]))
    expected = np.median(Quadratic(model, target).cost(starts[::2])) - result.cost
    assert expected > 1.0
    assert result.contrast == pytest.approx(expected)


class Cone(Counted):
    """cost = distance (mm) of the translation from ``target`` minus ``depth`` inside
    ``radius_mm`` of it, 0 beyond (flat: no gradient) unless ``radius_mm`` is None; the
    stand-in for a similarity whose basin is wide on the coarse grid, narrow on the fine."""

    def __init__(self, target: np.ndarray, radius_mm: float | None) -> None:
        self.target = target
        self.radius_mm = radius_mm

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = np.atleast_2d(theta)
        self.evaluations += len(theta)
        d = theta[:, 3:] - self.target[3:]
        dist = np.linalg.norm(d, axis=1)
        grad = np.zeros_like(theta)
        grad[:, 3:] = d / np.maximum(dist, 1e-9)[:, None]
        if self.radius_mm is None:
            return dist, grad
        inside = dist < self.radius_mm
        return np.where(inside, dist - self.radius_mm, 0.0), grad * inside[:, None]


def test_coarse_stage_reaches_a_basin_45_mm_away() -> None:
    """Starts 30-60 mm from a torso CT-MR pose stalled short of its basin when the first
    coarse step was one coarse spacing (20 Adam steps travel about 30 mm). A start 45 mm
    off the truth on a coarse-level slope must end inside the fine level's 8 mm basin."""
    model = TransformModel("rigid", np.zeros(3))
    target = np.zeros(6)
    init = np.array([0.0, 0.0, 0.0, 45.0, 0.0, 0.0])
    settings = SearchSettings(starts=1, rotation_range_deg=0.0, top_k=1)
    result = global_search(Cone(target, None), Cone(target, 8.0), Cone(target, 8.0), model,
                           init, settings, radius_mm=50.0, coarse_spacing_mm=4.0,
                           fine_spacing_mm=2.0, check_points=np.zeros((1, 3)),
                           spreads_mm=np.array([0.0]))
    assert np.linalg.norm(result.theta[3:]) < 1.0
