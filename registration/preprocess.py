"""Preprocessing shared by registration, descriptor extraction and training.

Images are resampled to an isotropic working spacing (mm) on a grid that keeps
the direction cosines and covers the original field of view, then intensities
are z-scored robustly over the foreground. The network was trained on exactly
this normalisation (see the model card), so extraction must call these
functions rather than re-implementing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from disa.registration.errors import InputError

#: Percentiles that bound intensities before the z-score (metal, air, spikes).
CLIP_PERCENTILES = (0.5, 99.5)
#: Z-scored values are clipped to this range: outliers must not dominate descriptors.
Z_CLIP = 5.0
#: Voxels a working grid may hold by default: the engine's cap on one input
#: (io.InputLimits.max_voxels). One float32 copy of such a grid is 512 MiB and
#: preprocessing holds several, so a tiny --working-spacing must be refused here
#: rather than end in a MemoryError (or the OOM killer) many GB later.
MAX_WORKING_VOXELS = 512**3
# A context variable, not a parameter threaded through the pipeline: the worker
# applies DISA_MAX_VOXELS to every grid of the registrations it runs.
_working_voxel_limit: ContextVar[int] = ContextVar("working_voxel_limit",
                                                   default=MAX_WORKING_VOXELS)


@contextmanager
def working_voxel_limit(max_voxels: int) -> Iterator[None]:
    """Inside this block (this thread or task only), working grids hold at most
    ``max_voxels`` voxels instead of MAX_WORKING_VOXELS."""
    token = _working_voxel_limit.set(int(max_voxels))
    try:
        yield
    finally:
        _working_voxel_limit.reset(token)


def working_grid_size(size: Sequence[int], spacing: Sequence[float],
                      spacing_mm: float) -> tuple[int, ...]:
    """Voxels per axis of the grid ``resample_to_spacing`` makes (without ``direction``)
    for an image of ``size`` voxels of ``spacing`` mm, at isotropic ``spacing_mm``."""
    return tuple(max(1, round((n - 1) * s / spacing_mm) + 1)
                 for n, s in zip(size, spacing, strict=True))


def check_working_grid(size: Sequence[int], spacing_mm: float,
                       max_voxels: int | None = None, option: str = "--working-spacing",
                       role: str | None = None) -> None:
    """Raise InputError when a working grid of ``size`` voxels (at ``spacing_mm`` mm) holds
    more than ``max_voxels`` (default: the limit of ``working_voxel_limit``, else
    MAX_WORKING_VOXELS). The message names the option as the caller's user knows it
    (CLI flag, API field) and, given ``role``, the image ("fixed", "moving")."""
    limit = _working_voxel_limit.get() if max_voxels is None else max_voxels
    voxels = math.prod(int(n) for n in size)
    if voxels > limit:
        shape = " x ".join(str(int(n)) for n in size)
        image = f" for the {role} image" if role else ""
        raise InputError(f"{option} {spacing_mm:g} mm makes a working grid of {shape} "
                         f"voxels ({voxels:,}){image}, above the limit of {limit:,} voxels: "
                         f"choose a coarser {option}")


def antialias(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Smooth ``image`` (float32) before resampling it to ``spacing_mm``: a Gaussian with
    sigma^2 = (0.4 s_new)^2 - (0.4 s_old)^2 per axis, axes already coarse enough untouched."""
    source = sitk.Cast(image, sitk.sitkFloat32)
    for axis, old in enumerate(image.GetSpacing()):
        sigma_mm = float(np.sqrt(max((0.4 * spacing_mm) ** 2 - (0.4 * old) ** 2, 0.0)))
        if old < spacing_mm * 0.99 and sigma_mm > 0:
            source = sitk.RecursiveGaussian(source, sigma_mm, False,
                                            sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return source


def resample_to_spacing(image: sitk.Image, spacing_mm: float, interpolator: int = sitk.sitkLinear,
                        default_value: float | None = None, direction: np.ndarray | None = None,
                        smooth: bool = True,
                        bounds: tuple[np.ndarray, np.ndarray] | None = None,
                        align_voxels: int = 1) -> sitk.Image:
    """Resample ``image`` to isotropic ``spacing_mm`` over the same field of view.

    Without ``direction`` the new grid keeps origin and direction (voxel 0 stays
    at the same physical point) and extends to cover the old extent. With a 3x3
    ``direction`` the grid axes follow it and the grid covers the bounding box
    of the old field of view in that frame (voxels outside get
    ``default_value``, by default the image minimum). When coarsening, a
    Gaussian (``antialias``) suppresses aliasing first unless ``smooth`` is
    False (the caller has smoothed already).

    ``bounds`` (with ``direction`` only): (low, high) coordinates in mm along
    the new axes; the grid then covers only their intersection with the
    field of view's box, its first voxel a whole multiple of ``align_voxels``
    voxels from the uncropped grid's, so that the cropped grid's voxels (and
    the descriptor grid strided from them) coincide with the uncropped ones;
    bounds that miss the box entirely leave it whole.

    Raises InputError when the new grid would hold more voxels than the limit of
    ``check_working_grid`` (before anything is allocated).
    """
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise InputError(f"working spacing must be a positive number of mm, got {spacing_mm}")
    old_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    old_size = np.asarray(image.GetSize(), dtype=np.float64)
    new_size = np.maximum(1, np.round((old_size - 1) * old_spacing / spacing_mm).astype(int) + 1)
    origin = image.GetOrigin()
    new_direction = image.GetDirection()
    if direction is not None:
        corners = np.array([[i, j, k] for i in (0, old_size[0] - 1) for j in (0, old_size[1] - 1)
                            for k in (0, old_size[2] - 1)], dtype=np.float64)
        physical = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(c))
                             for c in corners])
        local = physical @ direction  # coordinates along the new axes
        low, high = local.min(axis=0), local.max(axis=0)
        if bounds is not None:
            step = spacing_mm * max(1, int(align_voxels))
            crop_low = low + step * np.floor(np.maximum(bounds[0] - low, 0.0) / step)
            crop_high = np.minimum(high, np.asarray(bounds[1], dtype=np.float64))
            if np.all(crop_high >= crop_low):  # (no overlap: keep the whole box)
                low, high = crop_low, crop_high
        new_size = np.maximum(1, np.ceil((high - low) / spacing_mm).astype(int) + 1)
        origin = tuple(float(v) for v in direction @ low)
        new_direction = tuple(float(v) for v in np.asarray(direction).ravel())
    check_working_grid(new_size, spacing_mm)
    source = sitk.Cast(image, sitk.sitkFloat32)
    if smooth and interpolator != sitk.sitkNearestNeighbor:
        source = antialias(source, spacing_mm)
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(
        source, [int(v) for v in new_size], sitk.Transform(), interpolator,
        origin, (float(spacing_mm),) * 3, new_direction, default_value,
        sitk.sitkFloat32,
    )


def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """Automatic foreground (bool, same shape): Otsu on a smoothed copy, dilated, holes filled.

    Generous on purpose: it only bounds the statistics and the similarity weights,
    so losing anatomy would cost more than keeping some background.
    """
    smooth = ndimage.uniform_filter(volume.astype(np.float32), size=3)
    finite = smooth[np.isfinite(smooth)]
    if finite.size == 0 or finite.max() <= finite.min():
        return np.zeros(volume.shape, dtype=bool)
    threshold = _otsu_threshold(finite)
    mask = smooth > threshold
    if mask.sum() < 0.01 * mask.size:
        # Sparse bright structures (a CT with mostly air): keep everything not at the minimum.
        mask = smooth > finite.min() + 1e-3 * (finite.max() - finite.min())
    mask = ndimage.binary_dilation(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    return mask


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


@dataclass(frozen=True)
class IntensityNormalisation:
    """A robust z-score fixed by one image's statistics (intensity units of that image).

    Kept with a prepared image so that the same image re-gridded later (the
    re-oriented refinement) maps the same tissue to the same values.
    """

    low: float
    high: float
    mean: float
    std: float

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """Clip to [low, high], subtract the mean, divide by the std, clip to +-5 (float32)."""
        # float64 bounds: the arithmetic runs in float64, as it always has (same bits).
        out = (np.clip(np.asarray(volume, dtype=np.float32), np.float64(self.low),
                       np.float64(self.high)) - self.mean) / self.std
        return np.clip(out, -Z_CLIP, Z_CLIP).astype(np.float32)


def intensity_normalisation(volume: np.ndarray, mask: np.ndarray | None = None,
                            role: str | None = None) -> IntensityNormalisation:
    """The robust z-score of ``volume``: the 0.5-99.5 percentiles of the foreground bound the
    intensities, whose mean and standard deviation then define it.

    ``mask`` selects the voxels whose statistics define the normalisation
    (default: the automatic foreground). ``role`` ("fixed", "moving") prefixes the
    InputError message, so that a user knows which input to look at.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(volume)
    values = volume[mask] if mask.any() else volume.ravel()
    lo, hi = np.percentile(values, CLIP_PERCENTILES)
    clipped = np.clip(values, lo, hi)
    mean = float(clipped.mean())
    std = float(clipped.std())
    if std <= 1e-8 * max(1.0, abs(mean)):
        raise InputError(labelled(role, "image has constant intensity over its foreground: "
                                         "nothing to register"))
    return IntensityNormalisation(float(lo), float(hi), mean, std)


def normalise_intensities(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Robust z-score (float32): clip to the 0.5-99.5 percentiles of the foreground, subtract
    the foreground mean, divide by its standard deviation, clip to +-5.

    ``mask`` selects the voxels whose statistics define the normalisation
    (default: the automatic foreground); every voxel is normalised.
    """
    return intensity_normalisation(volume, mask).apply(volume)


def local_std(volume: np.ndarray, radius: int) -> np.ndarray:
    """Standard deviation in a (2r+1)^3 cube around every voxel (same units as volume)."""
    size = 2 * radius + 1
    v = volume.astype(np.float64)
    mean = ndimage.uniform_filter(v, size=size, mode="nearest")
    mean_sq = ndimage.uniform_filter(v * v, size=size, mode="nearest")
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0)).astype(np.float32)


def mask_to_grid(mask: sitk.Image, reference: sitk.Image, role: str | None = None
                 ) -> np.ndarray:
    """A user mask (any grid, non-zero = inside) as a bool array on ``reference``'s grid.

    ``role`` ("fixed mask", "moving mask") prefixes the InputError message.
    """
    resampled = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkUInt8), reference, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(resampled).astype(bool)
    if not array.any():
        raise InputError(labelled(role, "mask does not overlap its image: check that it was "
                                         "drawn on that image"))
    return array


def labelled(role: str | None, message: str) -> str:
    """``message`` prefixed with the input it is about ("fixed: ..."), as io prefixes file
    names; unchanged without a role (callers outside a registration)."""
    return f"{role}: {message}" if role else message
