"""Preprocessing shared by registration, descriptor extraction and training.

Images are resampled to an isotropic working spacing (mm) on a grid that keeps
the direction cosines and covers the original field of view, then intensities
are z-scored robustly over the foreground. The network was trained on exactly
this normalisation (see the model card), so extraction must call these
functions rather than re-implementing them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from disa.core.errors import InputError

#: Percentiles that bound intensities before the z-score (metal, air, spikes).
CLIP_PERCENTILES = (0.5, 99.5)
#: Z-scored values are clipped to this range: outliers must not dominate descriptors.
Z_CLIP = 5.0
#: Voxels a working grid may hold by default: the engine's cap on one input
#: (io.InputLimits.max_voxels). One float32 copy of such a grid is 512 MiB and
#: preprocessing holds several, so a tiny --working-spacing must be refused here
#: rather than end in a MemoryError (or the OOM killer) many GB later.
MAX_WORKING_VOXELS = 512**3
#: Voxels per block of ``IntensityNormalisation.apply``: 2 MiB of float64, which stays
#: in a core's cache between the four passes over it.
_APPLY_BLOCK = 1 << 18
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
    more than ``max_voxels`` (default: MAX_WORKING_VOXELS). The message names the option
    as the caller's user knows it (CLI flag, API field) and, given ``role``, the image
    ("fixed", "moving")."""
    limit = MAX_WORKING_VOXELS if max_voxels is None else max_voxels
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


def masked_gaussian(image: sitk.Image, mask: sitk.Image, sigma_mm: float) -> sitk.Image:
    """``image`` (float32) smoothed by a Gaussian of ``sigma_mm`` inside ``mask`` only (a
    normalised convolution: the smoothed image over the smoothed mask), 0 outside it.

    Why normalised: an ultrasound sector is padded with zeros, and a plain Gaussian would
    darken its edge, which the field-of-view detection and the descriptors would then see
    as a structure; outside the mask the padding stays exactly what it was (0).
    """
    source = sitk.Cast(image, sitk.sitkFloat32)
    inside = sitk.Cast(mask > 0, sitk.sitkFloat32)
    inside.CopyInformation(source)
    weight = sitk.SmoothingRecursiveGaussian(inside, sigma_mm)
    smoothed = sitk.SmoothingRecursiveGaussian(source * inside, sigma_mm)
    out = sitk.Divide(smoothed, sitk.Maximum(weight, 1e-3)) * inside
    out.CopyInformation(source)
    return out


def resample_to_spacing(image: sitk.Image, spacing_mm: float, interpolator: int = sitk.sitkLinear,
                        default_value: float | None = None, direction: np.ndarray | None = None,
                        smooth: bool = True,
                        bounds: tuple[np.ndarray, np.ndarray] | None = None,
                        align_voxels: int = 1, max_voxels: int = MAX_WORKING_VOXELS
                        ) -> sitk.Image:
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

    Raises InputError when the new grid would hold more than ``max_voxels`` voxels
    (``check_working_grid``, before anything is allocated): the caller's cap, which a
    registration takes from its ``io.InputLimits`` (runner.run_registration).
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
    check_working_grid(new_size, spacing_mm, max_voxels)
    # (A float32 image is resampled as it is: a cast would copy every voxel of the input,
    # 0.04 s a call on a clinical CT, for the same values.)
    source = (image if image.GetPixelID() == sitk.sitkFloat32
              else sitk.Cast(image, sitk.sitkFloat32))
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

    Each step returns exactly what its plain scipy/numpy form returns (the 3^3 mean of
    ``ndimage.uniform_filter``, ``np.histogram``, ``ndimage.binary_dilation`` with 2
    iterations, ``ndimage.binary_fill_holes``; tests/core/test_preprocess.py
    compares them bit for bit), in about a third of the time on a 256^3 volume
    (benchmarks/README.md, "Cold disa descriptors").
    """
    volume = np.asarray(volume, dtype=np.float32)
    smooth = _box_mean3(volume)
    low, high = smooth.min(), smooth.max()  # NaN in, NaN out: then select the finite ones
    if np.isfinite(low) and np.isfinite(high):
        finite = smooth.reshape(-1)  # a view: every value is finite (no 64 MiB copy)
    else:
        finite = smooth[np.isfinite(smooth)]
        if finite.size == 0:
            return np.zeros(volume.shape, dtype=bool)
        low, high = finite.min(), finite.max()
    if high <= low:
        return np.zeros(volume.shape, dtype=bool)
    threshold = otsu_threshold(finite, value_range=(low, high))
    mask = smooth > threshold
    if np.count_nonzero(mask) < 0.01 * mask.size:
        # Sparse bright structures (a CT with mostly air): keep everything not at the minimum.
        mask = smooth > low + 1e-3 * (high - low)
    mask = _dilate_cross(mask, iterations=2)
    return _fill_holes(mask)


def _workers(parts: int) -> int:
    """Threads for ``parts`` independent pieces of work: at most the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(parts, cpus))


def _halves(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices that cover range(n)."""
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _box_mean3(volume: np.ndarray) -> np.ndarray:
    """``ndimage.uniform_filter(volume, size=3)`` of a float32 volume (float32, same bits),
    about 2.5x faster at 256^3, on up to 2 threads.

    scipy runs the separable mean one line at a time; along axis 0 its lines stride
    through the whole volume (0.45 of its 0.65 CPU s at 256^3). ``_mean3_axis0`` runs
    that pass plane by plane instead, with scipy's arithmetic; axes 1 and 2 stay
    scipy's. Each pass runs on two slabs cut along an axis it does not run along, so
    every line is whole and every voxel gets the one-thread value (scipy releases the
    GIL inside a pass).
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        return ndimage.uniform_filter(volume, size=3)
    out = np.empty_like(volume)
    workers = _workers(2)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda rows: _mean3_axis0(volume[:, rows], out[:, rows]),
                      _halves(volume.shape[1], workers)))
        for axis in (1, 2):
            # In place, as scipy's own uniform_filter runs its second and third passes.
            list(pool.map(lambda planes, axis=axis: ndimage.uniform_filter1d(
                out[planes], 3, axis=axis, output=out[planes]),
                _halves(volume.shape[0], workers)))
    return out


def _mean3_axis0(volume: np.ndarray, out: np.ndarray) -> None:
    """``ndimage.uniform_filter1d(volume, 3, axis=0, output=out)`` (mode "reflect"), as
    scipy computes it for every line: a running float64 sum of the window, x[-1] = x[0]
    and x[n] = x[n-1], each output the sum / 3, rounded to float32. Vectorised over
    whole (y, x) planes, whose rows are contiguous, instead of strided lines along z."""
    n = volume.shape[0]
    # inf - inf is NaN here as in scipy, which does not warn about it either.
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.add(volume[0], volume[0], dtype=np.float64)
        total += volume[min(1, n - 1)]
        np.divide(total, 3.0, out=out[0], casting="unsafe")
        step = np.empty_like(total)
        for k in range(1, n):
            np.subtract(volume[min(k + 1, n - 1)], volume[max(k - 2, 0)], out=step,
                        dtype=np.float64)
            total += step
            np.divide(total, 3.0, out=out[k], casting="unsafe")


def _dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``ndimage.binary_dilation(mask, iterations=...)`` (6-neighbour cross, nothing
    outside the array), by shifted in-place ORs: about 6x faster than scipy's."""
    for _ in range(iterations):
        grown = mask.copy()
        for axis in range(mask.ndim):
            head = tuple(slice(1, None) if a == axis else slice(None) for a in range(mask.ndim))
            tail = tuple(slice(None, -1) if a == axis else slice(None) for a in range(mask.ndim))
            grown[head] |= mask[tail]
            grown[tail] |= mask[head]
        mask = grown
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)``: background not 6-connected to the array's faces
    becomes foreground.

    One labelling of the background inside the foreground's bounding box instead of
    scipy's dilation until nothing changes (0.16 instead of 0.6-0.8 CPU s at 256^3).
    The box is enough: the background around it is one region that reaches the array's
    faces, and it touches every background voxel on the box's faces.
    """
    filled = mask.copy()
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return filled  # no foreground: all background reaches the faces
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    inside = mask[tuple(box)]
    labels, count = ndimage.label(~inside)  # default structure: 6-connectivity, as fill_holes
    if count == 0:
        return filled
    faces = [np.take(labels, side, axis=axis) for axis in range(mask.ndim) for side in (0, -1)]
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.concatenate([face.ravel() for face in faces])] = True
    outside[0] = False  # label 0: the foreground itself
    filled[tuple(box)] = ~outside[labels]
    return filled


def otsu_threshold(values: np.ndarray, bins: int = 256,
                    value_range: tuple[float, float] | None = None) -> float:
    """Otsu's threshold of a 1-D sample (maximises between-class variance).

    ``value_range``: ``(values.min(), values.max())`` when the caller knows them (as the
    array's own scalars, so that the bin edges are the ones ``np.histogram`` derives);
    the histogram is then counted in halves on 2 threads, same counts.
    """
    if value_range is None:
        hist, edges = np.histogram(values, bins=bins)
    else:
        parts = _halves(values.size, _workers(2))
        with ThreadPoolExecutor(len(parts)) as pool:
            counted = list(pool.map(
                lambda part: np.histogram(values[part], bins=bins, range=value_range), parts))
        hist, edges = sum(h for h, _ in counted), counted[0][1]
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
        volume = np.asarray(volume, dtype=np.float32)
        if not volume.flags.c_contiguous or volume.size < 2 * _APPLY_BLOCK:
            return self._apply_block(volume)
        # Large C-ordered volumes in blocks of 2 MiB of float64 on up to 2 threads: the
        # same elementwise float64 arithmetic (same bits), without three 8-byte-per-voxel
        # temporaries of the whole volume (1.5 GiB of memory traffic at 256^3).
        out = np.empty(volume.shape, dtype=np.float32)
        flat, flat_out = volume.reshape(-1), out.reshape(-1)
        starts = range(0, flat.size, _APPLY_BLOCK)

        def run(start: int) -> None:
            block = slice(start, start + _APPLY_BLOCK)
            flat_out[block] = self._apply_block(flat[block])

        with ThreadPoolExecutor(_workers(2)) as pool:
            list(pool.map(run, starts))
        return out

    def _apply_block(self, volume: np.ndarray) -> np.ndarray:
        # float64 bounds: the arithmetic runs in float64, as it always has (same bits).
        out = np.clip(volume, np.float64(self.low), np.float64(self.high))
        out -= self.mean
        out /= self.std
        np.clip(out, -Z_CLIP, Z_CLIP, out=out)
        return out.astype(np.float32)


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
