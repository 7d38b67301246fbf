"""Non-linear mappings as ITK objects: residual fields, dense displacement, Jacobian metrics.

Every non-linear result of the engine (deformable stage, probe compression) is
written as

    T(x) = L(x + r(x))        fixed point x -> moving point (LPS mm)

with L the rigid/affine part (transform.tfm) and r a residual displacement
(LPS mm) on a grid in the fixed frame, linear between nodes and zero outside
the grid. In SimpleITK that is ``CompositeTransform([L, DisplacementFieldTransform(r)])``
(a composite applies its last transform first), which transform.h5 holds.
displacement.nii.gz is the dense field u(x) = T(x) - x of the *full* mapping
on the fixed image grid (the ITK displacement-field convention: vectors in
LPS mm, ``sitk.DisplacementFieldTransform(u)`` is T on that grid).

The inverse mapping T^-1 (moving point -> fixed point) is R^-1(L^-1(y)) with
R(x) = x + r(x): only the residual needs a numerical inverse, on its own grid
(:func:`inverse_transform`); inverse_displacement.nii.gz is the dense
v(y) = T^-1(y) - y of it on the moving image grid (:func:`inverse_residual`
measures how well T(y + v(y)) returns to y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from disa.core.grid import Grid
from disa.registration.transform.determinant import determinant_moments, determinants


def covering_grid(grid: Grid, image: sitk.Image) -> tuple[Grid, tuple[slice, slice, slice]]:
    """``grid`` extended by whole nodes until it covers the image's field of view.

    Returns the padded grid and the slices (z, y, x) of the original nodes in
    it. ITK's displacement field transform is the identity outside its grid,
    so every fixed voxel (edges included) must lie between padded nodes.
    """
    size = np.asarray(image.GetSize(), dtype=np.float64)
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint(
        tuple(-0.5 + size[k] * bit for k, bit in enumerate(bits)))
        for bits in np.ndindex(2, 2, 2)])
    index = grid.to_index(corners)
    n = np.asarray(grid.size_xyz)
    lo = np.maximum(0, np.ceil(-index.min(axis=0) + 1e-6)).astype(int)
    hi = np.maximum(0, np.ceil(index.max(axis=0) - (n - 1) + 1e-6)).astype(int)
    origin = grid.to_physical(-lo[None, :].astype(np.float64))[0]
    shape_xyz = n + lo + hi
    padded = Grid(shape=(int(shape_xyz[2]), int(shape_xyz[1]), int(shape_xyz[0])),
                  origin=origin, spacing=grid.spacing.copy(), direction=grid.direction.copy())
    inner = tuple(slice(int(lo[a]), int(lo[a] + n[a])) for a in (2, 1, 0))
    return padded, inner  # type: ignore[return-value]


def residual_transform(linear: sitk.Transform, residual: np.ndarray, grid: Grid
                       ) -> sitk.CompositeTransform:
    """T(x) = linear(x + r(x)) with r (Z, Y, X, 3) LPS mm on ``grid`` (linear interpolation)."""
    field = grid.image_like(np.ascontiguousarray(residual, dtype=np.float64), is_vector=True)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(linear)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))
    return composite


def dense_displacement(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """u(x) = T(x) - x on the grid of ``reference``: VectorFloat32, LPS mm (computed in
    float32 directly: a float64 field of a large CT would need gigabytes)."""
    return sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat32, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection())


def _index_to_mm(image: sitk.Image) -> np.ndarray:
    """Direction times spacing (3 x 3): column k is one step along index axis k, LPS mm."""
    return (np.asarray(image.GetDirection()).reshape(3, 3)
            * np.asarray(image.GetSpacing())[None, :])


def jacobian_metrics(displacement: sitk.Image, border: int = 2) -> dict[str, float]:
    """Folding and smoothness of x -> x + u(x) on the field's own grid.

    det J with J = I + du/dx (central differences, physical derivatives through
    the grid's direction and spacing), over the voxels at least ``border``
    voxels from the edge (Learn2Reg's convention: one-sided differences at the
    edge say nothing about the mapping). Along an axis too short for that border
    (a thin volume: the pipeline accepts 4 slices) the border shrinks to the
    largest that leaves a voxel, never below 1 (central differences need both
    neighbours; an axis of under 3 voxels leaves none and the identity's values
    are returned). Returns the fraction of det J <= 0, the standard deviation of
    log det J (SDlogJ, det clipped at 1e-9) and the range of det J. Compiled
    (determinant.py), and no map of det J is kept: a clinical CT grid has 70 M voxels.
    """
    u = sitk.GetArrayViewFromImage(displacement)  # (z, y, x, 3)
    count, negative, total, total_sq, low, high = determinant_moments(
        u, _index_to_mm(displacement), border)
    if count == 0:
        return {"negative_jacobian_fraction": 0.0, "sd_log_jacobian": 0.0,
                "jacobian_min": 1.0, "jacobian_max": 1.0}
    mean = total / count
    return {"negative_jacobian_fraction": negative / count,
            "sd_log_jacobian": float(np.sqrt(max(total_sq / count - mean**2, 0.0))),
            "jacobian_min": low, "jacobian_max": high}


# ------------------------------------------------------------ Jacobian inside the foreground

#: Voxels (at most) of the det J map that qa.png shows and the foreground figures come from:
#: a larger displacement field is read every k-th voxel per axis (module ``jacobian_map``).
JACOBIAN_MAP_VOXELS = 16_000_000


@dataclass(frozen=True)
class JacobianSummary:
    """det J of the full mapping where the fixed image has anatomy, for qa.png and result.json.

    Attributes:
        determinant: det J of x -> x + u(x), Float32 on the fixed grid or a strided copy of
            it (``step``); NaN on the border where central differences are undefined.
        foreground: UInt8 (1 = fixed foreground) on the same grid as ``determinant``.
        statistics: :func:`jacobian_statistics` of the two (JSON-ready).
    """

    determinant: sitk.Image
    foreground: sitk.Image
    statistics: dict[str, Any]


def jacobian_map(displacement: sitk.Image, max_voxels: int = JACOBIAN_MAP_VOXELS,
                 border: int = 2) -> sitk.Image:
    """det J of x -> x + u(x) as an image (Float32, NaN on the border).

    On the field's own grid when it has at most ``max_voxels`` voxels; a larger
    field is read every k-th voxel per axis (k the smallest that fits), the map
    then lying on that strided grid (voxel i = field voxel k i, spacing k times
    the field's) and its central differences spanning 2k field voxels: det J
    smoothed over k voxels, which is what a display or a percentile of a
    512^3 grid needs. The border and derivatives are :func:`jacobian_metrics`'s,
    so on an unstrided grid the map's range is that function's min and max.
    """
    size = np.asarray(displacement.GetSize())
    step = max(1, int(np.ceil((float(np.prod(size)) / max_voxels) ** (1 / 3) - 1e-9)))
    u = sitk.GetArrayViewFromImage(displacement)[::step, ::step, ::step]
    det = determinants(u, _index_to_mm(displacement) * step, border)
    image = sitk.GetImageFromArray(det)
    image.SetOrigin(displacement.GetOrigin())
    image.SetSpacing(tuple(float(v) * step for v in displacement.GetSpacing()))
    image.SetDirection(displacement.GetDirection())
    return image


def jacobian_statistics(determinant: sitk.Image, foreground: sitk.Image) -> dict[str, Any]:
    """Figures of det J inside the foreground: what qa.png's caption and result.json say.

    ``foreground`` is any mask image (non-zero = foreground, any grid: it is read at
    the determinant's voxels by nearest neighbour). Voxels with a NaN determinant
    (the border) are left out. Returns ``voxels`` (how many were counted),
    ``jacobian_min``, ``jacobian_p1``, ``jacobian_p99``, ``jacobian_max``,
    ``negative_jacobian_fraction`` (det J <= 0: folding), ``sd_log_jacobian``
    (det clipped at 1e-9 before the log, as jacobian_metrics) and ``grid_step_mm``
    (the determinant's spacing). With no such voxel, ``voxels`` is 0 and the
    figures are None.
    """
    det = sitk.GetArrayViewFromImage(determinant)
    inside = sitk.GetArrayViewFromImage(sitk.Resample(
        foreground, determinant, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
        sitk.sitkUInt8)) > 0
    values = np.asarray(det[inside & np.isfinite(det)], dtype=np.float64)
    facts: dict[str, Any] = {"voxels": int(values.size),
                             "grid_step_mm": [float(v) for v in determinant.GetSpacing()]}
    names = ("jacobian_min", "jacobian_p1", "jacobian_p99", "jacobian_max",
             "negative_jacobian_fraction", "sd_log_jacobian")
    if values.size == 0:
        return {**facts, **dict.fromkeys(names)}
    p1, p99 = np.percentile(values, [1.0, 99.0])
    log = np.log(np.clip(values, 1e-9, None))
    return {**facts, "jacobian_min": float(values.min()), "jacobian_p1": float(p1),
            "jacobian_p99": float(p99), "jacobian_max": float(values.max()),
            "negative_jacobian_fraction": float(np.mean(values <= 0)),
            "sd_log_jacobian": float(log.std())}


def summarise_jacobian(displacement: sitk.Image, foreground: sitk.Image,
                       max_voxels: int = JACOBIAN_MAP_VOXELS) -> JacobianSummary:
    """det J map of ``displacement``, the foreground on its grid and their statistics."""
    determinant = jacobian_map(displacement, max_voxels)
    on_map = sitk.Resample(foreground, determinant, sitk.Transform(), sitk.sitkNearestNeighbor,
                           0, sitk.sitkUInt8)
    return JacobianSummary(determinant, on_map, jacobian_statistics(determinant, on_map))


# ------------------------------------------------------------ the inverse mapping

#: InvertDisplacementField's stopping rule. ITK measures the error of the composition
#: x + r_inv(x) + r(x + r_inv(x)) in voxels of the field's grid: 0.01 voxel at most
#: (1e-4 voxel on average), 50 passes at most; with ITK's defaults (10 passes, 0.1 voxel)
#: the largest error on the test bumps was 2.4x larger.
INVERSE_ITERATIONS = 50
INVERSE_MAX_ERROR_VOXELS = 0.01
INVERSE_MEAN_ERROR_VOXELS = 1e-4
#: Nodes (at most) of the refined residual grid that is inverted (about 4 s for 2M nodes
#: on a busy 2-core machine; time grows linearly).
INVERSE_NODE_BUDGET = 2_000_000
#: Largest refinement of the residual grid before inverting it.
INVERSE_MAX_REFINEMENT = 4


def split_mapping(transform: sitk.Transform) -> tuple[sitk.Transform, sitk.Image]:
    """(L, r) of T(x) = L(x + r(x)): the linear part and a copy of the residual field.

    ``transform`` is the engine's non-linear form (module docstring): a composite of a
    linear transform and a displacement field transform, the field applied first.
    Raises TypeError for any other transform.
    """
    composite = transform if isinstance(transform, sitk.CompositeTransform) else None
    if composite is None and transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
    if composite is None or composite.GetNumberOfTransforms() != 2:
        raise TypeError("expected CompositeTransform([linear, DisplacementFieldTransform]), "
                        f"got {transform.GetName()}")
    linear, field = composite.GetNthTransform(0), composite.GetNthTransform(1)
    if not isinstance(field, sitk.DisplacementFieldTransform) or isinstance(
            linear, sitk.DisplacementFieldTransform | sitk.CompositeTransform):
        raise TypeError("expected CompositeTransform([linear, DisplacementFieldTransform]), "
                        f"got [{linear.GetName()}, {field.GetName()}]")
    return linear, field.GetDisplacementField()


def refinement_factor(size: tuple[int, ...], spacing_mm: float = np.inf,
                      min_spacing_mm: float = 0.0, budget: int = INVERSE_NODE_BUDGET,
                      largest: int = INVERSE_MAX_REFINEMENT) -> int:
    """The largest k <= ``largest`` whose refined grid ((n - 1) k + 1 nodes per axis) has
    at most ``budget`` nodes and nodes at least ``min_spacing_mm`` apart (``spacing_mm``:
    the grid's smallest spacing); 1 when even k = 2 breaks either."""
    for k in range(largest, 1, -1):
        if (float(np.prod([(n - 1) * k + 1 for n in size])) <= budget
                and spacing_mm / k >= min_spacing_mm * (1 - 1e-9)):
            return k
    return 1


def refine_field(field: sitk.Image, k: int) -> sitk.Image:
    """The same trilinear field on a grid k times finer with the same first and last nodes.

    Exact: a function linear between the coarse nodes is linear between the fine ones
    (every coarse node is a fine node), so the refined field defines the same mapping.
    """
    if k == 1:
        return sitk.Image(field)
    reference = sitk.Image([(n - 1) * k + 1 for n in field.GetSize()], field.GetPixelID(),
                           field.GetNumberOfComponentsPerPixel())
    reference.SetOrigin(field.GetOrigin())
    reference.SetDirection(field.GetDirection())
    reference.SetSpacing(tuple(s / k for s in field.GetSpacing()))
    return sitk.Resample(field, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                         field.GetPixelID())


def inverse_transform(transform: sitk.Transform, min_spacing_mm: float = 0.0,
                      budget: int = INVERSE_NODE_BUDGET
                      ) -> tuple[sitk.CompositeTransform, dict[str, Any]]:
    """T^-1 of T(x) = L(x + r(x)): moving point y -> fixed point R^-1(L^-1(y)) (LPS mm).

    L^-1 is exact; R(x) = x + r(x) is inverted numerically on r's own grid, refined
    first (:func:`refine_field`, by the largest factor up to 4 that keeps ``budget``
    nodes and nodes at least ``min_spacing_mm`` apart) because the inverse of a
    trilinear field is not trilinear: its values are computed at the nodes and
    interpolated between them, so a finer grid interpolates less. The deformable
    stage's control grid (4 working voxels) is refined 4x; a grid already at the
    images' voxel size (``min_spacing_mm``: the outputs pass the finer image's) is
    not, as nodes finer than the voxels that labels are drawn on gain nothing
    measurable (a 2.5 mm grid: max error 0.10 mm as it is, 0.02 mm at 3x the nodes
    per axis and 70x the time). Outside the grid r is zero and R^-1 the identity, as
    ITK's field transform has it. Returns
    ``CompositeTransform([DisplacementFieldTransform(r_inv), L^-1])`` (the last applied
    first) and facts for result.json (method, refinement).

    Why ``sitk.InvertDisplacementField`` (Tustison's fixed-point iteration) and not
    ``sitk.IterativeInverseDisplacementField``: measured on Gaussian bumps (sigma 16 mm,
    8 mm control grid refined 4x, error |R(R^-1(z)) - z| at random points): 6 mm bumps
    max 0.12 mm / p95 0.02 mm against 0.27 / 0.03, 12 mm bumps (strain ~0.45) 0.33 /
    0.04 against 1.40 / 0.13, at a fifth of the time. Without refinement the same
    6 mm bumps gave 0.61 / 0.15 mm. ``enforceBoundaryCondition`` is off: it zeroes the
    inverse on the grid's edge, but the engine's padded edge nodes carry displacement
    (they are optimised like the others).
    """
    linear, residual = split_mapping(transform)
    k = refinement_factor(residual.GetSize(), float(min(residual.GetSpacing())),
                          min_spacing_mm, budget)
    fine = refine_field(sitk.Cast(residual, sitk.sitkVectorFloat64), k)
    inverse_field = sitk.InvertDisplacementField(
        fine, maximumNumberOfIterations=INVERSE_ITERATIONS,
        maxErrorToleranceThreshold=INVERSE_MAX_ERROR_VOXELS,
        meanErrorToleranceThreshold=INVERSE_MEAN_ERROR_VOXELS,
        enforceBoundaryCondition=False)
    spacing = [float(v) for v in inverse_field.GetSpacing()]
    inverse = sitk.CompositeTransform(3)
    # (DisplacementFieldTransform takes the image's buffer: inverse_field is empty after.)
    inverse.AddTransform(sitk.DisplacementFieldTransform(inverse_field))
    inverse.AddTransform(linear.GetInverse())
    return inverse, {"method": "sitk.InvertDisplacementField of the residual field, linear "
                               "part inverted exactly",
                     "residual_grid_refinement": k, "inverse_grid_spacing_mm": spacing}


#: Moving voxels (at most) at which :func:`inverse_residual` checks the written inverse.
RESIDUAL_POINTS = 1_000_000


def inverse_residual(forward: sitk.Transform, inverse_field: sitk.Image,
                     fixed_region: sitk.Image | None = None,
                     max_points: int = RESIDUAL_POINTS) -> dict[str, Any]:
    """How far T(y + v(y)) lands from y (mm): the written inverse against the forward T.

    ``inverse_field`` is v on the moving grid (as written, float32); it is read at
    its own voxel centres (every k-th voxel per axis, at most ``max_points``), where
    it is exactly what a resampling onto the moving grid uses. ``fixed_region`` (a
    mask on any fixed-frame grid, non-zero inside) keeps the voxels y whose fixed
    point y + v(y) lies in it: the fixed foreground, where labels and contours are.
    Returns ``residual_max_mm``, ``residual_p95_mm``, ``residual_mean_mm`` and
    ``points`` (how many were checked; 0 and None figures when none is left).
    """
    size = np.asarray(inverse_field.GetSize())
    step = max(1, int(np.ceil((float(np.prod(size)) / max_points) ** (1 / 3) - 1e-9)))
    v = np.asarray(sitk.GetArrayViewFromImage(inverse_field)[::step, ::step, ::step],
                   dtype=np.float64)
    sample = sitk.GetImageFromArray(v, isVector=True)
    sample.SetOrigin(inverse_field.GetOrigin())
    sample.SetSpacing(tuple(float(s) * step for s in inverse_field.GetSpacing()))
    sample.SetDirection(inverse_field.GetDirection())
    keep = np.ones(v.shape[:3], dtype=bool)
    if fixed_region is not None:
        keep = sitk.GetArrayFromImage(sitk.Resample(
            fixed_region, sample, sitk.DisplacementFieldTransform(sitk.Image(sample)),
            sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    # T(y + v(y)) - y at the sample voxels, in one ITK pass over the composite.
    round_trip = sitk.CompositeTransform(3)
    round_trip.AddTransform(forward)
    round_trip.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(sample)))
    error = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        round_trip, sitk.sitkVectorFloat64, sample.GetSize(), sample.GetOrigin(),
        sample.GetSpacing(), sample.GetDirection()))
    distance = np.linalg.norm(error[keep], axis=-1)
    if distance.size == 0:
        return {"points": 0, "residual_max_mm": None, "residual_p95_mm": None,
                "residual_mean_mm": None}
    return {"points": int(distance.size), "residual_max_mm": float(distance.max()),
            "residual_p95_mm": float(np.percentile(distance, 95)),
            "residual_mean_mm": float(distance.mean())}
