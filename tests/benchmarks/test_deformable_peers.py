"""The deformable benchmark's peers and figures: mapping conventions (every peer's
result must map fixed points to moving points), dense TRE, Jacobian figures, a
masked label figure, and the torso pair's evaluation region."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import numpy as np
import pytest
import SimpleITK as sitk

from disa.training import phantom as ph

from .scripts import load_benchmark

dp = load_benchmark("deformable_peers")
deformable = load_benchmark("deformable")

needs_ants = pytest.mark.skipif(importlib.util.find_spec("ants") is None,
                                reason="antspyx (bench extra) not installed")
needs_itk = pytest.mark.skipif(importlib.util.find_spec("itk") is None,
                               reason="itk-elastix (bench extra) not installed")


def _image(shape: tuple[int, int, int], spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
           direction=None) -> sitk.Image:
    image = sitk.Image(list(shape[::-1]), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return image


def _points(image: sitk.Image) -> np.ndarray:
    """Physical points (z, y, x, 3) of every voxel."""
    z, y, x = np.indices(image.GetSize()[::-1])
    index = np.stack([x, y, z], -1).astype(np.float64)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return index * np.asarray(image.GetSpacing()) @ d.T + np.asarray(image.GetOrigin())


# ---------------------------------------------------------------- figures


def test_dense_tre_is_the_mean_distance_between_the_mappings_inside_the_mask() -> None:
    reference = _image((10, 12, 14))
    shift = sitk.TranslationTransform(3, (3.0, -4.0, 0.0))
    mask = np.zeros((10, 12, 14), bool)
    mask[2:5, 3:9, 4:10] = True
    assert dp.dense_tre(sitk.Transform(), shift, reference, mask) == pytest.approx(5.0, abs=1e-5)
    assert dp.dense_tre(shift, shift, reference, mask) == pytest.approx(0.0, abs=1e-5)
    # A rotation about the grid's centre: each point is off by 2 r sin(angle / 2), r its
    # distance from the axis; inside the mask only.
    rotation = sitk.Euler3DTransform()
    centre = reference.TransformContinuousIndexToPhysicalPoint((6.5, 5.5, 4.5))
    rotation.SetCenter(centre)
    rotation.SetRotation(0.0, 0.0, 0.3)
    p = _points(reference)[mask]
    radius = np.linalg.norm((p - np.asarray(centre))[:, :2], axis=1)
    expected = float(np.mean(2 * radius * np.sin(0.15)))
    assert dp.dense_tre(rotation, sitk.Transform(), reference, mask) == pytest.approx(
        expected, rel=1e-4)
    assert expected != pytest.approx(
        dp.dense_tre(rotation, sitk.Transform(), reference, np.ones_like(mask)), rel=1e-2)
    assert np.isnan(dp.dense_tre(rotation, shift, reference, np.zeros_like(mask)))


def test_field_figures_see_folding_and_roughness() -> None:
    reference = _image((12, 12, 12))
    assert dp.field_figures(sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), reference) == {
        "sdlogj": pytest.approx(0.0, abs=1e-6), "negj": 0.0}
    # u_x = -2 x in the central block: det J = 1 - 2 < 0 there (a fold).
    u = np.zeros((12, 12, 12, 3))
    x = _points(reference)[..., 0]
    u[3:9, 3:9, 3:9, 0] = -2.0 * (x[3:9, 3:9, 3:9] - x[3:9, 3:9, 3:9].mean())
    figures = dp.field_figures(dp.field_transform(u, reference), reference)
    assert figures["negj"] > 0.05
    assert figures["sdlogj"] > 0.5


def test_field_transform_reads_a_zyx_array_of_xyz_vectors_on_the_grid() -> None:
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.2, -0.1, 0.4)
    reference = _image((5, 6, 7), spacing=(1.5, 2.0, 3.0), origin=(10.0, -5.0, 2.0),
                       direction=rotation.GetMatrix())
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5, 6, 7, 3))
    transform = dp.field_transform(u, reference)
    p = _points(reference)
    for z, y, x in [(0, 0, 0), (4, 5, 6), (2, 1, 5), (3, 4, 0)]:
        np.testing.assert_allclose(transform.TransformPoint(tuple(p[z, y, x])),
                                   p[z, y, x] + u[z, y, x], atol=1e-6)
    np.testing.assert_allclose(dp.displacement_array(transform, reference), u, atol=1e-5)


def test_label_figures_and_tre_keep_to_the_evaluation_region() -> None:
    labels = np.zeros((20, 20, 20), np.int16)
    labels[4:16, 4:16, 4:10] = 1
    labels[4:16, 4:16, 10:16] = 2
    grid = ph.make_grid((20, 20, 20), (2.0, 2.0, 2.0))
    image = grid.image_like(labels.astype(np.float32))
    moved = labels.copy()
    moved[:, :, 10:16] = 0  # label 2 lost in the moving image
    mask = np.zeros_like(labels, bool)
    mask[:, :, :10] = True  # ... but outside the region
    case = deformable.Case("t", image, image, grid.image_like(labels),
                           grid.image_like(moved), sitk.Transform(), [1, 2], mask)
    d, _ = deformable.label_figures(case, sitk.Transform())
    np.testing.assert_allclose(d, [1.0, 1.0])  # label 2 absent from both inside the fan
    case.mask = None
    d, _ = deformable.label_figures(case, sitk.Transform())
    np.testing.assert_allclose(d, [1.0, 0.0])
    assert deformable.tre_mask(case).sum() == (labels > 0).sum()
    case.mask = mask
    assert deformable.tre_mask(case).sum() == (labels[:, :, :10] > 0).sum()


# ------------------------------------------------------------ conversions


def _smooth_field(reference: sitk.Image, amplitude: float) -> np.ndarray:
    p = _points(reference)
    c = p.reshape(-1, 3).mean(0)
    bump = np.exp(-np.sum((p - c) ** 2, -1) / (2 * 12.0**2))[..., None]
    return amplitude * bump * np.array([1.0, -0.6, 0.4])


def _pattern(reference: sitk.Image) -> sitk.Image:
    p = _points(reference)
    values = (np.sin(p[..., 0] / 5.0) + np.cos(p[..., 1] / 7.0) + np.sin(p[..., 2] / 4.0 + 1)
              + 0.002 * p[..., 0] ** 2)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    return image


@needs_ants
def test_ants_forward_transforms_compose_as_ants_applies_them() -> None:
    """ANTs' own resampling with [warp, affine] equals sitk.Resample with our composite
    (and not with the other order): the composite is the fixed -> moving mapping."""
    import ants as antspy

    fixed = _image((24, 26, 28))
    moving = _pattern(_image((24, 26, 28), origin=(-6.0, -4.0, -5.0)))
    affine = sitk.AffineTransform(3)
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.1, -0.15, 0.25)
    affine.SetMatrix(rotation.GetMatrix())
    affine.SetCenter((27.0, 25.0, 23.0))
    affine.SetTranslation((6.0, -5.0, 4.0))
    warp = sitk.GetImageFromArray(_smooth_field(fixed, 6.0).astype(np.float32), isVector=True)
    warp.CopyInformation(fixed)
    with tempfile.TemporaryDirectory() as tmp:
        mat, nii = os.path.join(tmp, "0GenericAffine.mat"), os.path.join(tmp, "1Warp.nii.gz")
        sitk.WriteTransform(affine, mat)
        sitk.WriteImage(warp, nii)
        f_path, m_path = os.path.join(tmp, "f.nii.gz"), os.path.join(tmp, "m.nii.gz")
        sitk.WriteImage(fixed, f_path)
        sitk.WriteImage(moving, m_path)
        ants_warped = antspy.apply_transforms(antspy.image_read(f_path),
                                              antspy.image_read(m_path), [nii, mat],
                                              interpolator="linear").numpy().T  # (z, y, x)
        ours = dp.ants_transform([nii, mat])
        other = sitk.CompositeTransform(3)
        other.AddTransform(dp.field_transform(sitk.GetArrayFromImage(warp), fixed))
        other.AddTransform(affine)
    inside = ants_warped != 0
    assert inside.mean() > 0.5
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, ours, sitk.sitkLinear, 0.0))
    wrong = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, other, sitk.sitkLinear, 0.0))
    assert np.abs(warped - ants_warped)[inside].max() < 1e-3
    assert np.abs(wrong - ants_warped)[inside].mean() > 0.05


def test_sitk_moving_initial_transform_is_applied_after_the_optimised_one() -> None:
    """What sitk_bspline's composite assumes: with SetMovingInitialTransform(R) the
    registration's metric samples moving(R(B(x))), i.e. CompositeTransform [R, B]."""
    fixed = _pattern(_image((20, 22, 24)))
    moving = _pattern(_image((20, 22, 24), origin=(-3.0, 2.0, -1.0)))
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter((23.0, 21.0, 19.0))
    rigid.SetRotation(0.2, -0.1, 0.3)
    rigid.SetTranslation((4.0, -3.0, 2.0))
    bspline = sitk.BSplineTransformInitializer(fixed, [3, 3, 3])
    rng = np.random.default_rng(1)
    bspline.SetParameters(tuple(rng.normal(0.0, 4.0, len(bspline.GetParameters()))))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMovingInitialTransform(rigid)
    reg.SetInitialTransform(bspline, inPlace=False)
    metric = reg.MetricEvaluate(fixed, moving)

    def mean_squares(first: sitk.Transform, last: sitk.Transform) -> float:
        composite = sitk.CompositeTransform(3)
        composite.AddTransform(first)
        composite.AddTransform(last)
        warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite,
                                                      sitk.sitkLinear, 0.0))
        inside = sitk.GetArrayFromImage(sitk.Resample(moving * 0 + 1, fixed, composite,
                                                      sitk.sitkNearestNeighbor, 0.0)) > 0
        return float(np.mean((warped - sitk.GetArrayFromImage(fixed))[inside] ** 2))

    assert mean_squares(rigid, bspline) == pytest.approx(metric, rel=1e-5)
    assert mean_squares(bspline, rigid) != pytest.approx(metric, rel=1e-2)


# ------------------------------------------------- peers on a translation

#: Voxel size of the translation case (mm): the peers must land within one voxel.
VOXEL_MM = 2.0


@pytest.fixture(scope="module")
def translated() -> tuple[sitk.Image, sitk.Image, sitk.Transform, np.ndarray]:
    """A phantom pair, the moving one another contrast (non-monotonic) whose header is
    shifted by t: the anatomy at fixed x lies at moving x + t, so T(x) = x + t."""
    grid = ph.make_grid((44, 40, 36), (2.0, 2.0, 2.0))
    anatomy = ph.default_anatomy(scale_mm=30.0)
    points = ph.grid_points(grid)
    fixed_values = ph.render(points, anatomy, ph.contrast_table(9, 1), 4).reshape(grid.shape)
    moving_values = ph.render(points, anatomy, ph.contrast_table(9, 2, non_monotonic=True),
                              5).reshape(grid.shape)
    fixed = grid.image_like(fixed_values.astype(np.float32))
    moving = grid.image_like(moving_values.astype(np.float32))
    t = np.array([5.0, -3.0, 4.0])
    moving.SetOrigin(tuple(np.asarray(moving.GetOrigin()) + t))
    return fixed, moving, sitk.TranslationTransform(3, tuple(t)), fixed_values > 0.05


def _check(transform: sitk.Transform, case) -> None:
    fixed, _, truth, mask = case
    initial = dp.dense_tre(sitk.Transform(), truth, fixed, mask)
    inverted = dp.dense_tre(truth.GetInverse(), truth, fixed, mask)
    assert initial == pytest.approx(np.sqrt(50.0), rel=1e-4)
    assert inverted == pytest.approx(2 * initial, rel=1e-4)  # what a flipped convention gives
    assert dp.dense_tre(transform, truth, fixed, mask) < VOXEL_MM


@needs_ants
def test_ants_syn_maps_fixed_points_to_moving_points(translated) -> None:
    fixed, moving, _, _ = translated
    _check(dp.ants_syn(fixed, moving), translated)


def test_sitk_bspline_maps_fixed_points_to_moving_points(translated) -> None:
    fixed, moving, _, _ = translated
    _check(dp.sitk_bspline(fixed, moving), translated)


@needs_itk
def test_elastix_result_is_read_back_as_the_fixed_to_moving_field(translated) -> None:
    """The conversion elastix_bspline uses, on elastix's default translation map (the
    full affine + B-spline default run takes ~30 s here and lands 2-3 mm off on this
    small phantom; the benchmark runs it)."""
    import itk

    fixed, moving, _, _ = translated
    with tempfile.TemporaryDirectory() as tmp:
        f = itk.imread(dp._write(fixed, tmp, "f.nii.gz"), itk.F)
        m = itk.imread(dp._write(moving, tmp, "m.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("translation"))
    _, result = itk.elastix_registration_method(f, m, parameter_object=params,
                                                log_to_console=False)
    _check(dp.elastix_transform(result, m, fixed), translated)


@needs_itk
def test_elastix_affine_bspline_chain_is_read_back_whole(translated) -> None:
    """The affine + B-spline chain as elastix_bspline runs it (default maps, iterations
    cut to 16 for speed): resampling with the converted transform reproduces elastix's
    own result image, which the affine map alone does not."""
    import itk

    fixed, moving, _, mask = translated
    with tempfile.TemporaryDirectory() as tmp:
        f = itk.imread(dp._write(fixed, tmp, "f.nii.gz"), itk.F)
        m = itk.imread(dp._write(moving, tmp, "m.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        parameter_map = params.GetDefaultParameterMap(name)
        parameter_map["MaximumNumberOfIterations"] = ["16"]
        params.AddParameterMap(parameter_map)
    image, result = itk.elastix_registration_method(f, m, parameter_object=params,
                                                    log_to_console=False)
    theirs = np.asarray(itk.array_from_image(image))
    ours = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, dp.elastix_transform(
        result, m, fixed), sitk.sitkBSpline, 0.0))
    assert np.abs(ours - theirs)[mask].max() < 1e-4
    affine = itk.ParameterObject.New()
    affine.AddParameterMap(result.GetParameterMap(0))
    first = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, dp.elastix_transform(
        affine, m, fixed), sitk.sitkBSpline, 0.0))
    assert np.abs(first - theirs)[mask].mean() > 1e-3
