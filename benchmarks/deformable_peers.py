"""Deformable peers for benchmarks/deformable.py, each run with its documented default
recipe, and the figures that compare any mapping with a known one.

Every peer takes (fixed, moving) SimpleITK images and returns one ``sitk.Transform``
T that maps *fixed* points to *moving* points (LPS mm), the convention of
``sitk.Resample(moving, fixed, T)`` and of DISA's ``result.field_transform``:

    ants-syn          ANTsPy ``registration(type_of_transform="SyN")``: its default
                      recipe (affine stage, Mattes MI, 2100x1200x1200x0 iterations;
                      then SyN[0.2, 3, 0] with Mattes MI, 40x20x0 iterations),
                      started from the identity (``initial_transform="Identity"``:
                      its default is a centre-of-mass translation, which the other
                      methods do not get). Its forward transforms are the warp and the
                      affine; T(x) = A(W(x)).
    elastix-bspline   itk-elastix's default "affine" then default "bspline" parameter
                      maps (AdvancedMattesMutualInformation, 4 resolutions, 256
                      iterations each, adaptive stochastic gradient descent; the
                      B-spline map adds a bending-energy penalty, final grid 10 mm).
                      T is read back as a dense field (transformix) on the fixed grid.
    sitk-bspline      SimpleITK: rigid Mattes MI as capture_range.py's ``sitk-mi`` peer,
                      then the B-spline recipe of SimpleITK's example
                      ImageRegistrationMethodBSpline3 (mesh 2 per axis refined x1, x2,
                      x5 over 3 levels, shrink 4/2/1, smoothing 4/2/1 voxels, gradient
                      descent with line search, 5.0, 100 iterations) with Mattes MI (50
                      bins, 10 % random samples instead of the example's joint histogram
                      MI over every voxel). T(x) = R(B(x)).

Figures (``mapping_figures``): the dense TRE, mean over evaluation voxels of
|T_est(x) - T_true(x)| (mm), and the Jacobian figures of DISA's own outputs
(``jacobian_metrics`` of the dense displacement on the fixed grid).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from disa.registration.transform.displacement import dense_displacement, jacobian_metrics

#: The peers, by the name the benchmark's table uses.
PEERS = ("ants-syn", "elastix-bspline", "sitk-bspline")
_PACKAGE = {"ants-syn": "ants", "elastix-bspline": "itk", "sitk-bspline": "SimpleITK"}


def available(peer: str) -> bool:
    """Whether ``peer``'s package is installed (the ``bench`` extra)."""
    return importlib.util.find_spec(_PACKAGE[peer]) is not None


# ------------------------------------------------------------------- figures


def displacement_array(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """u(x) = T(x) - x on ``reference``'s grid: (z, y, x, 3) float32, LPS mm."""
    return sitk.GetArrayFromImage(dense_displacement(transform, reference))


def dense_tre(estimate: sitk.Transform, truth: sitk.Transform, reference: sitk.Image,
              mask: np.ndarray) -> float:
    """Mean |T_est(x) - T_true(x)| (mm) over the voxels of ``reference`` where ``mask``
    ((z, y, x) bool) is True; nan for an empty mask."""
    if not mask.any():
        return float("nan")
    estimated = displacement_array(estimate, reference)[mask]
    diff = estimated - displacement_array(truth, reference)[mask]
    return float(np.mean(np.linalg.norm(diff, axis=1)))


def field_figures(transform: sitk.Transform, reference: sitk.Image) -> dict[str, float]:
    """SDlogJ and folding fraction of T on ``reference``'s grid, as the engine reports
    them for its own results (``jacobian_metrics``)."""
    metrics = jacobian_metrics(dense_displacement(transform, reference))
    return {"sdlogj": metrics["sd_log_jacobian"], "negj": metrics["negative_jacobian_fraction"]}


# ------------------------------------------------------------- conversions


def field_transform(displacement: np.ndarray, reference: sitk.Image) -> sitk.Transform:
    """A dense displacement (z, y, x, 3; LPS mm, u(x) = T(x) - x) on ``reference``'s grid
    as the transform T."""
    field = sitk.GetImageFromArray(np.ascontiguousarray(displacement, dtype=np.float64),
                                   isVector=True)
    field.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(field)


def ants_transform(fwdtransforms: list[str]) -> sitk.Transform:
    """ANTs' forward transforms (``registration(...)["fwdtransforms"]``: warp first, then
    the affine .mat, the order ``antsApplyTransforms -t`` takes) as one fixed -> moving
    transform. ITK's composite applies its last transform first; ANTs lists the
    transform applied to a fixed point *last*, so they go in as listed read backwards:
    the affine added first, the warp last, giving T(x) = A(W(x))."""
    composite = sitk.CompositeTransform(3)
    for path in reversed(fwdtransforms):
        if path.endswith((".nii", ".nii.gz")):
            field = sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)
            composite.AddTransform(sitk.DisplacementFieldTransform(field))
        else:
            composite.AddTransform(sitk.ReadTransform(path))
    return composite


# ------------------------------------------------------------------- peers


def _write(image: sitk.Image, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), path)
    return path


def ants_syn(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """ANTsPy SyN, its default recipe (affine + SyN, Mattes MI), from the identity."""
    import ants as antspy

    with tempfile.TemporaryDirectory() as tmp:
        f = antspy.image_read(_write(fixed, tmp, "fixed.nii.gz"))
        m = antspy.image_read(_write(moving, tmp, "moving.nii.gz"))
        out = antspy.registration(f, m, type_of_transform="SyN", initial_transform="Identity",
                                  random_seed=1, outprefix=os.path.join(tmp, "ants_"))
        return ants_transform(list(out["fwdtransforms"]))


def elastix_bspline(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """itk-elastix default affine then default B-spline map (AdvancedMattesMI)."""
    import itk

    with tempfile.TemporaryDirectory() as tmp:
        f = itk.imread(_write(fixed, tmp, "fixed.nii.gz"), itk.F)
        m = itk.imread(_write(moving, tmp, "moving.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    log = bool(os.environ.get("ELASTIX_LOG"))
    _, result = itk.elastix_registration_method(f, m, parameter_object=params,
                                                log_to_console=log)
    return elastix_transform(result, m, fixed)


def elastix_transform(result, moving, fixed: sitk.Image) -> sitk.Transform:
    """elastix's result transform parameters (every map of the chain) as a dense
    fixed -> moving transform on ``fixed``'s grid. transformix's deformation field is
    u(x) = T(x) - x over the fixed image's domain (the maps' Size, Origin, Spacing),
    T the whole chain, fixed points -> moving points as in ITK; ``moving``: the itk
    image transformix is given (only its type matters)."""
    import itk

    # An output directory of its own: transformix writes deformationField.nii there.
    with tempfile.TemporaryDirectory() as tmp:
        field = itk.transformix_deformation_field(
            moving, result, output_directory=tmp,
            log_to_console=bool(os.environ.get("ELASTIX_LOG")))
        return field_transform(np.array(itk.array_from_image(field)), fixed)


def sitk_bspline(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """SimpleITK rigid Mattes MI, then a 3-level B-spline with Mattes MI (module doc)."""
    from capture_range import sitk_mi

    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    rigid, _ = sitk_mi(f, m)
    bspline = sitk.BSplineTransformInitializer(f, [2, 2, 2])
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescentLineSearch(5.0, 100, convergenceMinimumValue=1e-4,
                                                convergenceWindowSize=5)
    reg.SetMovingInitialTransform(rigid)
    reg.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[1, 2, 5])
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([4, 2, 1])
    optimised = reg.Execute(f, m)
    # ITK's registration evaluates moving(R(B(x))): the optimised B-spline B maps fixed
    # points into the rigid's domain, the moving initial transform R on to moving
    # points. The composite applies its last transform first.
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(rigid)
    composite.AddTransform(optimised)
    return composite


METHODS: dict[str, Callable[[sitk.Image, sitk.Image], sitk.Transform]] = {
    "ants-syn": ants_syn,
    "elastix-bspline": elastix_bspline,
    "sitk-bspline": sitk_bspline,
}
