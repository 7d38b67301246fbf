"""Fields of view: data regions, the overlap-normalised search on partial views, the
sampled image's choice, the initial transform, and the verdict."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.registration import pipeline
from disa.registration.fov import data_region, regions_on_grid
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register
from disa.registration.search.verdict import Evidence, verdict
from disa.training import phantom as ph

TRUTH = ph.rigid_truth((12.0, -10.0, 11.0), (18.0, -15.0, 17.0))  # ~20 deg, ~29 mm


@pytest.fixture(scope="module")
def pair() -> ph.PhantomPair:
    grid = ph.make_grid((64, 64, 64), (3.0, 3.0, 3.0))
    return ph.make_pair(TRUTH, fixed_grid=grid, seed=4)


def _crop(image: sitk.Image, low: float, high: float) -> sitk.Image:
    """The part of ``image`` between fractions ``low`` and ``high`` of each axis (its own
    voxels and physical positions: a smaller field of view of the same scan)."""
    size = np.array(image.GetSize())
    start = (size * low).astype(int)
    return sitk.RegionOfInterest(image, [int(v) for v in (size * high).astype(int) - start],
                                 [int(v) for v in start])


def _sector(image: sitk.Image, half_angle_deg: float = 30.0) -> sitk.Image:
    """``image`` zeroed outside a cone whose apex sits on the top face (an ultrasound fan)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    nz, ny, nx = array.shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    depth = z + 1.0
    radius = np.hypot(y - ny / 2, x - nx / 2)
    inside = radius <= depth * np.tan(np.deg2rad(half_angle_deg))
    array = np.where(inside, array - array.min() + 1.0, 0.0).astype(np.float32)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _tre(result, pair: ph.PhantomPair, fixed: sitk.Image) -> float:
    points = ph.grid_points(ph.make_grid((8, 8, 8), (12.0, 12.0, 12.0)))
    return ph.target_registration_error(result.transform, TRUTH, points)


def test_padding_that_ends_in_a_cut_is_not_data(pair) -> None:
    """A fan (zeros outside, speckle inside) has padding; a phantom whose exact-zero
    background fades into its skin does not; a constant image is not 'all padding'."""
    fan = data_region(_sector(pair.moving))
    assert fan.has_padding and 0.3 < fan.padding_fraction < 0.9
    mask = sitk.GetArrayFromImage(fan.mask).astype(bool)
    assert mask[-1, 32, 32] and not mask[-1, 0, 0] and not mask[0, 5, 5]
    # A fan whose deeper 60 % lies in an acoustic shadow (behind a lung or bone boundary)
    # is dark along most of its edge and still a fan.
    shadowed = sitk.GetArrayFromImage(_sector(pair.moving))
    shadowed[int(0.4 * shadowed.shape[0]):] *= 0.01
    shadowed_image = sitk.GetImageFromArray(shadowed)
    shadowed_image.CopyInformation(pair.moving)
    assert data_region(shadowed_image).padding_fraction == pytest.approx(fan.padding_fraction)
    smooth = sitk.SmoothingRecursiveGaussian(pair.fixed - float(
        sitk.GetArrayViewFromImage(pair.fixed).min()), 6.0)
    array = sitk.GetArrayFromImage(smooth)
    array = np.maximum(array - np.percentile(array, 30), 0.0)  # exact zeros, faded edge
    template = sitk.GetImageFromArray(array)
    template.CopyInformation(pair.fixed)
    assert not data_region(template).has_padding
    constant = sitk.Image(pair.fixed.GetSize(), sitk.sitkFloat32) + 3.0
    assert not data_region(constant).has_padding


@pytest.mark.parametrize("similarity", ["mind", "disa", "lc2"])
def test_a_cropped_moving_view_registers_from_30_mm_and_20_degrees(pair, similarity) -> None:
    """The moving image sees 40 % of the anatomy per axis: it provides the sample points,
    the result is inverted back to fixed -> moving, and it lands on the truth."""
    moving = _crop(pair.moving, 0.25, 0.65)
    options = RegistrationOptions(similarity=similarity, starts=200)
    result = register(pair.fixed, moving, options)
    assert result.sampled == "moving"
    # DISA's optimum lies several mm from the truth with the shipped network (issue 20,
    # benchmarks/README.md "Where the optimum lies"): converged, not sub-millimetre.
    # LC2 (a local optimiser on intensities at the 3 mm working spacing): within a
    # voxel (1.6 mm measured), not sub-millimetre.
    limit = {"mind": 1.0, "disa": 10.0, "lc2": 2.0}[similarity]
    assert _tre(result, pair, pair.fixed) < limit
    assert result.overlap > 0.9


def test_a_deformable_run_on_a_cropped_moving_view_finds_its_linear_part(
        pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deformable stage samples the fixed image (its field lives there); its linear
    part comes from the rigid search that samples the smaller moving view, then the fixed
    points that pose maps inside the moving data carry the deformable stage."""
    moving = _crop(pair.moving, 0.25, 0.65)
    options = RegistrationOptions(similarity="mind", mode="deformable", starts=200)
    prepared: list[str | None] = []
    real_prepare = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: prepared.append(k.get("role"))
                        or real_prepare(*a, **k))
    smoothed: list[int] = []
    real_antialias = pipeline.antialias
    monkeypatch.setattr(pipeline, "antialias", lambda image, spacing: smoothed.append(
        id(image)) or real_antialias(image, spacing))
    result = register(pair.fixed, moving, options)
    assert result.sampled == "moving" and result.mode == "deformable"
    # The rigid run takes over the images that decided the path (the same inputs); only
    # the refinement, with its overlap mask and the rigid pose's axes, prepares its own,
    # from the same antialiased copies: each input is smoothed once for both runs.
    assert prepared == ["fixed", "moving", "fixed", "moving"]
    assert sorted(smoothed) == sorted([id(pair.fixed), id(moving)])
    # (The rigid run: 0.44 mm; the deformable run sampling the fixed image throughout:
    # 1.83 mm here, 40-78 mm on realistic slabs and torso crops.)
    assert _tre(result, pair, pair.fixed) < 1.5
    assert result.field_transform is not None
    assert "linear_search" in result.timings and "deformable" in result.timings
    # The search's evidence is the rigid run's: the refinement alone has none.
    assert result.starts > 1 and result.refined >= 1
    # From a known pose (a tracked probe, an earlier result) with zero ranges: the same
    # path, the rigid stage refined only.
    again = register(pair.fixed, moving, options.model_copy(
        update={"rotation_range": 0.0, "translation_range": 0.0}),
        initial_transform=result.transform)
    assert again.sampled == "moving" and again.starts == 1
    assert _tre(again, pair, pair.fixed) < 1.5


def test_a_rigid_plus_probe_run_on_a_moving_fan_finds_its_pose(pair) -> None:
    """rigid+probe samples the fixed image too: on a smaller moving view its pose comes
    from the rigid search that samples the view, then the probe's compression is refined
    from there on the fixed points inside the view."""
    fan = _sector(pair.moving, 35.0)
    options = RegistrationOptions(similarity="mind", mode="rigid+probe", starts=200)
    result = register(pair.fixed, fan, options)
    assert result.sampled == "moving" and result.mode == "rigid+probe"
    assert result.probe is not None and "linear_search" in result.timings
    assert _tre(result, pair, pair.fixed) < 2.0


def test_a_cropped_fixed_view_registers_too(pair) -> None:
    fixed = _crop(pair.fixed, 0.3, 0.75)
    result = register(fixed, pair.moving, RegistrationOptions(similarity="mind", starts=200))
    assert result.sampled == "fixed"
    assert _tre(result, pair, fixed) < 1.5  # (3 mm voxels: MIND-SSC's own accuracy here)


def test_an_ultrasound_sector_is_detected_as_moving_or_fixed(pair) -> None:
    """No flag: the sector is found in either image and provides the sample points."""
    fan = _sector(pair.moving, 35.0)
    result = register(pair.fixed, fan, RegistrationOptions(similarity="mind", starts=200))
    assert (result.ultrasound, result.sampled) == ("moving", "moving")
    assert _tre(result, pair, pair.fixed) < 2.0
    fixed_fan = _sector(pair.fixed, 35.0)
    result = register(fixed_fan, pair.moving, RegistrationOptions(similarity="mind", starts=200))
    assert (result.ultrasound, result.sampled) == ("fixed", "fixed")
    assert _tre(result, pair, fixed_fan) < 2.0


def test_an_ultrasound_is_despeckled_before_it_is_described(pair, monkeypatch) -> None:
    """With MIND-SSC the detected sector (fixed or moving) is smoothed inside its data region
    (Similarity.ultrasound_smoothing_mm) before anything describes it; the other image and
    a pair without an ultrasound are left alone, as is every image under LC2 and DISA and
    in rigid+probe mode."""
    from disa.registration import pipeline

    smoothed: list[tuple[tuple[int, ...], float]] = []
    original = pipeline.masked_gaussian

    def recording(image, mask, sigma):
        smoothed.append((image.GetSize(), sigma))
        return original(image, mask, sigma)

    def prepared(fixed, moving, similarity: str):
        options = RegistrationOptions(similarity=similarity, starts=20)
        return pipeline._prepare_pair(fixed, moving, options, None, None, None,
                                      pipeline.MAX_WORKING_VOXELS, lambda *a: None,
                                      pipeline._Clock())

    monkeypatch.setattr(pipeline, "masked_gaussian", recording)
    fan = _sector(pair.moving, 35.0)
    fixed_fan = _sector(_crop(pair.fixed, 0.0, 0.8), 35.0)
    for similarity, sigma in (("mind", 1.5), ("lc2", None), ("disa", None)):
        assert prepared(pair.fixed, fan, similarity).ultrasound == "moving"
        assert smoothed == ([(fan.GetSize(), sigma)] if sigma else [])
        smoothed.clear()
        assert prepared(fixed_fan, pair.moving, similarity).ultrasound == "fixed"
        assert smoothed == ([(fixed_fan.GetSize(), sigma)] if sigma else [])
        smoothed.clear()
        assert prepared(pair.fixed, pair.moving, similarity).ultrasound is None
        assert smoothed == []
    # Not in the probe model, whose compression lives in the detail near the probe.
    options = RegistrationOptions(similarity="mind", mode="rigid+probe", starts=20)
    found = pipeline._prepare_pair(pair.fixed, fan, options, None, None, None,
                                   pipeline.MAX_WORKING_VOXELS, lambda *a: None,
                                   pipeline._Clock())
    assert found.ultrasound == "moving" and smoothed == []
    # What the search describes is the smoothed sector: the prepared volume changed.
    plain = prepared(pair.fixed, fan, "lc2").moving_p.volume
    despeckled = prepared(pair.fixed, fan, "mind").moving_p.volume
    assert plain.shape == despeckled.shape and not np.allclose(plain, despeckled)


def test_an_initial_transform_with_zero_ranges_is_refined_only(pair) -> None:
    """Given the truth moved by 4 mm and no search ranges: one start, refined to the truth;
    given a transform 60 mm off and no ranges, the result stays near that transform."""
    near = sitk.Euler3DTransform(TRUTH)
    near.SetTranslation(tuple(np.add(TRUTH.GetTranslation(), (4.0, 0.0, 0.0))))
    options = RegistrationOptions(similarity="mind", rotation_range=0, translation_range=0)
    result = register(pair.fixed, pair.moving, options, initial_transform=near)
    assert result.starts == 1
    assert _tre(result, pair, pair.fixed) < 1.0
    far = sitk.Euler3DTransform(TRUTH)
    far.SetTranslation(tuple(np.add(TRUTH.GetTranslation(), (60.0, 0.0, 0.0))))
    result = register(pair.fixed, pair.moving, options, initial_transform=far)
    assert _tre(result, pair, pair.fixed) > 20.0


def test_a_non_linear_initial_transform_is_refused(pair) -> None:
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    field.SetSpacing((40.0, 40.0, 40.0))
    array = sitk.GetArrayFromImage(field)
    array[..., 0] = np.random.default_rng(0).normal(size=array.shape[:3]) * 5
    bent = sitk.GetImageFromArray(array, isVector=True)
    bent.CopyInformation(field)
    transform = sitk.DisplacementFieldTransform(bent)
    with pytest.raises(InputError, match="initial transform"):
        register(pair.fixed, pair.moving, RegistrationOptions(similarity="mind", starts=10),
                 initial_transform=transform)


@pytest.mark.parametrize(("evidence", "expected"), [
    (Evidence(1.0, False, 0.98, 0.8, 8), "likely"),
    (Evidence(0.125, False, 0.98, 0.8, 8), "uncertain"),  # the solutions disagree
    (Evidence(1.0, True, 0.98, 0.8, 8), "uncertain"),  # another pose as good
    (Evidence(1.0, False, 0.98, 0.3, 8), "uncertain"),  # weak match
    (Evidence(1.0, False, 0.32, 0.8, 8), "failed"),  # pushed to the overlap barrier
    (Evidence(1.0, False, 0.9, 0.05, 8), "failed"),  # no better than chance
    (Evidence(1.0, False, 0.9, 0.7, 1), "likely"),  # one start: no agreement to ask for
    (Evidence(1.0, False, 0.98, 0.9, 8, calibrated=False), "uncertain"),  # shipped DISA
    (Evidence(1.0, False, 0.98, 0.9, 8, ultrasound=True), "uncertain"),  # ultrasound pair
])
def test_verdict_rules(evidence: Evidence, expected: str) -> None:
    decision, reason = verdict(evidence)
    assert decision == expected
    assert reason and "\n" not in reason


def test_a_sector_with_no_contrast_inside_is_refused_with_a_message(pair) -> None:
    """A fan whose only bright voxels sit at its apex, on the fan's edge (which is no
    anatomy), the rest near zero (a strong reflector, then shadow), holds nothing to
    match: a clear InputError naming the image, not a crash."""
    array = sitk.GetArrayFromImage(_sector(pair.moving, 35.0))
    inside = array > 0
    array[inside] = 1e-6 * np.random.default_rng(0).uniform(1.0, 2.0, int(inside.sum()))
    apex = np.zeros_like(inside)
    apex[:3] = True
    array[inside & apex] = 1.0
    shadowed = sitk.GetImageFromArray(array)
    shadowed.CopyInformation(pair.moving)
    with pytest.raises(InputError, match="moving: no structure"):
        register(pair.fixed, shadowed, RegistrationOptions(similarity="mind", starts=20))


def test_only_a_fan_that_narrows_to_its_probe_is_taken_for_an_ultrasound(pair) -> None:
    """Zero padding alone is not a sector: a brain with its background zeroed (the bundled
    sample's T2, skull-stripped templates) or a zero-padded slab is no ultrasound."""
    from disa.registration.fov import sector_shaped

    assert sector_shaped(data_region(_sector(pair.moving, 35.0)))
    moving = sitk.GetArrayFromImage(pair.moving)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in moving.shape), indexing="ij")
    stripped = np.where(zz ** 2 + yy ** 2 + xx ** 2 < 0.7, moving - moving.min() + 1.0, 0.0)
    slab = np.where(np.abs(zz) < 0.3, moving - moving.min() + 1.0, 0.0)
    for array in (stripped, slab):
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(pair.moving)
        region = data_region(image)
        assert region.has_padding and not sector_shaped(region)
    from disa.sample import sample_paths

    sample = data_region(sitk.ReadImage(str(sample_paths()[1])))
    assert sample.has_padding and not sector_shaped(sample)


def test_an_8_bit_fans_shadows_stay_data_and_its_outside_stays_padding(pair) -> None:
    """An ultrasound exported as 8 bits writes its acoustic shadows as exact zeros, which
    touch the zeros outside the fan through its far edge. Behind an echo on a ray from the
    probe they are data (the edge of a bone is the strongest structure there); outside
    the fan, with no echo before them on their ray, they stay padding."""
    from disa.registration.fov import acoustic_shadows

    fan = sitk.GetArrayFromImage(_sector(pair.moving, 35.0))
    inside = fan > 0
    eight_bit = np.where(inside, np.clip(np.round(fan / fan.max() * 255.0), 1, 255), 0.0)
    # A bone 12 voxels wide at 40 % depth: all zeros behind it, to the fan's far edge (the
    # buffer's bottom face, where they join the padding).
    bone = int(0.4 * fan.shape[0])
    eight_bit[bone:, 26:38, 26:38] = 0.0
    eight_bit[bone, 26:38, 26:38] = 255.0
    image = sitk.GetImageFromArray(eight_bit.astype(np.uint8))
    image.CopyInformation(pair.moving)
    region = data_region(image)
    data = sitk.GetArrayFromImage(region.mask).astype(bool)
    shadow = np.zeros_like(inside)
    shadow[bone + 1:, 26:38, 26:38] = True
    assert region.has_padding
    assert data[shadow].mean() > 0.9 and data[50, 32, 32]
    # Outside the fan, a few voxels along its faces at most (the apex is estimated).
    assert data[~inside].mean() < 0.005 and not data[-1, 0, 0] and not data[10, 32, 0]
    # No shadow, (almost) no change: a whole fan's padding loses a few voxels along its
    # faces, a slab's nothing.
    assert acoustic_shadows(~inside, pair.moving.GetSpacing())[~inside].mean() < 0.005
    slab = np.ones(fan.shape, dtype=bool)
    slab[20:40] = False
    assert not acoustic_shadows(slab, pair.moving.GetSpacing()).any()


def test_a_lossy_ring_or_a_smoothed_edge_around_a_fan_is_still_padding(pair) -> None:
    """A lossy codec leaves values 0-5 of 255 in a ring around an 8-bit fan, and a
    smoothing along the slices ramps its edge into the padding: the exact padding no
    longer ends in a cut. Grown through near-zero voxels, it does again, and the fan is
    found; the growth is bounded, so a dark (anechoic) region inside the fan that touches
    its edge stays data beyond a few voxels."""
    from scipy import ndimage

    from disa.registration.fov import PADDING_GROWTH_VOXELS, sector_shaped

    fan = sitk.GetArrayFromImage(_sector(pair.moving, 35.0))
    inside = fan > 0
    eight_bit = np.where(inside, np.clip(np.round(fan / fan.max() * 255.0), 1, 255), 0.0)
    cyst = inside & (np.indices(fan.shape)[2] < 22) & (np.indices(fan.shape)[0] > 40)
    eight_bit[cyst] = np.random.default_rng(0).integers(1, 4, int(cyst.sum()))
    ring = ndimage.binary_dilation(inside, iterations=3) & ~inside
    ringed = eight_bit.copy()
    ringed[ring] = np.random.default_rng(1).integers(0, 6, int(ring.sum()))
    smoothed = ndimage.gaussian_filter1d(eight_bit, 1.5, axis=0)
    far_from_padding = ndimage.distance_transform_cdt(inside, metric="taxicab")
    deep = inside & (far_from_padding > PADDING_GROWTH_VOXELS + 3)
    for array in (ringed, smoothed):
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(pair.moving)
        region = data_region(image)
        assert region.has_padding and sector_shaped(region)
        data = sitk.GetArrayFromImage(region.mask).astype(bool)
        assert data[deep].all() and data[cyst & deep].any()
        # The ring is padding; the smoothed edge's ramp is partly data (it holds echoes).
        assert data[~inside].mean() < 0.1 and not data[-1, 0, 0]
        assert array is not ringed or data[ring].mean() < 0.02
    # Away from zero (padding at the image's minimum, a phantom's constant air) grown
    # padding is kept around a fan only: a slab with the same ring keeps it at zero only.
    lifted = sitk.GetImageFromArray((ringed + 3.0).astype(np.float32))
    lifted.CopyInformation(pair.moving)
    assert data_region(lifted).has_padding
    slab = np.zeros(fan.shape)
    slab[20:44] = eight_bit[40]  # one slice of the fan's speckle, tissue only
    slab[20:44, :, :] = np.where(slab[20:44] > 0, slab[20:44], 128.0)
    slab[17:20] = np.random.default_rng(2).integers(0, 6, slab[17:20].shape)
    slab[44:47] = np.random.default_rng(3).integers(0, 6, slab[44:47].shape)
    for offset, padded in ((0.0, True), (3.0, False)):
        image = sitk.GetImageFromArray((slab + offset).astype(np.float32))
        image.CopyInformation(pair.moving)
        assert data_region(image).has_padding is padded
    # A clean export's padding is the exact one: nothing is grown into the fan, not even
    # into the dark region along its edge.
    clean = sitk.GetImageFromArray(eight_bit.astype(np.float32))
    clean.CopyInformation(pair.moving)
    data = sitk.GetArrayFromImage(data_region(clean).mask).astype(bool)
    assert data[inside].all() and data[~inside].mean() < 0.005


def test_the_overlap_a_user_reads_is_the_share_of_the_smaller_view(pair) -> None:
    """A view wholly inside the other overlaps fully whichever image is sampled; moved out
    of the other's field of view it overlaps nothing."""
    from disa.registration.pipeline import data_overlap, prepare

    whole = prepare(pair.fixed, 3.0, None)
    part = prepare(_crop(pair.fixed, 0.3, 0.7), 3.0, None)
    same = np.eye(4)
    assert data_overlap(whole, part, same) == pytest.approx(1.0)
    assert data_overlap(part, whole, same) == pytest.approx(1.0)
    away = np.eye(4)
    away[0, 3] = 1000.0
    assert data_overlap(whole, part, away) == 0.0


def test_regions_on_grid_equals_two_resamplings_on_an_oblique_grid() -> None:
    """One resampling with a default of -1 gives what two gave with defaults 0 and 1:
    ITK never blends the default with the buffer's voxels."""
    rng = np.random.default_rng(4)
    region = sitk.GetImageFromArray((rng.random((20, 24, 28)) > 0.3).astype(np.uint8))
    region.SetSpacing((1.5, 2.0, 2.5))
    region.SetOrigin((3.0, -4.0, 5.0))
    reference = sitk.Image(30, 26, 22, sitk.sitkFloat32)
    reference.SetSpacing((1.7, 1.7, 1.7))
    reference.SetOrigin((-6.0, -9.0, -3.0))
    angle = np.deg2rad(25.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                          [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    reference.SetDirection(direction.ravel().tolist())

    def resampled(outside: float) -> np.ndarray:
        image = sitk.Resample(sitk.Cast(region, sitk.sitkFloat32), reference, sitk.Transform(),
                              sitk.sitkLinear, outside, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(image) > 0.5

    fov, unpadded = regions_on_grid(region, reference)
    assert np.array_equal(fov, resampled(0.0))
    assert np.array_equal(unpadded, resampled(1.0))
    # The grid reaches past the buffer, and the buffer holds voxels without data.
    assert np.any(unpadded & ~fov) and np.any(~unpadded)
