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
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from disa.registration.grid import Grid


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


def jacobian_metrics(displacement: sitk.Image, border: int = 2, slab: int = 16
                     ) -> dict[str, float]:
    """Folding and smoothness of x -> x + u(x) on the field's own grid.

    det J with J = I + du/dx (central differences, physical derivatives through
    the grid's direction and spacing), over the voxels at least ``border``
    voxels from the edge (Learn2Reg's convention: one-sided differences at the
    edge say nothing about the mapping). Along an axis too short for that border
    (a thin volume: the pipeline accepts 4 slices) the border shrinks to the
    largest that leaves a voxel, never below 1 (central differences need both
    neighbours; an axis of under 3 voxels leaves none and the identity's values
    are returned). Returns the fraction of det J <= 0, the standard deviation of
    log det J (SDlogJ, det clipped at 1e-9) and the range of det J. Works in
    z-slabs so memory stays small for large grids.
    """
    u = sitk.GetArrayViewFromImage(displacement)  # (z, y, x, 3)
    a = (np.asarray(displacement.GetDirection()).reshape(3, 3)
         * np.asarray(displacement.GetSpacing())[None, :])
    b = np.linalg.inv(a)
    nz, ny, nx = u.shape[:3]
    # Per-axis border: with one border for all axes, a 4-slice volume had no voxel left
    # and reported det J = 1 everywhere (no folding, SDlogJ 0) whatever the field.
    bz, by, bx = (max(1, min(border, (n - 1) // 2)) for n in (nz, ny, nx))
    count = negative = 0
    total = total_sq = 0.0
    low, high = np.inf, -np.inf
    for z0 in range(bz, nz - bz, slab):
        z1 = min(nz - bz, z0 + slab)
        block = np.asarray(u[z0 - 1:z1 + 1], dtype=np.float64)
        ys, xs = slice(by, ny - by), slice(bx, nx - bx)
        gx = (block[1:-1, ys, bx + 1:nx - bx + 1] - block[1:-1, ys, bx - 1:nx - bx - 1]) / 2
        gy = (block[1:-1, by + 1:ny - by + 1, xs] - block[1:-1, by - 1:ny - by - 1, xs]) / 2
        gz = (block[2:, ys, xs] - block[:-2, ys, xs]) / 2
        g = np.stack([gx, gy, gz], axis=-1)  # (..., component i, index axis k)
        jac = np.eye(3) + g @ b
        det = np.linalg.det(jac)
        count += det.size
        negative += int(np.count_nonzero(det <= 0))
        log = np.log(np.clip(det, 1e-9, None))
        total += float(log.sum())
        total_sq += float((log**2).sum())
        low, high = min(low, float(det.min())), max(high, float(det.max()))
    if count == 0:
        return {"negative_jacobian_fraction": 0.0, "sd_log_jacobian": 0.0,
                "jacobian_min": 1.0, "jacobian_max": 1.0}
    mean = total / count
    return {"negative_jacobian_fraction": negative / count,
            "sd_log_jacobian": float(np.sqrt(max(total_sq / count - mean**2, 0.0))),
            "jacobian_min": low, "jacobian_max": high}
