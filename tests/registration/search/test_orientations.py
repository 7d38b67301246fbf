"""Orientation bins of the global search: bin rotations, the bins' grid axes, dispatch of
each pose to its bin, and that a bin's map scores a rotated truth better than the
unrotated map does (the reason the bins exist)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from disa.registration import pipeline
from disa.registration.options import RegistrationOptions
from disa.registration.search.orientations import (
    OrientedObjective,
    bin_directions,
    orientation_bins,
)
from disa.registration.transform.parametric import TransformModel, rigid_parameters
from disa.training import phantom as ph


def test_bins_are_the_identity_and_a_step_about_each_axis() -> None:
    bins = orientation_bins(40.0, step_deg=25.0)
    assert bins.shape == (7, 3, 3)
    assert np.allclose(bins[0], np.eye(3))
    angles = np.rad2deg(Rotation.from_matrix(bins).magnitude())
    assert np.allclose(angles[1:], 25.0)
    assert np.allclose(np.linalg.det(bins), 1.0)
    axes = np.abs(Rotation.from_matrix(bins[1:]).as_rotvec()).argmax(axis=1)
    assert sorted(axes.tolist()) == [0, 0, 1, 1, 2, 2]
    # A range within half a step needs no other bin (a refinement, a tracked probe).
    assert orientation_bins(10.0, step_deg=25.0).shape == (1, 3, 3)
    assert orientation_bins(0.0).shape == (1, 3, 3)


def test_bin_grids_turn_the_sampled_axes_onto_the_others_under_the_bin_rotation() -> None:
    rng = np.random.default_rng(3)
    d_a = Rotation.random(random_state=rng).as_matrix()
    d_b = Rotation.random(random_state=rng).as_matrix()
    bins = orientation_bins(40.0)
    directions = bin_directions(bins, d_a, d_b)
    base = d_b @ d_a.T  # the rotation at which the unrotated maps agree
    assert np.allclose(directions[0], d_a)
    for q, d in zip(bins, directions, strict=True):
        # Under the pose rotation R = Q R_0 the bin's descriptor axes land on b's.
        assert np.allclose(q @ base @ d, d_b, atol=1e-12)
        assert np.allclose(d.T @ d, np.eye(3), atol=1e-12)


class _Constant:
    """An objective whose cost is its bin index (and gradient the same in every entry)."""

    differentiable = True

    def __init__(self, k: int) -> None:
        self.k = k
        self.evaluations = 0

    def cost(self, theta: np.ndarray) -> np.ndarray:
        self.evaluations += len(theta)
        return np.full(len(theta), float(self.k))

    def cost_and_grad(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.cost(theta), np.full(theta.shape, float(self.k))


def test_each_pose_is_scored_by_the_bin_nearest_its_rotation_built_on_first_use() -> None:
    model = TransformModel("rigid", np.zeros(3))
    bins = orientation_bins(40.0)
    base = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    built: list[int] = []

    def build(k: int) -> _Constant:
        built.append(k)
        return _Constant(k)

    oriented = OrientedObjective(model, bins, base, build, [_Constant(0)] + [None] * 6)
    # Poses a few degrees from bins 0, 3 and 6 (relative to the base rotation).
    wobble = Rotation.from_euler("xyz", [4.0, -3.0, 5.0], degrees=True).as_matrix()
    thetas = np.array([rigid_parameters(np.block([[wobble @ bins[k] @ base, np.zeros((3, 1))],
                                                  [np.zeros((1, 3)), np.ones((1, 1))]]),
                                        model.center) for k in (0, 3, 6, 3)])
    cost, grad = oriented.cost_and_grad(thetas)
    assert cost.tolist() == [0.0, 3.0, 6.0, 3.0]
    assert np.array_equal(grad[:, 0], cost)
    assert sorted(built) == [3, 6]  # only the bins in use, each once
    assert oriented.built == 3
    assert oriented.evaluations == 4
    oriented.cost(thetas[:1])
    assert built == sorted(built) and len(built) == 2


@pytest.mark.parametrize("angle_deg", [25.0, -25.0])
def test_a_bins_map_scores_a_rotated_truth_better_than_the_unrotated_map(
        monkeypatch, angle_deg: float) -> None:
    """A phantom pair rotated by a bin's angle: at the true pose, the coarse, fine and
    refinement levels dispatch to that bin, and its map (the sampled image described on
    rotated axes) matches the other image better than the identity bin's map does."""
    truth = ph.rigid_truth((0.0, 0.0, angle_deg), (6.0, -4.0, 3.0))
    grid = ph.make_grid((48, 48, 48), (3.0, 3.0, 3.0))
    pair = ph.make_pair(truth, fixed_grid=grid, seed=2)
    captured: dict[str, object] = {}
    original = pipeline.global_search

    def spy(*args, **kwargs):
        captured["levels"], captured["model"] = args[:3], args[3]
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "global_search", spy)
    pipeline.register(pair.fixed, pair.moving, RegistrationOptions(similarity="mind", starts=64))
    model = captured["model"]
    assert isinstance(model, TransformModel)
    matrix = np.eye(4)
    rotation = np.asarray(truth.GetMatrix()).reshape(3, 3)
    center = np.asarray(truth.GetCenter())
    matrix[:3, :3] = rotation
    matrix[:3, 3] = np.asarray(truth.GetTranslation()) + center - rotation @ center
    theta = rigid_parameters(matrix, model.center)[None, :]
    expected = 6 if angle_deg > 0 else 5  # +-25 degrees about z
    for level in captured["levels"]:  # type: ignore[attr-defined]
        assert isinstance(level, OrientedObjective)
        k = int(level.bin_of(theta)[0])
        assert k == expected
        # (measured 0.20-0.31 against 0.62-0.86: the unrotated map compares
        # neighbourhoods 25 degrees apart.)
        assert level.cost(theta)[0] < 0.7 * level.objective(0).cost(theta)[0]
        # The bins keep their sample points' values, not their maps (a torso bin's map is
        # ~90 MB; oriented_levels says why).
        assert level.objective(k).fixed.data.strides[:3] == (0, 0, 0)
        assert level.objective(0).fixed.data.strides[:3] != (0, 0, 0)


def _anchors_of(monkeypatch, truth, seed: int = 2) -> tuple[np.ndarray, TransformModel]:
    """The initial poses (anchors) the global search receives on a phantom pair, and its
    model."""
    grid = ph.make_grid((48, 48, 48), (3.0, 3.0, 3.0))
    pair = ph.make_pair(truth, fixed_grid=grid, seed=seed)
    captured: dict[str, object] = {}
    original = pipeline.global_search

    def spy(*args, **kwargs):
        captured["model"], captured["anchors"] = args[3], args[4]
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "global_search", spy)
    pipeline.register(pair.fixed, pair.moving, RegistrationOptions(similarity="mind", starts=64))
    return np.atleast_2d(captured["anchors"]), captured["model"]  # type: ignore[return-value]


def test_the_translation_scan_puts_a_start_near_a_far_rotated_truth(monkeypatch) -> None:
    """A pose 25 degrees and ~40 mm from the header: among the search's initial poses, the
    scan's (the lowest costs of each bin, after the header anchors) include one that maps
    the phantom's points within a scan block (10 mm) of the truth, nearer than any header
    anchor; without the scan the anchors are the header poses only."""
    from disa.registration.search import translation_scan

    truth = ph.rigid_truth((0.0, 0.0, 25.0), (30.0, -20.0, 15.0))
    monkeypatch.setattr(translation_scan, "SCAN_MIN_STARTS", 64)  # (64 starts: a fast test)
    anchors, model = _anchors_of(monkeypatch, truth)
    with monkeypatch.context() as off:
        off.setattr(translation_scan, "SCAN_PER_BIN", 0)
        header_only, _ = _anchors_of(off, truth)
    assert len(anchors) > len(header_only)
    matrix = np.eye(4)
    rotation = np.asarray(truth.GetMatrix()).reshape(3, 3)
    center = np.asarray(truth.GetCenter())
    matrix[:3, :3] = rotation
    matrix[:3, 3] = np.asarray(truth.GetTranslation()) + center - rotation @ center
    points = center + np.random.default_rng(0).uniform(-40.0, 40.0, (200, 3))
    truth_points = points @ matrix[:3, :3].T + matrix[:3, 3]

    def error(theta: np.ndarray) -> float:
        m = model.matrices(theta[None, :])[0][0]
        return float(np.linalg.norm(points @ m[:, :3].T + m[:, 3] - truth_points, axis=1).mean())

    scanned = [error(t) for t in anchors[len(header_only):]]
    # (The header's centroid anchor has the translation but not the rotation: ~13 mm.)
    assert min(scanned) < min(10.0, min(error(t) for t in header_only))


def test_a_small_start_budget_runs_no_scan(monkeypatch) -> None:
    """Scanned poses are starts of their own: with a budget below SCAN_MIN_STARTS (one
    start, a local refinement) the search gets the header anchors only."""
    from disa.registration.search import translation_scan

    truth = ph.rigid_truth((0.0, 0.0, 25.0), (30.0, -20.0, 15.0))
    grid = ph.make_grid((48, 48, 48), (3.0, 3.0, 3.0))
    pair = ph.make_pair(truth, fixed_grid=grid, seed=2)
    seen: list[int] = []
    original = pipeline.global_search

    def spy(*args, **kwargs):
        seen.append(len(np.atleast_2d(args[4])))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "global_search", spy)
    budget = translation_scan.SCAN_MIN_STARTS
    for starts in (budget - 1, budget):
        result = pipeline.register(pair.fixed, pair.moving,
                                   RegistrationOptions(similarity="mind", starts=starts))
        assert "scan" in result.timings if starts == budget else "scan" not in result.timings
    assert seen[0] < seen[1]


def test_the_bins_grids_cover_the_sampled_foreground_not_the_air_around_it(
        monkeypatch) -> None:
    """Each turned bin's grid holds every foreground voxel of the sampled image at least the
    descriptor footprint inside it, and reaches no further than that margin (and a voxel
    or two of lattice) beyond the foreground: the air around it, which holds no weight and
    no sample point, is not described six more times."""
    from disa.registration.search import translation_scan

    truth = ph.rigid_truth((0.0, 0.0, 25.0), (6.0, -4.0, 3.0))
    pair = ph.make_pair(truth, fixed_grid=ph.make_grid((60, 60, 60), (3.0, 3.0, 3.0)), seed=2)
    monkeypatch.setattr(translation_scan, "SCAN_MIN_STARTS", 64)  # (the scan builds every bin)
    captured: dict[str, object] = {"grids": []}
    oriented, regrid = pipeline.oriented_levels, pipeline.regrid

    def levels_spy(*args, **kwargs):
        captured["a_p"] = args[2]
        return oriented(*args, **kwargs)

    def regrid_spy(*args, **kwargs):
        prepared = regrid(*args, **kwargs)
        captured["grids"].append(prepared.grid)  # type: ignore[attr-defined]
        return prepared

    monkeypatch.setattr(pipeline, "oriented_levels", levels_spy)
    monkeypatch.setattr(pipeline, "regrid", regrid_spy)
    options = RegistrationOptions(similarity="mind", starts=64, mode="rigid")
    pipeline.register(pair.fixed, pair.moving, options)
    a_p = captured["a_p"]
    spacing = float(a_p.grid.spacing[0])  # type: ignore[attr-defined]
    margin = (pipeline.descriptor_footprint_voxels("mind", options) + 1) * spacing
    foreground = a_p.grid.to_physical(  # type: ignore[attr-defined]
        np.argwhere(a_p.mask & a_p.fov)[:, ::-1].astype(float))  # type: ignore[attr-defined]
    data = a_p.grid.to_physical(  # type: ignore[attr-defined]
        np.argwhere(a_p.fov)[:, ::-1].astype(float))  # type: ignore[attr-defined]
    bins = [g for g in captured["grids"]  # type: ignore[attr-defined]
            if not np.allclose(g.direction, a_p.grid.direction)][:6]  # type: ignore[attr-defined]
    assert len(bins) == 6
    for grid in bins:
        corners = grid.to_physical(np.array([[0.0, 0.0, 0.0], np.array(grid.shape[::-1]) - 1.0]))
        low, high = np.sort(corners @ grid.direction, axis=0)
        inside = foreground @ grid.direction
        assert np.all(inside.min(axis=0) - low >= margin - 1e-6 - spacing)
        assert np.all(high - inside.max(axis=0) >= margin - 1e-6 - spacing)
        assert np.all(inside.min(axis=0) - low <= margin + 2 * spacing)
        assert np.all(high - inside.max(axis=0) <= margin + 2 * spacing)
        # (the data region, the whole box here, reaches further on some side)
        reach = data @ grid.direction
        assert np.any(reach.min(axis=0) < low) or np.any(reach.max(axis=0) > high)
