"""End-to-end accuracy on phantoms with known transforms (two contrasts of one anatomy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import CancelledError, InputError
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register
from disa.registration.similarity import spec as similarity_spec
from disa.registration.similarity.spec import Similarity
from disa.training import phantom as ph

from .conftest import tre


def _patch_mind(monkeypatch, **changes) -> Similarity:
    """MIND-SSC with ``changes`` (Similarity fields) for the rest of one test."""
    mind = dataclasses.replace(similarity_spec.similarity("mind"), **changes)
    monkeypatch.setitem(similarity_spec.SIMILARITIES, "mind", mind)
    return mind


def test_rigid_recovered_from_20mm_15deg_to_sub_millimetre(small_pair) -> None:
    options = RegistrationOptions(similarity="mind", init="geometry", starts=100,
                                  rotation_range=20, translation_range=30)
    result = register(small_pair.fixed, small_pair.moving, options)
    assert tre(result.transform, small_pair.truth) < 1.0
    assert result.confidence >= 0.5 and not result.ambiguous
    assert result.overlap > 0.9


def test_affine_recovered_to_sub_millimetre() -> None:
    truth = sitk.AffineTransform(3)
    r = ph.rigid_truth((10.0, -8.0, 9.0), (12.0, -11.0, 12.0))  # 20 mm, 16 degrees
    linear = np.asarray(r.GetMatrix()).reshape(3, 3) @ np.diag([1.08, 0.94, 1.03])
    linear[0, 1] += 0.04
    truth.SetMatrix(tuple(linear.ravel()))
    truth.SetTranslation(r.GetTranslation())
    grid = ph.make_grid((64, 64, 64), (3.0, 3.0, 3.0))
    pair = ph.make_pair(truth, fixed_grid=grid, moving_grid=grid, seed=3)
    options = RegistrationOptions(similarity="mind", mode="affine", init="geometry", starts=100,
                                  rotation_range=20, translation_range=30)
    result = register(pair.fixed, pair.moving, options)
    assert result.mode == "affine" and len(result.theta) == 12
    assert tre(result.transform, truth) < 1.0


def test_global_search_recovers_90mm_40deg(far_pair) -> None:
    options = RegistrationOptions(similarity="mind", init="geometry", starts=500,
                                  rotation_range=40, translation_range=100)
    result = register(far_pair.fixed, far_pair.moving, options)
    assert tre(result.transform, far_pair.truth) < 1.0
    assert result.starts == 500


def test_same_seed_same_result(small_pair) -> None:
    options = RegistrationOptions(similarity="mind", starts=40, seed=5)
    a = register(small_pair.fixed, small_pair.moving, options)
    b = register(small_pair.fixed, small_pair.moving, options)
    np.testing.assert_array_equal(a.theta, b.theta)


def test_lc2_local_refinement_recovers_a_small_offset() -> None:
    truth = ph.rigid_truth((4.0, -3.0, 3.0), (4.0, -3.0, 5.0))
    pair = ph.make_pair(truth, seed=4)
    options = RegistrationOptions(similarity="lc2", init="geometry")
    result = register(pair.fixed, pair.moving, options)
    assert result.similarity == "lc2" and result.starts == 1
    assert tre(result.transform, truth) < 1.5
    assert 0.0 < result.similarity_value <= 1.0


def test_masks_restrict_the_similarity(small_pair) -> None:
    mask = sitk.Cast(small_pair.fixed_labels > 0, sitk.sitkUInt8)
    options = RegistrationOptions(similarity="mind", init="geometry", starts=50,
                                  rotation_range=20, translation_range=30)
    result = register(small_pair.fixed, small_pair.moving, options, fixed_mask=mask,
                      moving_mask=sitk.Cast(small_pair.moving_labels > 0, sitk.sitkUInt8))
    assert tre(result.transform, small_pair.truth) < 1.5


def test_cancel_stops_the_search(small_pair) -> None:
    with pytest.raises(CancelledError):
        register(small_pair.fixed, small_pair.moving, RegistrationOptions(similarity="mind"),
                 cancel=lambda: True)


def test_progress_reports_stages_in_order(small_pair) -> None:
    stages: list[str] = []
    register(small_pair.fixed, small_pair.moving,
             RegistrationOptions(similarity="mind", starts=20),
             progress=lambda stage, fraction: stages.append(stage))
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order[:3] == ["preprocess", "descriptors", "search"]
    assert "reorient" in order


def test_converged_reorientation_pass_reuses_its_descriptors(small_pair, monkeypatch) -> None:
    """Once a re-orientation pass barely moves the pose, the final refinement runs on
    that pass's moving descriptors instead of extracting them again."""
    from disa.registration import pipeline

    events: list[tuple[str, object]] = []
    extract, refine = pipeline.descriptor_maps, pipeline.lbfgs_refine

    def counting_extract(*args, **kwargs):
        out = extract(*args, **kwargs)
        events.append(("extract", out[0]))
        return out

    def recording_refine(objective, *args, **kwargs):
        events.append(("refine", (objective.moving, objective.n_points)))
        return refine(objective, *args, **kwargs)

    monkeypatch.setattr(pipeline, "descriptor_maps", counting_extract)
    monkeypatch.setattr(pipeline, "lbfgs_refine", recording_refine)
    # (Without orientation bins, whose maps are extractions of the search, not of a pass;
    # room to converge before the cap: 4 passes may end at the cap here.)
    mind = _patch_mind(monkeypatch, oriented_search=False, reorient_passes=8)
    monkeypatch.setattr(pipeline, "MAX_RIVALS", 0)  # (only the winner's passes)
    options = RegistrationOptions(similarity="mind", init="geometry", starts=100,
                                  rotation_range=20, translation_range=30)
    result = register(small_pair.fixed, small_pair.moving, options)
    assert tre(result.transform, small_pair.truth) < 1.0
    refines = [value for kind, value in events if kind == "refine"]
    # Converged at pass p: p + 1 pass refinements and the final one on the same map.
    assert 2 <= len(refines) <= mind.reorient_passes
    (last_map, last_points), (previous_map, _) = refines[-1], refines[-2]
    assert last_points == pipeline.REFINE_POINTS
    assert last_map is previous_map and events[-2][0] == "refine"  # no extraction between
    # fixed + moving for the search, then one extraction per pass but the last
    assert sum(kind == "extract" for kind, _ in events) == 2 + len(refines) - 1


def _rigged_basin_run(small_pair, monkeypatch, penalty, apart_mm: float = 0.0
                      ) -> tuple[list, list, object]:
    """register() on the phantom with the re-oriented refinement's cost changed by
    ``penalty(call index, passes)`` and, from the second call on, its pose moved by
    ``apart_mm`` along x (the phantom's runners-up refine into the winner's basin; moved,
    each is a basin of its own); (search results, [(passes, pose, cost)], result)."""
    from disa.registration import pipeline

    searched: list = []
    outcomes: list[tuple[int | None, np.ndarray, float]] = []
    search, refine = pipeline.global_search, pipeline._reoriented_refinement

    def recording_search(*args, **kwargs):
        searched.append(search(*args, **kwargs))
        return searched[-1]

    def rigged_refine(theta, *args, **kwargs):
        refined, cost, objective = refine(theta, *args, **kwargs)
        if outcomes:
            refined = refined + np.r_[0.0, 0.0, 0.0, apart_mm * len(outcomes), 0.0, 0.0]
        cost = cost + penalty(len(outcomes), kwargs.get("passes"))
        outcomes.append((kwargs.get("passes"), refined, cost))
        return refined, cost, objective

    monkeypatch.setattr(pipeline, "global_search", recording_search)
    monkeypatch.setattr(pipeline, "_reoriented_refinement", rigged_refine)
    options = RegistrationOptions(similarity="mind", init="geometry", starts=60, top_k=6,
                                  rotation_range=30, translation_range=60)
    result = register(small_pair.fixed, small_pair.moving, options)
    assert searched[0].basins, "the phantom search should leave other basins"
    return searched, outcomes, result


def _screen_passes(runners: int) -> list[int]:
    """The screening passes of the first ``runners`` runners-up, best first."""
    from disa.registration import pipeline

    return [pipeline.SCREEN_PASSES if rank < pipeline.LATE_RIVALS_FROM
            else pipeline.LATE_SCREEN_PASSES for rank in range(runners)]


def test_runner_up_basins_are_refined_and_the_lowest_reoriented_cost_wins(
        small_pair, monkeypatch) -> None:
    """The search's best basin is refined on re-oriented maps; up to MAX_RIVALS other
    basins are screened with SCREEN_PASSES passes (LATE_SCREEN_PASSES from rank
    LATE_RIVALS_FROM on) and, when they come within the ambiguity
    margin, refined in full from the basin; the lowest re-oriented cost wins, whichever
    basin the search ranked first."""
    from disa.registration import pipeline

    # The first (the search's best) is made to look worst: every runner-up survives the
    # screen and one of them must win.
    monkeypatch.setattr(pipeline, "RIVAL_GAP", np.inf)
    searched, outcomes, result = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 1.0 if index == 0 else 0.0,
        apart_mm=20.0)
    runners = min(pipeline.MAX_RIVALS, len(searched[0].basins))
    assert [passes for passes, _, _ in outcomes] == (
        [None, *(step for screen in _screen_passes(runners) for step in (screen, None))])
    full = [i for i, (passes, _, _) in enumerate(outcomes) if passes is None]
    winner = min(full, key=lambda i: outcomes[i][2])
    assert winner != 0
    np.testing.assert_allclose(result.theta, outcomes[winner][1])


def test_late_runner_ups_are_screened_with_fewer_passes(small_pair, monkeypatch) -> None:
    """From rank LATE_RIVALS_FROM on a runner-up gets LATE_SCREEN_PASSES (the phantom
    leaves one runner-up, so the rank limit is moved to 0 here)."""
    from disa.registration import pipeline

    monkeypatch.setattr(pipeline, "LATE_RIVALS_FROM", 0)
    monkeypatch.setattr(pipeline, "RIVAL_GAP", np.inf)
    assert pipeline.LATE_SCREEN_PASSES != pipeline.SCREEN_PASSES
    searched, outcomes, _ = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 10.0 if passes is not None else 0.0)
    runners = min(pipeline.MAX_RIVALS, len(searched[0].basins))
    assert [passes for passes, _, _ in outcomes] == (
        [None] + [pipeline.LATE_SCREEN_PASSES] * runners)


def test_runner_up_screened_into_a_refined_basin_is_not_refined_again(
        small_pair, monkeypatch) -> None:
    """A runner-up that scores better after its screening but lands within the agreement
    tolerance of the winner's pose is the winner's basin: no full refinement, and the
    winner's pose stands."""
    from disa.registration import pipeline

    monkeypatch.setattr(pipeline, "RIVAL_GAP", np.inf)
    searched, outcomes, result = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 1.0 if index == 0 else 0.0)
    runners = min(pipeline.MAX_RIVALS, len(searched[0].basins))
    assert [passes for passes, _, _ in outcomes] == [None, *_screen_passes(runners)]
    np.testing.assert_allclose(result.theta, outcomes[0][1])
    # The re-oriented costs decide the ambiguity: the screening found no other basin.
    assert not result.ambiguous
    # Moved apart, the same screenings are refined in full (the test above).
    _, outcomes, _ = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 1.0 if index == 0 else 0.0,
        apart_mm=20.0)
    assert [passes for passes, _, _ in outcomes][:3] == [None, pipeline.SCREEN_PASSES, None]


def test_runner_ups_beyond_the_rival_gap_are_not_screened(small_pair, monkeypatch) -> None:
    """A runner-up of any rank whose search cost lies RIVAL_GAP of the search's contrast
    or more above the best is not screened at all."""
    from disa.registration import pipeline

    monkeypatch.setattr(pipeline, "RIVAL_GAP", np.inf)
    searched, _, _ = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 10.0 if passes is not None else 0.0)
    search = searched[0]
    gap = (search.basins[0].cost - search.cost) / search.contrast
    assert 0.0 <= gap < np.inf and search.contrast > 1e-9
    monkeypatch.setattr(pipeline, "RIVAL_GAP", gap * 0.99)
    _, outcomes, _ = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 10.0 if passes is not None else 0.0)
    assert [passes for passes, _, _ in outcomes] == [None]
    monkeypatch.setattr(pipeline, "RIVAL_GAP", gap * 1.01)
    _, outcomes, _ = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 10.0 if passes is not None else 0.0)
    assert [passes for passes, _, _ in outcomes][:2] == [None, pipeline.SCREEN_PASSES]


def test_runner_up_basins_that_screen_worse_are_not_refined_in_full(
        small_pair, monkeypatch) -> None:
    """A runner-up whose screened cost is far above the winner's costs SCREEN_PASSES
    passes only, and the search's best basin stands."""
    from disa.registration import pipeline

    searched, outcomes, result = _rigged_basin_run(
        small_pair, monkeypatch, lambda index, passes: 10.0 if passes is not None else 0.0)
    runners = min(pipeline.MAX_RIVALS, len(searched[0].basins))
    assert [passes for passes, _, _ in outcomes] == [None, *_screen_passes(runners)]
    np.testing.assert_allclose(result.theta, outcomes[0][1])
    assert tre(result.transform, small_pair.truth) < 1.5


def test_each_image_is_antialiased_once_per_registration(small_pair, monkeypatch) -> None:
    """The working-spacing Gaussian (2.6 s a 512 x 512 x 300 CT) runs once per input image:
    preparation, orientation bins and re-oriented refinement share the copy."""
    from disa.core import preprocess
    from disa.registration import pipeline

    calls: list[sitk.Image] = []
    real = preprocess.antialias

    def counting(image, spacing_mm):
        calls.append(image)
        return real(image, spacing_mm)

    monkeypatch.setattr(preprocess, "antialias", counting)
    monkeypatch.setattr(pipeline, "antialias", counting)
    result = register(small_pair.fixed, small_pair.moving, RegistrationOptions(
        similarity="mind", starts=60, rotation_range=30, translation_range=40))
    assert tre(result.transform, small_pair.truth) < 1.5
    assert len(calls) == 2
    assert {id(image) for image in calls} == {id(small_pair.fixed), id(small_pair.moving)}


def test_preparing_from_an_antialiased_copy_gives_the_same_grid(small_pair) -> None:
    """prepare(image, smoothed=antialias(image)) is prepare(image), value for value (the
    padding keeps the original image's minimum)."""
    from disa.core.preprocess import antialias
    from disa.registration import pipeline

    image = sitk.Cast(small_pair.moving, sitk.sitkFloat32) - 50.0
    direction = np.asarray(sitk.Euler3DTransform((0, 0, 0), 0.3, 0.1, 0.2).GetMatrix())
    plain = pipeline.prepare(image, 3.0, None, direction=direction.reshape(3, 3))
    shared = pipeline.prepare(image, 3.0, None, direction=direction.reshape(3, 3),
                              smoothed=antialias(image, 3.0))
    np.testing.assert_array_equal(plain.volume, shared.volume)
    np.testing.assert_array_equal(plain.mask, shared.mask)
    np.testing.assert_array_equal(plain.fov, shared.fov)
    corners = np.eye(3) * 5.0
    np.testing.assert_array_equal(plain.grid.to_physical(corners),
                                  shared.grid.to_physical(corners))


def test_constant_image_is_rejected(small_pair) -> None:
    flat = sitk.Image(small_pair.fixed.GetSize(), sitk.sitkFloat32) + 5.0
    flat.CopyInformation(small_pair.fixed)
    with pytest.raises(InputError, match="nothing to register"):
        register(flat, small_pair.moving, RegistrationOptions(similarity="mind"))


@pytest.mark.parametrize("mse, expected", [(None, "mind"), (0.05, "mind"), (0.008, "disa")])
def test_default_similarity_follows_the_model_cards_held_out_error(monkeypatch, tmp_path,
                                                                   mse, expected) -> None:
    from types import SimpleNamespace

    import disa.model.card as card
    from disa.registration.pipeline import resolve_similarity

    metrics = {} if mse is None else {"mse": mse}
    monkeypatch.setattr(card, "default_card_path", lambda: tmp_path / "disa.json")
    monkeypatch.setattr(card, "load_model_card",
                        lambda path, verify=True: SimpleNamespace(held_out_metrics=metrics))
    assert resolve_similarity(RegistrationOptions()) == expected
    assert resolve_similarity(RegistrationOptions(similarity="lc2")) == "lc2"
    monkeypatch.setattr(card, "default_card_path", lambda: None)
    assert resolve_similarity(RegistrationOptions()) == "mind"


def test_reoriented_passes_extract_only_the_region_the_fixed_image_maps_to(
        small_pair, monkeypatch) -> None:
    """Each re-orientation pass runs the descriptors on the moving region that the weighted
    fixed points map to (plus footprint and motion margins), not on the rotated box around
    the whole moving field of view; the answer stays as accurate."""
    from disa.core.preprocess import resample_to_spacing
    from disa.registration import pipeline

    shapes: list[tuple[int, ...]] = []
    extract = pipeline.descriptor_maps

    def recording_extract(image, *args, **kwargs):
        shapes.append(image.volume.shape)
        return extract(image, *args, **kwargs)

    monkeypatch.setattr(pipeline, "descriptor_maps", recording_extract)
    # (Without orientation bins, whose maps are the search's, not a pass's.)
    _patch_mind(monkeypatch, oriented_search=False)
    monkeypatch.setattr(pipeline, "MAX_RIVALS", 0)  # (only the winner's passes)
    options = RegistrationOptions(similarity="mind", init="geometry", starts=100,
                                  rotation_range=20, translation_range=30)
    result = register(small_pair.fixed, small_pair.moving, options)
    assert tre(result.transform, small_pair.truth) < 1.0
    rotation = result.matrix[:3, :3] @ np.asarray(small_pair.fixed.GetDirection()).reshape(3, 3)
    whole = resample_to_spacing(small_pair.moving, result.working_spacing_mm, direction=rotation)
    passes = shapes[2:]  # after the fixed and moving maps of the search
    assert passes and all(np.prod(s) < 0.6 * np.prod(whole.GetSize()) for s in passes)


def test_later_reoriented_passes_crop_to_the_previous_step(small_pair, monkeypatch) -> None:
    """The first pass of a re-oriented refinement leaves REORIENT_MOTION_MM of room around
    the mapped fixed points; a later pass leaves REORIENT_STEP_ROOM x the previous pass's
    step (at least a descriptor voxel), so its crop is smaller; the answer is as accurate
    as with the first pass's room on every pass."""
    from disa.registration import pipeline

    calls: list[tuple[float, int]] = []
    steps: list[float] = []
    describe, anderson = pipeline._Reorientation._describe_moving, pipeline._anderson_step

    def recording_describe(self, theta, motion_mm):
        out = describe(self, theta, motion_mm)
        calls.append((motion_mm, int(np.prod(out[0].grid.shape))))
        return out

    def recording_anderson(history, pose, step, *args):
        steps.append(float(np.abs(step).max()))
        return anderson(history, pose, step, *args)

    monkeypatch.setattr(pipeline._Reorientation, "_describe_moving", recording_describe)
    monkeypatch.setattr(pipeline, "_anderson_step", recording_anderson)
    _patch_mind(monkeypatch, oriented_search=False, reorient_passes=4)
    monkeypatch.setattr(pipeline, "MAX_RIVALS", 0)  # (only the winner's passes)
    options = RegistrationOptions(similarity="mind", init="geometry", starts=100,
                                  rotation_range=20, translation_range=30)
    tight = register(small_pair.fixed, small_pair.moving, options)
    descriptor_mm = tight.descriptor_spacing_mm
    assert len(calls) >= 2 and calls[0][0] == pipeline.REORIENT_MOTION_MM
    for (motion, voxels), step in zip(calls[1:], steps, strict=False):
        expected = min(pipeline.REORIENT_MOTION_MM,
                       max(pipeline.REORIENT_STEP_ROOM * step, descriptor_mm))
        assert motion == pytest.approx(expected)
        assert voxels < calls[0][1]  # less room, fewer voxels to describe
    calls.clear()
    monkeypatch.setattr(pipeline, "REORIENT_STEP_ROOM", 1e9)  # every pass the first's room
    roomy = register(small_pair.fixed, small_pair.moving, options)
    assert all(motion == pipeline.REORIENT_MOTION_MM for motion, _ in calls)
    assert tre(tight.transform, small_pair.truth) < 1.0
    assert tre(tight.transform, small_pair.truth) < tre(roomy.transform, small_pair.truth) + 0.2


def test_cropped_regrid_gives_the_uncropped_disa_descriptors() -> None:
    """The crop's margin covers the network's receptive field and its first voxel sits a
    whole stride into the uncropped grid: the descriptors inside the requested box are the
    ones the uncropped re-gridded image gives."""
    from disa.core.preprocess import antialias
    from disa.model.card import default_card_path
    from disa.registration import pipeline

    if default_card_path() is None:
        pytest.skip("no shipped DISA model")
    truth = ph.rigid_truth((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    image = ph.make_pair(truth, fixed_grid=ph.make_grid((60, 56, 52), (3.0, 3.0, 3.0)),
                         seed=4).fixed
    options = RegistrationOptions(similarity="disa")
    spacing = 2.0
    first = pipeline.prepare(image, spacing, None)
    axes = np.asarray(ph.rigid_truth((14.0, -9.0, 6.0), (0.0, 0.0, 0.0)).GetMatrix()).reshape(3, 3)
    smoothed = antialias(image, spacing)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in image.GetSize()])) @ axes
    inner = (centre - 20.0, centre + 24.0)  # the region the descriptors are wanted in (mm)
    margin = pipeline.descriptor_footprint_voxels("disa", options) * spacing
    whole = pipeline.regrid(smoothed, spacing, None, axes, (centre - 1e4, centre + 1e4), 4,
                            first.normalisation)
    crop = pipeline.regrid(smoothed, spacing, None, axes, (inner[0] - margin, inner[1] + margin),
                           4, first.normalisation)
    assert np.prod(crop.volume.shape) < 0.5 * np.prod(whole.volume.shape)
    whole_map, _, _ = pipeline.descriptor_maps(whole, "disa", options)
    crop_map, _, _ = pipeline.descriptor_maps(crop, "disa", options)
    # Descriptor voxels of the crop whose centres lie in the inner box, and the same
    # physical points in the uncropped map.
    z, y, x = np.meshgrid(*(np.arange(n) for n in crop_map.data.shape[:3]), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
    local = crop_map.grid.to_physical(index) @ axes
    inside = np.all((local >= inner[0]) & (local <= inner[1]), axis=1)
    assert inside.sum() > 50
    in_whole = np.rint(whole_map.grid.to_index(crop_map.grid.to_physical(index[inside])))
    np.testing.assert_allclose(in_whole, whole_map.grid.to_index(
        crop_map.grid.to_physical(index[inside])), atol=1e-6)  # the grids coincide
    w = in_whole.astype(int)
    expected = whole_map.data[w[:, 2], w[:, 1], w[:, 0]]
    got = crop_map.data.reshape(-1, crop_map.data.shape[-1])[inside]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_screened_runner_up_reuses_its_screening_passes(small_pair, monkeypatch) -> None:
    """A runner-up refined in full after its screening starts from the screening's first
    pass and re-gridded maps (the memo) and ends where a refinement without them ends."""
    from disa.registration import pipeline

    runs: list[dict] = []
    refine, describe = pipeline._reoriented_refinement, pipeline._Reorientation._describe_moving

    def counting_describe(self, theta, motion_mm):
        runs[-1]["describes"] += 1
        return describe(self, theta, motion_mm)

    def checked_refine(theta, *args, **kwargs):
        memo = kwargs.get("memo")
        reused = bool(memo)  # a full refinement after its screening
        runs.append({"passes": kwargs.get("passes"), "describes": 0, "reused": reused})
        outcome = refine(theta, *args, **kwargs)
        if reused:
            runs.append({"passes": None, "describes": 0, "reused": False, "check": True})
            fresh = refine(theta, *args, **{**kwargs, "memo": None})
            np.testing.assert_array_equal(outcome[0], fresh[0])
            assert outcome[1] == fresh[1]
        return outcome

    monkeypatch.setattr(pipeline._Reorientation, "_describe_moving", counting_describe)
    monkeypatch.setattr(pipeline, "_reoriented_refinement", checked_refine)
    # Every runner-up survives its screening: the first (the search's best) looks worst,
    # and each runner-up is moved to a basin of its own.
    monkeypatch.setattr(pipeline, "RIVAL_GAP", np.inf)
    _rigged_basin_run(small_pair, monkeypatch, lambda index, passes: 1.0 if index == 0 else 0.0,
                      apart_mm=20.0)
    reused = [i for i, run in enumerate(runs) if run["reused"]]
    assert reused, "every runner-up should have been refined in full after its screening"
    for i in reused:
        # The memo served the first pass's maps and the second pass's (the screening's
        # final pass re-gridded them from the same pose).
        assert runs[i]["describes"] == runs[i + 1]["describes"] - pipeline.SCREEN_PASSES
