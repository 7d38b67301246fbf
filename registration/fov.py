"""Where an image has data: its field of view, detected from the header and the voxels.

A voxel has data when it lies inside the image buffer and outside the padding
that scanners and converters write around a partial field of view: the zeros
outside an ultrasound sector, the constant outside a CT reconstruction circle,
the fill value of a volume resampled onto a larger or oblique grid. Padding is
recognised as voxels exactly equal to one value (the image minimum or zero),
connected to the buffer's border, covering at least ``MIN_PADDING`` of it, and
ending in a cut: data next to it differs from it abruptly along a good part of
its border (``_is_cut``). Real background (air in MR or CT) is noisy and never
exactly constant, so it stays data; a template's or phantom's exact-zero
background fades smoothly into the skin, so it stays data too (the body outline
is information: a probe's compression is measured there). Where no exact padding
ends in a cut, a lossy export's ring or a smoothed edge may hide it: the padding is
then grown through near-equal voxels by a few voxels and tested again
(``grown_padding``, kept at zero or around a fan only). In a fan, padding
that lies behind an echo on its ray from the apex is an acoustic shadow that an
8-bit export rounded to zero, and data (``acoustic_shadows``).

The registration objective counts a sample point only where the other image
has data (objective.py), and the sampling image's own weights are restricted to
its data region eroded by the weight filter's radius, so that the artificial
edge of a sector or slab is never taken for structure.

Frames: masks are numpy (z, y, x) arrays on an image's own grid; resampling to
the working grid goes through physical space (LPS mm) like the image itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from disa.core.grid import Grid
from disa.core.preprocess import otsu_threshold

#: Smallest fraction of the buffer that counts as padding (below: stray equal voxels).
MIN_PADDING = 0.01
#: Largest: an image (nearly) all of one value is a constant image, which preprocessing
#: refuses with its own message, not an image whose data is all padding. (0.98 missed a
#: 20 ml ultrasound fan on a 1 l head grid: 1.8 % data.)
MAX_PADDING = 0.995


@dataclass(frozen=True)
class DataRegion:
    """The data region of an image on its own grid, and what was found.

    ``mask`` is a uint8 SimpleITK image on the image's grid (1 = data).
    ``padding_fraction`` is the fraction of the buffer found to be padding and
    ``padding_value`` its value (None when there is none).
    """

    mask: sitk.Image
    padding_fraction: float
    padding_value: float | None
    #: Which faces of the buffer (``FACES`` order) the image meets in air (``open_faces``):
    #: beyond them lies background, not unknown anatomy.
    open_faces: tuple[bool, ...] = (False,) * 6
    #: Otsu's threshold of the data's intensities (air below it), None when not measured.
    tissue_threshold: float | None = None
    #: The median intensity of the data below that threshold: what stands for the air
    #: beyond an open face when the image is resampled (None when not measured).
    air_value: float | None = None

    @property
    def air_fill(self) -> float | None:
        """The value to resample outside the buffer with: the air, where a face is open
        (a point there counts as data); None (the caller's default) where none is."""
        return self.air_value if any(self.open_faces) else None

    @property
    def has_padding(self) -> bool:
        return self.padding_value is not None


def border_connected(equal: np.ndarray) -> np.ndarray:
    """The voxels of ``equal`` (bool) connected (6-neighbourhood) to the array's border."""
    labels, count = ndimage.label(equal)
    if count == 0:
        return np.zeros_like(equal)
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(3):
        for index in (0, -1):
            border[np.unique(np.take(labels, index, axis=axis))] = True
    border[0] = False
    return border[labels]


#: Padding ends in a cut: at least this fraction of the data voxels along its border differ
#: from the padding value by more than CUT_CONTRAST of the data's intensity range.
CUT_FRACTION = 0.15  # fans shadowed past 40 % depth: ~0.2; templates fading to 0: ~0.06
CUT_CONTRAST = 0.05

#: Padding that an export left inexact (a lossy codec's ring of values 0-5 of 255 around a
#: fan, a smoothed slab's ramp) is grown from the exact padding by at most
#: PADDING_GROWTH_VOXELS voxels through voxels within PADDING_TOLERANCE of the data's
#: intensity range of the padding value. Bounded because dark anatomy next to padding
#: (an MR's air where a resampling wrote exact zeros) must stay data: its skin edge is
#: information, and unbounded growth would take the whole background.
PADDING_TOLERANCE = 0.03
PADDING_GROWTH_VOXELS = 4


def _contrast(array: np.ndarray, padding: np.ndarray) -> float:
    """The intensity range of the data outside ``padding`` (1st to 99th percentile)."""
    data = array[~padding]
    low, high = np.percentile(data[:: max(1, data.size // 200_000)], (1, 99))
    return max(float(high - low), 1e-12)


def _is_cut(array: np.ndarray, padding: np.ndarray, value: float) -> bool:
    """Whether the data along the padding's border ends abruptly (a sector, a slab, a crop,
    a reconstruction circle) rather than fading into it (a template's exact-zero
    background around a smooth skin edge, which is anatomy and must stay data)."""
    border = ndimage.binary_dilation(padding) & ~padding
    if not border.any():
        return False
    far = (np.abs(array[border].astype(np.float64) - value)
           > CUT_CONTRAST * _contrast(array, padding))
    return bool(far.mean() >= CUT_FRACTION)


def grown_padding(array: np.ndarray, padding: np.ndarray, value: float) -> np.ndarray:
    """``padding`` grown through the voxels near ``value`` (``PADDING_TOLERANCE``), by at
    most ``PADDING_GROWTH_VOXELS`` voxels (6-neighbourhood steps)."""
    near = (np.abs(array.astype(np.float32) - np.float32(value))
            <= PADDING_TOLERANCE * _contrast(array, padding))
    return ndimage.binary_dilation(padding, iterations=PADDING_GROWTH_VOXELS, mask=near)


def _padding(array: np.ndarray, spacing_xyz: tuple[float, ...]
             ) -> tuple[np.ndarray, float | None]:
    """The largest padding of ``array`` that ends in a cut, and its value (None: none).

    Exact padding first; only where none ends in a cut is each candidate grown through
    near-equal voxels (``grown_padding``) and tested again, so that a clean export's
    region is the exact one, and the grown padding is kept only at the value 0 or around
    a fan (a data region shaped like a sector, ``_sector_axis``)."""
    candidates = []
    for candidate in sorted({float(array.min()), 0.0}):
        equal = array == candidate
        if equal.mean() < MIN_PADDING:
            continue
        padding = border_connected(equal)
        if MIN_PADDING <= padding.mean() <= MAX_PADDING:
            candidates.append((candidate, padding))
    for grow in (False, True):
        best = np.zeros(array.shape, dtype=bool)
        value: float | None = None
        for candidate, padding in candidates:
            if grow:
                padding = grown_padding(array, padding, candidate)
                if padding.mean() > MAX_PADDING:
                    continue
            if padding.sum() > best.sum() and _is_cut(array, padding, candidate):
                best, value = padding, candidate
        # Grown padding only at zero (what scanners and converters write around a fan or
        # a slab) or where it outlines a fan, where it was measured: a torso MR phantom
        # whose air is one constant above zero took the growth too and fell from 0.5 to
        # 2.3 mm. (Around 2 of 12 lossy fans, mostly in shadow, no sector is found.)
        if value is not None and (not grow or value == 0.0
                                  or _sector_axis(~best, spacing_xyz) is not None):
            return best, value
    return np.zeros(array.shape, dtype=bool), None


def data_region(image: sitk.Image) -> DataRegion:
    """The voxels of ``image`` that hold data: inside the buffer, outside the padding."""
    best, value = _padding(sitk.GetArrayViewFromImage(image), image.GetSpacing())
    if value is not None:
        # An 8-bit ultrasound's shadows are exact zeros too: data, not padding.
        best &= ~acoustic_shadows(best, image.GetSpacing())
    mask = sitk.GetImageFromArray((~best).astype(np.uint8))
    mask.CopyInformation(image)
    array = sitk.GetArrayViewFromImage(image)
    threshold, air = tissue_threshold(array, best)
    return DataRegion(mask, float(best.mean()), value, open_faces(array, best, threshold),
                      threshold, air)


#: The buffer's faces in the order of ``DataRegion.open_faces``: along index x, y, z, the
#: low end then the high end.
FACES = ("x low", "x high", "y low", "y high", "z low", "z high")
#: A face is open (the image meets air there) when at least OPEN_FACE_DATA of its voxels
#: are data (not padding) and at most OPEN_FACE_TISSUE of those lie above the tissue
#: threshold. A neck or a crop through the body puts 10-100 % of a face above it; the
#: realistic head MRs' air faces 0-0.3 %; an ultrasound's box faces are mostly padding,
#: and speckle where they are not (docs/DESIGN.md, "Open faces"). Beyond an open face's
#: padded part the image stays unknown: there the face voxel's own data region decides.
OPEN_FACE_DATA = 0.25
OPEN_FACE_TISSUE = 0.02
#: Voxels of the regular subsample that the tissue threshold is computed on.
THRESHOLD_SAMPLE = 1_000_000


def tissue_threshold(array: np.ndarray, padding: np.ndarray
                     ) -> tuple[float | None, float | None]:
    """(Otsu's threshold between air and tissue, the median of the data below it), in the
    image's intensity units, over the data voxels (outside ``padding``) of a regular
    subsample; (None, None) without data that varies."""
    step = max(1, round((array.size / THRESHOLD_SAMPLE) ** (1 / 3)))
    data = np.asarray(array[::step, ::step, ::step])[~padding[::step, ::step, ::step]]
    data = data[np.isfinite(data)].astype(np.float32, copy=False)
    if data.size == 0 or data.min() == data.max():
        return None, None
    threshold = float(otsu_threshold(data))
    return threshold, float(np.median(data[data <= threshold]))


def open_faces(array: np.ndarray, padding: np.ndarray, threshold: float | None
               ) -> tuple[bool, ...]:
    """Which faces of the buffer (``FACES`` order) the image meets in air: a good part of
    the face is data (``OPEN_FACE_DATA``) and (nearly) none of that is above ``threshold``.

    Why: a head MR or CT framed by air says what lies beyond its box, air; a crop, a slab
    or a sector does not. The objective treats a point beyond an open face as air
    (kernels.py) instead of leaving it out, so that a partial view can no longer improve
    its score by sliding out of the other image's box (docs/DESIGN.md, "Open faces")."""
    if threshold is None:
        return (False,) * 6
    faces = []
    for axis in (2, 1, 0):  # numpy axes of x, y, z
        for end in (0, -1):
            face = np.take(array, end, axis=axis)
            data = ~np.take(padding, end, axis=axis)
            if data.mean() < OPEN_FACE_DATA:
                faces.append(False)
                continue
            tissue = np.count_nonzero(face[data] > threshold) / max(1, np.count_nonzero(data))
            faces.append(bool(tissue <= OPEN_FACE_TISSUE))
    return tuple(faces)


#: A sector narrows to its probe: along one of its principal axes the data region's
#: cross-section over the first 3 of 20 slabs is at most SECTOR_NEAR of its largest,
#: and over the last 3 at least SECTOR_FAR (benchmark fans: near 0.01-0.08, far
#: 0.21-0.81, the far end cut short by shadows in some; a skull-stripped brain
#: 0.12-0.28 at the near end, a slab or crop ~1 at both ends).
SECTOR_NEAR = 0.08
SECTOR_FAR = 0.2


def _widening_axis(points: np.ndarray) -> np.ndarray | None:
    """The principal axis (unit, signed) of ``points`` (centred, mm) along which their
    cross-section widens from an apex to a wide far end (SECTOR_NEAR, SECTOR_FAR)."""
    _, _, axes = np.linalg.svd(points, full_matrices=False)
    for axis in axes:
        for sign in (1.0, -1.0):
            counts, _ = np.histogram(sign * (points @ axis), bins=20)
            peak = max(int(counts.max()), 1)
            if (counts[:3].mean() / peak <= SECTOR_NEAR
                    and counts[-3:].mean() / peak >= SECTOR_FAR):
                return sign * axis
    return None


#: Voxels of the coarse grid on which a data region's convex hull is filled.
HULL_VOXELS = 1 << 17


def _hull_points(data: np.ndarray, spacing_xyz: np.ndarray) -> np.ndarray | None:
    """The voxels of a coarse grid (at most ``HULL_VOXELS``) inside the convex hull of
    ``data`` (bool, z, y, x), as physical offsets (mm, x y z) less their mean; None when
    the hull is degenerate (flat or a few voxels)."""
    from scipy.spatial import ConvexHull, Delaunay, QhullError

    step = max(1, int(np.ceil((data.size / HULL_VOXELS) ** (1 / 3))))
    coarse = data[::step, ::step, ::step]
    if np.count_nonzero(coarse) < 64:
        return None
    # The hull's vertices lie on the region's surface: only those voxels go to Qhull.
    surface = np.argwhere(coarse & ~ndimage.binary_erosion(coarse)).astype(np.float64)
    try:
        hull = Delaunay(surface[ConvexHull(surface).vertices])
    except QhullError:
        return None
    grid = np.argwhere(np.ones(coarse.shape, dtype=bool)).astype(np.float64)
    inside = grid[hull.find_simplex(grid) >= 0]
    points = inside[:, ::-1] * step * spacing_xyz
    return points - points.mean(axis=0)


def _sector_axis(data: np.ndarray, spacing_xyz: tuple[float, ...] | np.ndarray,
                 max_points: int = 200_000
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(points, beam, centre): a subsample of ``data``'s voxels (bool, z, y, x) as
    physical offsets (mm on the image's axes from voxel 0, x y z) less their mean
    ``centre``, and the unit axis along which they widen from an apex to a wide far end,
    like the fan of an ultrasound probe; None when they do not (a brain with its
    background zeroed, a slab, a crop).

    The axis is looked for on the data's convex hull first, then on the data: a fan
    mostly in shadow keeps a hull shaped like the fan, while its lit voxels alone can
    widen along another axis too (a fan whose bright band runs across it)."""
    # A regular stride of the grid before listing voxels: a 512^3 mask would otherwise list
    # ~10^8 indices (GBs) to keep a few hundred thousand.
    step = max(1, int(np.ceil((data.size / (8 * max_points)) ** (1 / 3))))
    voxels = np.argwhere(data[::step, ::step, ::step])
    if len(voxels) < 64:
        return None
    voxels = voxels[:: max(1, len(voxels) // max_points)].astype(np.float64) * step
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    # Physical offsets (mm, on the image's axes: the shape does not depend on where).
    points = voxels[:, ::-1] * spacing
    centre = points.mean(axis=0)
    points -= centre
    hull = _hull_points(data, spacing)
    beam = _widening_axis(hull) if hull is not None else None
    if beam is None:
        beam = _widening_axis(points)
    return None if beam is None else (points, beam, centre)


def sector_shaped(region: DataRegion, max_points: int = 200_000) -> bool:
    """Whether ``region``'s data narrows from a wide far end to an apex, like the fan of
    an ultrasound probe (and unlike a brain with its background zeroed, a slab or a
    crop, whose padding is just as exact)."""
    mask = sitk.GetArrayViewFromImage(region.mask) > 0
    return _sector_axis(mask, region.mask.GetSpacing(), max_points) is not None


def sector_apex(points: np.ndarray, beam: np.ndarray, centre: np.ndarray
                ) -> np.ndarray | None:
    """The apex (mm, x y z, as ``_sector_axis``'s offsets) of a fan: where its lateral
    spread, which grows linearly with depth, reaches zero, on its centre line followed
    back (both fitted on the near half, which shadows rarely reach). None when the data
    does not widen with depth."""
    depth = points @ beam
    lateral = points - depth[:, None] * beam
    edges = np.linspace(depth.min(), depth.max(), 21)
    which = np.clip(np.digitize(depth, edges) - 1, 0, 19)
    near = [i for i in range(10) if np.count_nonzero(which == i) >= 8]
    if len(near) < 3:
        return None
    middle = np.array([lateral[which == i].mean(axis=0) for i in near])
    spread = [float(np.sqrt(np.mean(np.sum((lateral[which == i] - m) ** 2, axis=1))))
              for i, m in zip(near, middle, strict=True)]
    slab_depth = (edges[near] + edges[np.array(near) + 1]) / 2
    slope, intercept = np.polyfit(slab_depth, spread, 1)
    if slope <= 0.05:
        return None
    apex_depth = -intercept / slope
    line = np.polyfit(slab_depth, middle, 1)  # (2, 3): the centre line's slope, intercept
    return centre + apex_depth * beam + line[0] * apex_depth + line[1]


#: Angular bins (radians) of the shadow test's map of ray directions from the apex.
SHADOW_BIN_RAD = np.deg2rad(2.0)
#: No shadow is found nearer the apex than this fraction of the fan's depth.
SHADOW_NEAREST = 0.25
#: The fan's far edge: this percentile of the data's distances from the apex.
SHADOW_FAR_PERCENTILE = 99.5
#: Voxels listed at a time by the shadow test (a few planes of the grid).
SHADOW_BLOCK_VOXELS = 1 << 21


def acoustic_shadows(padding: np.ndarray, spacing_xyz: tuple[float, ...] | np.ndarray
                     ) -> np.ndarray:
    """The voxels of ``padding`` (bool, z, y, x) that lie in a sector-shaped field of view
    behind its first echo on their ray from the apex: an ultrasound's acoustic shadows,
    rounded to the padding value (an 8-bit export writes them as exact zeros, which touch
    the zeros outside the fan through its far edge). All False when the data is no sector.

    Directions are binned (SHADOW_BIN_RAD about two axes across the beam). The fan's
    directions are the bins that hold data, holes filled, one bin taken off their rim
    (the lateral faces cut bins obliquely); a voxel in one of them is a shadow when it
    lies beyond the nearest data of its bin and before the fan's far edge, an arc about
    the apex (SHADOW_FAR_PERCENTILE). Distances in mm on the image's own axes.
    """
    out = np.zeros(padding.shape, dtype=bool)
    found = _sector_axis(~padding, spacing_xyz)
    if found is None:
        return out
    apex = sector_apex(*found)
    if apex is None:
        return out
    beam = found[1]
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    e1 = np.cross(beam, [1.0, 0.0, 0.0] if abs(beam[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(beam, e1)
    n_bins = int(np.ceil(np.pi / SHADOW_BIN_RAD))

    def rays(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        offset = index[:, ::-1] * spacing - apex
        along = offset @ beam
        u = np.floor((np.arctan2(offset @ e1, along) + np.pi / 2) / SHADOW_BIN_RAD)
        v = np.floor((np.arctan2(offset @ e2, along) + np.pi / 2) / SHADOW_BIN_RAD)
        return (np.clip(u, 0, n_bins - 1).astype(np.int64),
                np.clip(v, 0, n_bins - 1).astype(np.int64),
                np.linalg.norm(offset, axis=1), along)

    def blocks(mask: np.ndarray) -> Iterator[np.ndarray]:
        """Voxel indices (N, 3) of ``mask``, a few planes at a time."""
        # (Bounded memory: listing every voxel of a 512^3 grid at once takes GBs.)
        planes = max(1, SHADOW_BLOCK_VOXELS // max(1, mask[0].size))
        for z0 in range(0, mask.shape[0], planes):
            index = np.argwhere(mask[z0:z0 + planes])
            index[:, 0] += z0
            yield index

    nearest = np.full((n_bins, n_bins), np.inf)
    radii = []
    # (Every data voxel's distance for the far edge's percentile, up to ~4 M of them.)
    keep = max(1, int(np.count_nonzero(~padding)) // 4_000_000)
    for index in blocks(~padding):
        u, v, r, _ = rays(index.astype(np.float64))
        np.minimum.at(nearest, (u, v), r)
        radii.append(r[::keep])
    fan = ndimage.binary_erosion(ndimage.binary_fill_holes(np.isfinite(nearest)))
    # A fan's far edge is an arc about its (real or virtual) apex: one depth for all rays,
    # which the rays that no shadow cuts short reach.
    far = float(np.percentile(np.concatenate(radii), SHADOW_FAR_PERCENTILE))
    for index in blocks(padding):
        u, v, r, along = rays(index.astype(np.float64))
        # (Not in the fan's first SHADOW_NEAREST of depth, where bins are narrower than a
        # voxel and the lateral faces cut them.)
        behind = ((along > 0) & fan[u, v] & (r > nearest[u, v]) & (r <= far)
                  & (r >= SHADOW_NEAREST * far))
        out[tuple(index[behind].T)] = True
    return out


def regions_on_grid(region: sitk.Image, reference: sitk.Image,
                    open_faces: tuple[bool, ...] = (False,) * 6
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The data region resampled onto ``reference``'s grid as bool (z, y, x) masks, True
    where more than half of the interpolated region has data: (fov, unpadded). Outside
    the region's buffer, fov is False (no data: the field of view) unless the point lies
    beyond open faces only (``open_faces``, ``FACES`` order of the region's buffer) and the
    face's nearest voxel has data: air there, which the resampler's fill stands for.
    Unpadded is True outside the buffer (only the padding counts there, what erosion
    applies to).

    One resampling for both: ITK's resampler gives a point outside the buffer the
    default value and never blends it with the buffer's voxels, so a default of -1
    tells those points apart (tests/registration/test_fov.py checks it against two
    resamplings with defaults 0 and 1). The uint8 region is interpolated as it is (ITK
    interpolates in double and writes float32: the values of a float32 copy, without
    copying a clinical CT's 70 M voxels each call)."""
    on_grid = sitk.GetArrayFromImage(sitk.Resample(
        region, reference, sitk.Transform(), sitk.sitkLinear, -1.0, sitk.sitkFloat32))
    fov = on_grid > 0.5
    outside = on_grid == -1.0
    if any(open_faces) and outside.any():
        fov |= outside & _air_beyond_open_faces(region, reference, open_faces)
    return fov, fov | outside


def _air_beyond_open_faces(region: sitk.Image, reference: sitk.Image,
                           open_faces: tuple[bool, ...]) -> np.ndarray:
    """Bool (z, y, x) on ``reference``'s grid: the voxels that lie past some face of
    ``region``'s buffer (half a voxel past its end voxels, ITK's inside test for linear
    interpolation), past open faces only, and whose nearest buffer voxel has data (the
    face carried on, as the objective's kernels carry a map's open face on).

    The region's continuous index is affine in the reference's index, so each axis's is a
    sum of three broadcast rows: no per-voxel coordinates (an argwhere and a matrix
    product over the outside voxels took 0.5 s a registration on a slab's bins)."""
    # reference index (x, y, z, 1) -> region index, both through LPS mm
    to_region = (Grid.from_image(region).physical_to_index
                 @ Grid.from_image(reference).index_to_physical)
    offset = to_region[:3, 3]
    nx, ny, nz = reference.GetSize()
    rows = [np.arange(n, dtype=np.float32) for n in (nx, ny, nz)]
    past = np.zeros((nz, ny, nx), dtype=bool)
    blocked = np.zeros((nz, ny, nx), dtype=bool)
    nearest = []
    for axis, size in enumerate(region.GetSize()):
        index = ((to_region[axis, 0] * rows[0])[None, None, :]
                 + (to_region[axis, 1] * rows[1])[None, :, None]
                 + (to_region[axis, 2] * rows[2])[:, None, None] + np.float32(offset[axis]))
        below, above = index < -0.5, index > size - 0.5
        past |= below | above
        if not open_faces[2 * axis]:
            blocked |= below
        if not open_faces[2 * axis + 1]:
            blocked |= above
        nearest.append(np.clip(np.rint(index), 0, size - 1).astype(np.int32))
    # (A voxel ITK found outside but within half a voxel here, by rounding: no face.)
    air = past & ~blocked
    if air.any():
        data = sitk.GetArrayViewFromImage(region)
        air[air] = data[nearest[2][air], nearest[1][air], nearest[0][air]] > 0
    return air


def grid_open_faces(fov: np.ndarray, raw: np.ndarray, region: DataRegion
                    ) -> tuple[bool, ...]:
    """Which faces of a working grid (``FACES`` order; ``fov`` and ``raw``, the resampled
    intensities, (z, y, x) on it) lie in air: none where no face of the image's buffer
    is open (``region``), else as ``open_faces``, with ``fov`` (data, or air beyond an
    open face of the buffer: ``regions_on_grid``) for the data. The objective carries
    such a face's descriptors and validity on beyond it (kernels.py), so where the face
    has no data (past a closed face of the buffer, padding) nothing beyond it has."""
    if not any(region.open_faces):
        return (False,) * 6
    return open_faces(raw, ~fov, region.tissue_threshold)


def mapped_inside(region: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                  margin_mm: float) -> sitk.Image:
    """The voxels of ``reference``'s grid (uint8 image, 1 = inside) that ``transform``
    (reference physical point -> ``region``'s physical point, LPS mm) maps at least
    ``margin_mm`` inside ``region`` (a data region's mask; its buffer's faces count as
    its edge too: a slab's anatomy goes on beyond them)."""
    padded = sitk.ConstantPad(region, [1, 1, 1], [1, 1, 1], 0)
    depth = sitk.SignedMaurerDistanceMap(padded, insideIsPositive=True, squaredDistance=False,
                                         useImageSpacing=True)
    on_reference = sitk.Resample(depth, reference, transform, sitk.sitkLinear, -1.0,
                                 sitk.sitkFloat32)
    return sitk.Cast(on_reference > margin_mm, sitk.sitkUInt8)


def eroded(mask: np.ndarray, voxels: int) -> np.ndarray:
    """``mask`` eroded by a cube of half-width ``voxels`` away from its own edges only.

    Outside the array counts as inside the mask: the edge of a grid is where the working
    grid ends, not where the data does (the buffer's edge carries no artificial contrast,
    and eroding it cost the probe phantom its compression, measured at the surface).
    """
    if voxels <= 0:
        return mask.copy()
    size = 2 * voxels + 1
    # Separable minimum filter: a cube erosion in three 1-D passes.
    out = mask.astype(np.uint8)
    for axis in range(3):
        out = ndimage.minimum_filter1d(out, size, axis=axis, mode="constant", cval=1)
    return out.astype(bool)


def physical_volume_ml(mask: np.ndarray, spacing_mm: float) -> float:
    """Volume (ml) of a mask on an isotropic grid of ``spacing_mm``."""
    return float(mask.sum()) * spacing_mm ** 3 / 1000.0
