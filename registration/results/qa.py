"""The QA picture of a registration result (``qa.png`` in the result folder).

Three orthogonal planes through one physical point, each resampled from
physical space onto square pixels so that anisotropic voxels and oblique
direction matrices still give anatomically proportioned pictures. Rows compare
the fixed image with the moving image before registration (initial transform)
and after it, as

* overlay: fixed in the green channel, moving in red + blue (magenta), so
  agreeing structure looks grey and misalignment shows green/magenta fringes;
* checkerboard: alternating tiles of fixed and moving, both in grey, so
  edges that continue across tile borders mean alignment;

and, for deformable results, the displacement magnitude with the fixed grid
drawn where the transform sends it (the ITK convention: a fixed point p maps to
p + u(p) in the moving image; the in-plane part of u is drawn), and, given a
:class:`~disa.registration.transform.displacement.JacobianSummary`, a row of det J of
p -> p + u(p): a diverging colour map on a log scale centred on 1 (blue:
volume shrinks from fixed to moving, red: it grows; green: det J <= 0, folding),
dimmed outside the fixed foreground. The row's label column carries the colour
bar and the figures inside the foreground (min, 1st and 99th percentiles, the
folded fraction), the numbers result.json's ``deformation.foreground_jacobian``
records.

Coordinates and display convention: SimpleITK physical space, LPS millimetres
(+x = patient Left, +y = Posterior, +z = Superior); numpy arrays of SimpleITK
images are indexed (z, y, x). Panels are shown in the radiological view:
axial seen from the feet (patient Right on the viewer's left, Anterior up),
coronal seen from the front (Right on the left, Superior up), sagittal seen
from the patient's left (Anterior on the left, Superior up). Every panel
carries its orientation letters on its edges and the picture states the
convention in its footer.

Where the planes pass (:func:`view_centre`). A moving image often covers only
part of the fixed field of view (a 3D ultrasound sector of a few cm, an MR slab
over part of a CT), so planes through the fixed image centre can miss it
entirely. Given the moving image and the result transform T (fixed point ->
moving point), the planes pass through the centre of the *overlap*: the fixed
points x whose T(x) falls in the moving image's data region
(:func:`moving_data_mask`: its voxel buffer, less the constant padding around
an ultrasound sector). The centre is the centroid of the overlap within the
fixed image's foreground, weighted towards structure (fixed gradient
magnitude) so that the slices show anatomy rather than a uniform organ's
middle; should that centroid fall outside a non-convex overlap, the nearest
overlap sample is taken, so the three planes always cut the moving data. With
no overlap at all (or no moving image given) the planes pass through the fixed
image centre, and the footer says which of these was used. result.json records
the point (``view_point_mm``) and the web viewer starts its slices there.

The "before" rows use the same planes as the "after" rows. A reviewer compares
a row pair panel by panel: with the same fixed anatomy (green channel) in
both, every difference between them is the moving image's change of pose.
Planes centred on the initial overlap instead would change the fixed channel
too, and the after rows are the ones whose anatomy the reviewer must judge.
Where the moving data sat before registration shows as its outline (below),
or, when it misses these planes altogether, as an empty moving channel: that
is itself the finding (the initial pose was far off here). Before and after
share one moving display window, taken from the moving image's data region:
percentiles over the whole registered image would be those of its fill where
a small field of view meets a large fixed grid (the data then shows as flat
white), and one window shows the moving intensities alike in both rows.

Outline: given the moving image, each before/after panel draws the edge of
the moving data region mapped by that row's transform as a dotted cyan line
(dotted so that the overlay's fringes under it stay readable; absent where the
moving data covers the whole panel).

Rendering uses Pillow, numpy and scipy.ndimage (no matplotlib in the runtime).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from disa.core.atomic import atomic_write
from disa.core.preprocess import foreground_mask
from disa.registration.fov import border_connected
from disa.registration.transform.displacement import JacobianSummary

__all__ = [
    "PLANES",
    "PlaneGrid",
    "QALayout",
    "ViewCentre",
    "fixed_centre",
    "moving_data_mask",
    "plane_grids",
    "qa_layout",
    "render_qa",
    "view_centre",
]

Mode = Literal["overlay", "checkerboard", "both"]
Box = tuple[int, int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

PLANES = ("axial", "coronal", "sagittal")

# LPS unit vectors of each panel: (column direction, row direction, normal).
# Rows run downwards on screen, so "Superior up" means rows along -z.
_PLANE_AXES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1), (-1, 0, 0)),
}
_AXIS_NAMES = ("x", "y", "z")
# Letter of the patient direction that each LPS axis points to (+) or from (-).
_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}

CONVENTION_NOTE = (
    "LPS mm (+x Left, +y Posterior, +z Superior). Radiological view: axial from feet, "
    "coronal from front (patient R on viewer's left), sagittal from patient's left "
    "(A on left). Overlay: fixed green, moving magenta, grey = agreement."
)

# Layout in canvas pixels.
_TITLE_H = 20
_HEADER_H = 16
_LABEL_W = 96
_FOOTER_H = 52  # four lines of the default font
_FOOTER_LINE_H = 13  # one more line (the det J legend)
_GAP = 4
_BACKGROUND = (24, 24, 32)  # R != B: never an overlay pixel (R == B there)
_LABEL_COLOUR = (230, 230, 230)
_LETTER_COLOUR = (255, 215, 0)
_GRID_COLOUR = (255, 255, 255)
_OUTLINE_COLOUR = (0, 255, 255)  # cyan: R != B, so never mistaken for an overlay pixel

# Choosing the view centre (view_centre, moving_data_mask).
#: Samples (at most) of the fixed field of view in which the overlap is looked for.
CENTRE_POINTS = 400_000
#: An overlap of fewer samples is sampled again over its bounding box, finer.
_REFINE_BELOW = 4096
#: Voxels (at most) of the moving image read to find its data region and window.
MASK_VOXELS = 4_000_000
#: Least fraction of voxels at the minimum for a moving image to count as padded.
_PADDED_FRACTION = 0.01
#: Weight of a structureless overlap sample relative to the strongest edges (1 + this):
#: edges pull the centre, but a uniform organ still counts.
_STRUCTURE_FLOOR = 0.25

# det J colour map (log det J / log of the bar's limit, -1 to 1): compression blue, no
# change light grey, expansion red; folding (det J <= 0) a green no other value takes.
_JACOBIAN_STOPS = np.array([-1.0, 0.0, 1.0])
_JACOBIAN_RGB = np.array([[40, 90, 230], [225, 225, 225], [225, 45, 35]], dtype=float)
_FOLDED_COLOUR = (0, 255, 0)
#: Brightness kept outside the fixed foreground (the figures count the foreground only).
_OUTSIDE_DIM = 0.35
#: The colour bar runs from 1 / limit to limit, limit = the 1st/99th foreground percentile
#: furthest from 1, at least this (a near-rigid field still shows a scale) and at most 4.
_JACOBIAN_MIN_LIMIT = 1.25
_JACOBIAN_MAX_LIMIT = 4.0
#: One footer line at the default panel size (the picture's width allows ~145 characters).
JACOBIAN_LEGEND = (
    "det J of p -> p + u(p), log scale: blue < 1 shrinks, red > 1 grows (fixed -> moving), "
    "green <= 0 folds; dimmed: outside the fixed foreground."
)

# Magnitude colour map stops (value in [0, 1] -> RGB): dark blue to yellow.
_CMAP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array(
    [[16, 16, 72], [40, 80, 190], [30, 170, 160], [170, 210, 60], [250, 235, 40]], dtype=float
)


@dataclass(frozen=True)
class PlaneGrid:
    """A display plane in physical space: square pixels of ``spacing`` mm.

    Pixel (column i, row j) is centred at ``origin + i*spacing*col_dir +
    j*spacing*row_dir`` (LPS mm). ``position`` is the plane's LPS coordinate
    along its normal axis (z for axial, y for coronal, x for sagittal).
    """

    name: str
    origin: tuple[float, float, float]
    col_dir: tuple[int, int, int]
    row_dir: tuple[int, int, int]
    normal: tuple[int, int, int]
    spacing: float
    size: tuple[int, int]  # (columns, rows) in pixels
    position: float

    def reference(self) -> sitk.Image:
        """A one-slice 3D image with this geometry, for ``sitk.Resample``."""
        ref = sitk.Image([self.size[0], self.size[1], 1], sitk.sitkUInt8)
        ref.SetOrigin(self.origin)
        ref.SetSpacing((self.spacing, self.spacing, self.spacing))
        # Direction columns are the physical directions of index axes i, j, k.
        direction = np.column_stack([self.col_dir, self.row_dir, self.normal]).astype(float)
        ref.SetDirection(tuple(direction.ravel()))
        return ref

    def edge_letters(self) -> dict[str, str]:
        """Patient-direction letters at the panel's left, right, top and bottom edges."""

        def letter(v: tuple[int, int, int], sign: int) -> str:
            axis = int(np.flatnonzero(v)[0])
            return _LETTERS[(axis, sign * v[axis])]

        return {
            "left": letter(self.col_dir, -1),
            "right": letter(self.col_dir, 1),
            "top": letter(self.row_dir, -1),
            "bottom": letter(self.row_dir, 1),
        }


@dataclass(frozen=True)
class QALayout:
    """Where things go on the QA canvas (pixels, boxes as (x0, y0, x1, y1))."""

    size: tuple[int, int]  # (width, height)
    rows: tuple[str, ...]  # row names, top to bottom
    panels: dict[tuple[str, str], Box]  # (row name, plane name) -> panel box
    panel_size: int


@dataclass(frozen=True)
class ViewCentre:
    """The point the QA planes pass through, and why (module docstring).

    Attributes:
        point: LPS mm, fixed frame.
        source: "overlap": the structure-weighted centre of the region where the
            registered moving image has data; "fixed centre": the fixed image's
            centre (no such region, or no moving image to look for one).
    """

    point: tuple[float, float, float]
    source: Literal["overlap", "fixed centre"]


def fixed_centre(fixed: sitk.Image) -> tuple[float, float, float]:
    """Physical centre of a grid (LPS mm): the midpoint of its first and last voxel centres."""
    size = np.array(fixed.GetSize(), dtype=float)
    centre = fixed.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2))
    return (float(centre[0]), float(centre[1]), float(centre[2]))


def _strided_reference(image: sitk.Image, max_voxels: int) -> tuple[int, sitk.Image]:
    """(k, grid): every k-th voxel of ``image`` along each axis, at most ``max_voxels`` of
    them; voxel i of the grid is voxel k*i of the image (same origin and axes)."""
    size = np.array(image.GetSize())
    step = max(1, int(np.ceil((float(np.prod(size)) / max_voxels) ** (1 / 3))))
    reference = sitk.Image([int(n) for n in -(-size // step)], sitk.sitkUInt8)
    reference.SetOrigin(image.GetOrigin())
    reference.SetSpacing(tuple(float(s) * step for s in image.GetSpacing()))
    reference.SetDirection(image.GetDirection())
    return step, reference


def moving_data_mask(
    moving: sitk.Image, moving_mask: sitk.Image | None = None, max_voxels: int = MASK_VOXELS
) -> sitk.Image:
    """Where the moving image has data: a UInt8 image (1 = data) in the moving frame.

    With ``moving_mask`` (any grid, non-zero = data) that mask. Otherwise the
    moving image's voxel buffer less its padding: the voxels at exactly the
    image's minimum that are connected (through faces) to a face of the buffer,
    as the constant fill around an ultrasound sector is. Voxels at the minimum
    enclosed by data (an anechoic cyst inside the sector) stay data. An image
    with under 1 % of its voxels at the minimum has no padding: its whole
    buffer is data (an MR or CT with exact-zero air around the body is
    "padded" by this rule, so the body is its data region; fine for centring).

    Large images are read with a stride of k voxels per axis (at most
    ``max_voxels`` voxels); the mask is then on that strided grid (voxel i =
    moving voxel k*i), exact to about k voxels at its edges.
    """
    if moving_mask is not None:
        return sitk.Cast(moving_mask != 0, sitk.sitkUInt8)
    step, reference = _strided_reference(moving, max_voxels)
    sample = np.asarray(sitk.GetArrayViewFromImage(moving)[::step, ::step, ::step])
    at_min = sample == sample.min()
    data = np.ones(sample.shape, dtype=bool)
    if _PADDED_FRACTION <= at_min.mean() < 1.0:
        # (fov.data_region also asks that the data end abruptly there: for centring the
        # view, a body in exact-zero air is best taken as the data, so that test is left out.)
        data = ~border_connected(at_min)
    mask = sitk.GetImageFromArray(data.astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


def _sampling_grid(
    fixed: sitk.Image, max_points: int, lo: np.ndarray | None = None, hi: np.ndarray | None = None
) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """Samples of the fixed field of view on the fixed image's axes: (grid, lo, step).

    The box runs from continuous index ``lo`` to ``hi`` (ITK (x, y, z) order;
    default the voxel edges of the whole buffer). Samples are roughly isotropic
    in mm, at most about ``max_points`` of them and never finer than the fixed
    voxels; sample i sits at continuous fixed index lo + (i + 0.5) * step.
    """
    size = np.array(fixed.GetSize(), dtype=float)
    spacing = np.array(fixed.GetSpacing(), dtype=float)
    lo = np.full(3, -0.5) if lo is None else lo
    hi = size - 0.5 if hi is None else hi
    extent_mm = (hi - lo) * spacing
    target_mm = max(float(spacing.min()), float(np.prod(extent_mm) / max_points) ** (1 / 3))
    # The small epsilon keeps a whole number of voxels from rounding up to one more.
    counts = np.maximum(1, np.ceil(extent_mm / np.maximum(target_mm, spacing) - 1e-6)).astype(int)
    step = (hi - lo) / counts
    grid = sitk.Image([int(n) for n in counts], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(v) for v in step * spacing))
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint(tuple(lo + step / 2)))
    return grid, lo, step


def _on_samples(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform,
                interpolator: int, pixel_type: int) -> np.ndarray:
    """``image`` at the grid's samples mapped by ``transform``; 0 outside it; (z, y, x)."""
    return sitk.GetArrayFromImage(
        sitk.Resample(image, grid, transform, interpolator, 0.0, pixel_type)
    )


def _structure(values: np.ndarray, spacing_xyz: Sequence[float]) -> np.ndarray:
    """Gradient magnitude (units per mm) of a (z, y, x) array; axes of one sample add 0."""
    squared = np.zeros(values.shape, dtype=np.float64)
    for axis, mm in zip(range(3), reversed(tuple(spacing_xyz)), strict=True):
        if values.shape[axis] > 1:
            squared += np.gradient(values, float(mm), axis=axis) ** 2
    return np.sqrt(squared)


def _weighted_centre(weights: np.ndarray, spacing_xyz: Sequence[float]) -> np.ndarray:
    """Weighted centroid (sample index, (z, y, x)) of positive ``weights``, moved to the
    nearest positive sample (in mm) when it falls on a zero one (a non-convex region)."""
    where = np.argwhere(weights > 0)
    w = weights[tuple(where.T)]
    centre = (where * w[:, None]).sum(axis=0) / w.sum()
    nearest = tuple(np.clip(np.round(centre).astype(int), 0, np.array(weights.shape) - 1))
    if weights[nearest] > 0:
        return centre
    mm = np.asarray(tuple(spacing_xyz)[::-1], dtype=float)
    distance = np.sum(((where - centre) * mm) ** 2, axis=1)
    return where[int(np.argmin(distance))].astype(float)


def view_centre(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform | None = None,
    *,
    moving_mask: sitk.Image | None = None,
    max_points: int = CENTRE_POINTS,
) -> ViewCentre:
    """Where the QA planes should pass: the centre of the overlap (module docstring).

    Args:
        fixed: 3D scalar fixed image; its buffer is the fixed field of view.
        moving: 3D scalar moving image.
        transform: fixed point -> moving point (LPS mm, ITK convention), the
            full mapping of the result (linear or composite); default identity.
        moving_mask: the moving data region (any grid, non-zero = data);
            default :func:`moving_data_mask` of ``moving``.
        max_points: samples of the fixed field of view (the overlap is found on
            them, and again over its bounding box when it is small).

    Returns:
        The structure-weighted centroid of the overlap within the fixed
        foreground (of the whole overlap when it lies in the fixed background
        only), or the fixed image centre when there is no overlap.
    """
    transform = sitk.Transform() if transform is None else transform
    data = moving_data_mask(moving, moving_mask)
    grid, lo, step = _sampling_grid(fixed, max_points)
    inside = _on_samples(data, grid, transform, sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0
    if not inside.any():
        return ViewCentre(fixed_centre(fixed), "fixed centre")
    values = _on_samples(fixed, grid, sitk.Transform(), sitk.sitkLinear, sitk.sitkFloat32)
    # The foreground of the whole field of view: Otsu inside a small box would split tissue.
    foreground = foreground_mask(values)
    if inside.sum() < _REFINE_BELOW:
        # A small overlap (an ultrasound sector in a CT): sample its bounding box, one
        # sample wider on each side, again, down to the fixed voxels.
        where = np.argwhere(inside)[:, ::-1]  # (x, y, z) sample indices
        size = np.array(fixed.GetSize(), dtype=float)
        box_lo = np.maximum(lo + (where.min(axis=0) - 1) * step, -0.5)
        box_hi = np.minimum(lo + (where.max(axis=0) + 2) * step, size - 0.5)
        fine, _, _ = _sampling_grid(fixed, max_points, box_lo, box_hi)
        fine_inside = _on_samples(data, fine, transform, sitk.sitkNearestNeighbor,
                                  sitk.sitkUInt8) > 0
        if fine_inside.any():
            coarse_foreground = sitk.GetImageFromArray(foreground.astype(np.uint8))
            coarse_foreground.CopyInformation(grid)
            foreground = _on_samples(coarse_foreground, fine, sitk.Transform(),
                                     sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0
            values = _on_samples(fixed, fine, sitk.Transform(), sitk.sitkLinear,
                                 sitk.sitkFloat32)
            grid, inside = fine, fine_inside
    region = inside & foreground
    if not region.any():  # the moving data lies over the fixed background only
        region = inside
    structure = _structure(values, grid.GetSpacing())
    scale = float(np.percentile(structure[region], 90))
    relative = np.clip(structure / scale, 0.0, 1.0) if scale > 0 else np.zeros(values.shape)
    weights = np.where(region, _STRUCTURE_FLOOR + relative, 0.0)
    centre = _weighted_centre(weights, grid.GetSpacing())
    point = grid.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centre[::-1]))
    return ViewCentre((float(point[0]), float(point[1]), float(point[2])), "overlap")


def plane_grids(
    fixed: sitk.Image,
    point: Sequence[float] | None = None,
    panel_size: int = 256,
) -> list[PlaneGrid]:
    """Axial, coronal and sagittal display planes covering the fixed image.

    Args:
        fixed: 3D image; its physical bounding box (voxel edges, LPS mm) sets
            the field of view of each plane.
        point: LPS mm point the three planes pass through; default the
            physical centre of ``fixed``.
        panel_size: pixels along the longest physical extent. The same mm per
            pixel is used for all planes, so panels keep physical proportions.
    """
    if panel_size < 16:
        raise ValueError(f"panel_size must be at least 16 pixels, got {panel_size}")
    size = np.array(fixed.GetSize(), dtype=float)
    if point is None:
        point = fixed_centre(fixed)
    centre = np.asarray(point, dtype=float)
    if centre.shape != (3,):
        raise ValueError(f"point must be 3 LPS coordinates in mm, got {point!r}")
    # Voxel edges (continuous index -0.5 and size - 0.5) bound the image.
    corners = np.array(
        [
            fixed.TransformContinuousIndexToPhysicalPoint(
                tuple(-0.5 + size[k] * bit for k, bit in enumerate(bits))
            )
            for bits in np.ndindex(2, 2, 2)
        ]
    )
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    spacing = float((hi - lo).max()) / panel_size

    grids = []
    for name in PLANES:
        col_dir, row_dir, normal = (np.array(v, dtype=float) for v in _PLANE_AXES[name])
        extents = []
        for direction in (col_dir, row_dir):
            proj = corners @ direction
            extents.append((float(proj.min()), float(proj.max())))
        n_cols, n_rows = (max(1, round((b - a) / spacing)) for a, b in extents)
        origin = (
            (extents[0][0] + spacing / 2) * col_dir
            + (extents[1][0] + spacing / 2) * row_dir
            + float(centre @ normal) * normal
        )
        axis = int(np.flatnonzero(normal)[0])
        grids.append(
            PlaneGrid(
                name=name,
                origin=tuple(float(c) for c in origin),  # type: ignore[arg-type]
                col_dir=_PLANE_AXES[name][0],
                row_dir=_PLANE_AXES[name][1],
                normal=_PLANE_AXES[name][2],
                spacing=spacing,
                size=(n_cols, n_rows),
                position=float(centre[axis]),
            )
        )
    return grids


def _row_names(mode: Mode, has_before: bool, has_displacement: bool,
               has_jacobian: bool = False) -> tuple[str, ...]:
    if mode not in ("overlay", "checkerboard", "both"):
        raise ValueError(f"mode must be 'overlay', 'checkerboard' or 'both', got {mode!r}")
    kinds = ["overlay", "checkerboard"] if mode == "both" else [mode]
    stages = ["before", "after"] if has_before else ["after"]
    # Before and after of one kind sit next to each other: that is the comparison.
    rows = [f"{stage} {kind}" for kind in kinds for stage in stages]
    if has_displacement:
        rows.append("displacement")
    if has_jacobian:
        rows.append("jacobian")
    return tuple(rows)


def qa_layout(
    fixed: sitk.Image,
    *,
    mode: Mode = "both",
    has_before: bool = True,
    has_displacement: bool = False,
    point: Sequence[float] | None = None,
    panel_size: int = 256,
    has_jacobian: bool = False,
) -> QALayout:
    """The canvas size and panel boxes that :func:`render_qa` uses for these inputs.

    Each plane sits centred in a ``panel_size`` square cell; its own box is
    smaller along a shorter physical extent. ``has_jacobian`` adds the det J row
    (last) and a footer line for its legend.
    """
    rows = _row_names(mode, has_before, has_displacement, has_jacobian)
    grids = plane_grids(fixed, point, panel_size)
    width = _LABEL_W + len(PLANES) * (panel_size + _GAP) + _GAP
    height = (_TITLE_H + _HEADER_H + len(rows) * (panel_size + _GAP) + _FOOTER_H
              + (_FOOTER_LINE_H if has_jacobian else 0))
    panels: dict[tuple[str, str], Box] = {}
    for r, row in enumerate(rows):
        cell_y = _TITLE_H + _HEADER_H + r * (panel_size + _GAP)
        for c, grid in enumerate(grids):
            cell_x = _LABEL_W + _GAP + c * (panel_size + _GAP)
            w, h = min(grid.size[0], panel_size), min(grid.size[1], panel_size)
            x0 = cell_x + (panel_size - w) // 2
            y0 = cell_y + (panel_size - h) // 2
            panels[(row, grid.name)] = (x0, y0, x0 + w, y0 + h)
    return QALayout(size=(width, height), rows=rows, panels=panels, panel_size=panel_size)


def _check_on_grid(name: str, image: sitk.Image, fixed: sitk.Image, components: int) -> None:
    """Raise ValueError unless ``image`` has the fixed image's voxel grid."""
    if image.GetDimension() != 3:
        raise ValueError(f"{name} must be a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != components:
        raise ValueError(
            f"{name} must have {components} component(s) per voxel, "
            f"got {image.GetNumberOfComponentsPerPixel()}"
        )
    if image is fixed:
        return
    problems = []
    if image.GetSize() != fixed.GetSize():
        problems.append(f"size {image.GetSize()} vs {fixed.GetSize()}")
    if not np.allclose(image.GetSpacing(), fixed.GetSpacing(), rtol=1e-5, atol=1e-6):
        problems.append(f"spacing {image.GetSpacing()} vs {fixed.GetSpacing()} mm")
    # Origins may differ by float noise after a round trip through a file.
    tol = 1e-3 * max(fixed.GetSpacing())
    if not np.allclose(image.GetOrigin(), fixed.GetOrigin(), rtol=0, atol=tol):
        problems.append(f"origin {image.GetOrigin()} vs {fixed.GetOrigin()} mm")
    if not np.allclose(image.GetDirection(), fixed.GetDirection(), rtol=0, atol=1e-5):
        problems.append(f"direction {image.GetDirection()} vs {fixed.GetDirection()}")
    if problems:
        raise ValueError(
            f"{name} is not on the fixed grid ({'; '.join(problems)}); "
            "resample it onto the fixed image first"
        )


def display_window(
    volume: np.ndarray,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_voxels: int = 1_000_000,
) -> tuple[float, float]:
    """Robust display window (low, high) in image units: intensity percentiles of a volume.

    `volume` is a 3D array (numpy z, y, x, e.g. ``sitk.GetArrayViewFromImage``); a
    strided subsample of at most about `max_voxels` gives the same percentiles to
    display precision. Non-finite values are left out; a flat volume gets a one-grey
    window (low, low + 1). Shared by qa.png (1st/99th) and the service's viewer.
    """
    step = max(1, int(np.ceil((volume.size / max_voxels) ** (1 / 3))))
    return _percentile_window(np.asarray(volume[::step, ::step, ::step]), percentiles)


def _window(image: sitk.Image) -> tuple[float, float]:
    """qa.png's window of a whole image: 1st and 99th percentiles."""
    return display_window(sitk.GetArrayViewFromImage(image))


def _data_window(
    moving: sitk.Image, data: sitk.Image, max_voxels: int = 1_000_000
) -> tuple[float, float]:
    """Display window of the moving image from its data region only.

    The registered image is mostly fill where a small field of view meets a
    large fixed grid; percentiles over all of it would be the fill value.
    """
    step, reference = _strided_reference(moving, max_voxels)
    inside = _on_samples(data, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                         sitk.sitkUInt8) > 0
    sample = np.asarray(sitk.GetArrayViewFromImage(moving)[::step, ::step, ::step])
    return _percentile_window(sample[inside] if inside.any() else sample)


def _percentile_window(
    values: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """The given percentiles of the finite values; a one-grey window for flat ones."""
    sample = np.asarray(values, dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, list(percentiles))
    if hi <= lo:  # flat image: any window shows it as one grey
        hi = lo + 1.0
    return float(lo), float(hi)


def _resample_plane(image: sitk.Image, grid: PlaneGrid, vector: bool = False) -> np.ndarray:
    """Image values on the plane's pixels (rows, cols[, 3]); NaN outside the image."""
    pixel_type = sitk.sitkVectorFloat32 if vector else sitk.sitkFloat32
    plane = sitk.Resample(
        image, grid.reference(), sitk.Transform(), sitk.sitkLinear, float("nan"), pixel_type
    )
    return sitk.GetArrayFromImage(plane)[0]


def _normalise(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map intensities through the window to [0, 1]; outside the image -> 0 (black)."""
    lo, hi = window
    out = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return np.nan_to_num(out, nan=0.0)


def _to_rgb(channels: Sequence[np.ndarray]) -> np.ndarray:
    return (np.stack(channels, axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    return _to_rgb([moving, fixed, moving])


def _checkerboard(fixed: np.ndarray, moving: np.ndarray, tile: int) -> np.ndarray:
    rows, cols = np.indices(fixed.shape)
    use_fixed = ((rows // tile) + (cols // tile)) % 2 == 0
    grey = np.where(use_fixed, fixed, moving)
    return _to_rgb([grey, grey, grey])


def _outline(data: sitk.Image, transform: sitk.Transform, grid: PlaneGrid) -> np.ndarray:
    """Plane pixels (rows, cols) on the edge of the moving data region mapped by ``transform``.

    Dotted (2 x 2 pixel blocks on, off) so that the overlay under the line
    stays readable; the panel's own border is no edge.
    """
    inside = _on_samples(data, grid.reference(), transform, sitk.sitkNearestNeighbor,
                         sitk.sitkUInt8)[0] > 0
    edge = inside & ~ndimage.binary_erosion(inside, border_value=1)
    rows, cols = np.indices(edge.shape)
    return edge & ((rows // 2 + cols // 2) % 2 == 0)


def _colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN = outside) -> uint8 RGB by the magnitude colour map."""
    v = np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0)
    rgb = np.stack([np.interp(v, _CMAP_STOPS, _CMAP_RGB[:, k]) for k in range(3)], axis=-1)
    rgb[np.isnan(values)] = 0.0
    return (rgb + 0.5).astype(np.uint8)


def _displacement_panel(
    field: np.ndarray, grid: PlaneGrid, max_mm: float, step: int
) -> Image.Image:
    """|u| colour map with the fixed grid displaced by the in-plane part of u.

    ``field``: (rows, cols, 3) LPS displacement in mm on the plane's pixels.
    """
    magnitude = np.linalg.norm(field, axis=-1)
    panel = Image.fromarray(_colour_map(magnitude / max_mm))
    draw = ImageDraw.Draw(panel)
    # In-plane displacement in display pixels along the panel's columns and rows.
    du = field @ np.asarray(grid.col_dir, dtype=float) / grid.spacing
    dv = field @ np.asarray(grid.row_dir, dtype=float) / grid.spacing
    n_rows, n_cols = magnitude.shape
    rows = np.arange(step // 2, n_rows, step)
    cols = np.arange(step // 2, n_cols, step)

    def polyline(rr: np.ndarray, cc: np.ndarray) -> None:
        # Break the line where the field is undefined (outside the image).
        points: list[tuple[float, float]] = []
        for r, c in zip(rr, cc, strict=True):
            if np.isfinite(du[r, c]) and np.isfinite(dv[r, c]):
                points.append((c + du[r, c], r + dv[r, c]))
                continue
            if len(points) > 1:
                draw.line(points, fill=_GRID_COLOUR, width=1)
            points = []
        if len(points) > 1:
            draw.line(points, fill=_GRID_COLOUR, width=1)

    all_cols = np.arange(n_cols)
    all_rows = np.arange(n_rows)
    for r in rows:
        polyline(np.full(n_cols, r), all_cols)
    for c in cols:
        polyline(all_rows, np.full(n_rows, c))
    return panel


def jacobian_limit(statistics: dict[str, object]) -> float:
    """The det J colour bar's upper end (its lower end is the reciprocal): the foreground's
    1st or 99th percentile, whichever lies further from 1 on a log scale, within
    [1.25, 4]; 1.25 when the figures are missing (no foreground voxel)."""
    p1, p99 = statistics.get("jacobian_p1"), statistics.get("jacobian_p99")
    if not isinstance(p1, float | int) or not isinstance(p99, float | int):
        return _JACOBIAN_MIN_LIMIT
    furthest = max(float(p99), 1.0 / max(float(p1), 1.0 / _JACOBIAN_MAX_LIMIT))
    return float(np.clip(furthest, _JACOBIAN_MIN_LIMIT, _JACOBIAN_MAX_LIMIT))


def _jacobian_colours(det: np.ndarray, limit: float) -> np.ndarray:
    """det J (NaN = undefined) -> RGB float (..., 3): the log-scale diverging map, folding
    green, undefined black."""
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.log(np.where(det > 0, det, 1.0)) / np.log(limit)
    scaled = np.clip(np.nan_to_num(scaled, nan=0.0), -1.0, 1.0)
    rgb = np.stack([np.interp(scaled, _JACOBIAN_STOPS, _JACOBIAN_RGB[:, k]) for k in range(3)],
                   axis=-1)
    rgb[det <= 0] = _FOLDED_COLOUR
    rgb[np.isnan(det)] = 0.0
    return rgb


def _jacobian_panel(det: np.ndarray, foreground: np.ndarray, limit: float) -> Image.Image:
    """det J on a plane (rows, cols; NaN undefined) in the det J colours, dimmed where
    ``foreground`` (bool, same shape) is False."""
    rgb = _jacobian_colours(det, limit)
    rgb[~foreground] *= _OUTSIDE_DIM
    return Image.fromarray((rgb + 0.5).astype(np.uint8))


def _jacobian_caption(statistics: dict[str, object]) -> str:
    """The figures under the colour bar: det J inside the fixed foreground."""
    if not statistics.get("voxels"):
        return "no fixed\nforeground\nvoxel"

    def number(key: str) -> str:
        value = statistics[key]
        return f"{float(value):.3g}" if isinstance(value, float | int) else "-"

    folded = statistics.get("negative_jacobian_fraction")
    folded_text = f"{100 * float(folded):.3f}%" if isinstance(folded, float | int) else "-"
    return (f"min {number('jacobian_min')}\np1 {number('jacobian_p1')}\n"
            f"p99 {number('jacobian_p99')}\nfolded {folded_text}")


def _draw_jacobian_key(draw: ImageDraw.ImageDraw, canvas: Image.Image, top: int, height: int,
                       limit: float, statistics: dict[str, object], font: Font) -> None:
    """The det J row's label column: name, a vertical colour bar from 1 / limit (bottom)
    to limit (top) with its ticks, and the foreground figures below it."""
    title = "det J\n(fixed fg)"
    caption = _jacobian_caption(statistics)
    title_box = draw.multiline_textbbox((0, 0), title, font=font)
    caption_box = draw.multiline_textbbox((0, 0), caption, font=font)
    title_h, caption_h = title_box[3] - title_box[1], caption_box[3] - caption_box[1]
    _text(draw, (_GAP, top), title, font)
    bar_top = int(top + title_h + 2 * _GAP)
    bar_h = int(max(12, min(140, height - title_h - caption_h - 5 * _GAP)))
    bar_w = 10
    # Top row = limit, bottom row = 1 / limit, linear in log det J between them.
    scaled = np.linspace(1.0, -1.0, bar_h)[:, None].repeat(bar_w, axis=1)
    bar = _jacobian_colours(np.exp(scaled * np.log(limit)), limit)
    canvas.paste(Image.fromarray((bar + 0.5).astype(np.uint8)), (_GAP, bar_top))
    for value, y in ((limit, bar_top), (1.0, bar_top + bar_h / 2),
                     (1.0 / limit, bar_top + bar_h - 1)):
        draw.line((_GAP + bar_w, y, _GAP + bar_w + 3, y), fill=_LABEL_COLOUR)
        _text(draw, (_GAP + bar_w + 5, y), f"{value:.3g}", font, ("left", "middle"))
    _text(draw, (_GAP, bar_top + bar_h + 2 * _GAP), caption, font)


def _text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: Font,
    align: tuple[str, str] = ("left", "top"),
    fill: tuple[int, int, int] = _LABEL_COLOUR,
    shadow: bool = False,
) -> None:
    """Draw (multi-line) text aligned at ``xy``: align = (left|centre|right, top|middle|bottom).

    Aligns by the measured text box rather than Pillow anchors, which the
    bitmap default font of older Pillow versions does not support.
    """
    x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), text, font=font)
    fx = {"left": 0.0, "centre": 0.5, "right": 1.0}[align[0]]
    fy = {"top": 0.0, "middle": 0.5, "bottom": 1.0}[align[1]]
    x = xy[0] - x0 - fx * (x1 - x0)
    y = xy[1] - y0 - fy * (y1 - y0)
    if shadow:  # a dark halo keeps letters legible on bright anatomy
        for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            draw.multiline_text((x + dx, y + dy), text, fill=(0, 0, 0), font=font)
    draw.multiline_text((x, y), text, fill=fill, font=font)


def _draw_letters(draw: ImageDraw.ImageDraw, box: Box, grid: PlaneGrid, font: Font) -> None:
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    places = {
        "left": ((x0 + 2, ym), ("left", "middle")),
        "right": ((x1 - 2, ym), ("right", "middle")),
        "top": ((xm, y0 + 2), ("centre", "top")),
        "bottom": ((xm, y1 - 2), ("centre", "bottom")),
    }
    for edge, letter in grid.edge_letters().items():
        xy, align = places[edge]
        _text(draw, xy, letter, font, align, fill=_LETTER_COLOUR, shadow=True)


def _write_png_atomically(image: Image.Image, path: Path) -> None:
    """Write next to the target and rename: readers never see a half-written PNG.

    zlib level 3, not Pillow's default 6: on a torso result's 880 x 1128 picture 0.08 s
    against 0.19 s, for a file 5 % larger (539 against 512 kB); level 1 saved 0.01 s more
    for 14 % more bytes."""
    atomic_write(path, lambda fh: image.save(fh, format="PNG", compress_level=3))


def _centre_note(centre: ViewCentre | None, given: bool, has_moving: bool) -> str:
    """The footer's first line: where the planes pass and why."""
    if given:
        return "Planes through the given point."
    if centre is not None and centre.source == "overlap":
        return ("Planes through the centre of the overlap (where the registered moving image "
                "has data); before rows use the same planes.")
    if has_moving:
        return ("Planes through the fixed image centre: the registered moving image has no "
                "data in the fixed field of view.")
    return "Planes through the fixed image centre."


def render_qa(fixed: sitk.Image, registered: sitk.Image, before: sitk.Image | None = None,
              path: str | Path | None = None, mode: Mode = "both", title: str | None = None,
              displacement: sitk.Image | None = None, *,
              point: Sequence[float] | ViewCentre | None = None,
              moving: sitk.Image | None = None, transform: sitk.Transform | None = None,
              moving_mask: sitk.Image | None = None,
              before_transform: sitk.Transform | None = None, panel_size: int = 256,
              title_colour: tuple[int, int, int] | None = None,
              jacobian: JacobianSummary | None = None) -> Image.Image:
    """Render (and optionally write) the QA picture of a registration.

    Args:
        fixed: 3D scalar fixed image.
        registered: moving image resampled onto the fixed grid with the final
            transform (same size, spacing, origin and direction as ``fixed``).
        before: moving image resampled onto the fixed grid with the initial
            (or identity) transform; adds "before" rows when given.
        path: where to write the PNG (atomically: temp file + rename).
        mode: "overlay", "checkerboard" or "both" (one row pair each).
        title: text of the title bar.
        title_colour: background of the title bar (RGB; the verdict's colour), white
            text on it; default: the picture's background.
        displacement: 3-component LPS displacement field in mm on the fixed
            grid (fixed point p maps to p + u(p)); adds a row of |u| with the
            deformed grid.
        point: LPS mm point the planes pass through, or a :class:`ViewCentre`
            (from :func:`view_centre`, so that it is not computed twice).
            Default: :func:`view_centre` when ``moving`` is given, else the
            fixed image centre.
        moving: the 3D scalar moving image itself (its own grid). Given, the
            planes pass through the overlap centre, before and after share a
            window taken from the moving data, and the panels outline the
            moving data region.
        transform: fixed point -> moving point (LPS mm) that made
            ``registered`` (the full mapping); default identity. Used only
            with ``moving``.
        moving_mask: the moving data region (any grid, non-zero = data);
            default :func:`moving_data_mask` of ``moving``.
        before_transform: the transform that made ``before``; default identity.
        panel_size: pixels along the longest physical extent of the image.
        jacobian: det J of the full mapping and the fixed foreground (on the fixed
            grid or a strided copy; any grid in the fixed frame is resampled) with
            their figures; adds the det J row with colour bar and caption.

    Returns:
        The RGB picture; its size and panel boxes are ``qa_layout(...)``'s.

    Raises:
        ValueError: an input is not 3D, has the wrong number of components or
            is not on the fixed grid; or a bad mode / point / panel size.
    """
    _check_qa_inputs(fixed, registered, before, displacement, moving)
    layout = qa_layout(fixed, mode=mode, has_before=before is not None,
                       has_displacement=displacement is not None, panel_size=panel_size,
                       has_jacobian=jacobian is not None)
    data = moving_data_mask(moving, moving_mask) if moving is not None else None
    centre = _given_or_overlap_centre(point, fixed, moving, transform, data)
    grids = plane_grids(fixed, centre.point if centre is not None else point, panel_size)
    planes = _sample_planes(grids, fixed, {"before": (before, before_transform),
                                           "after": (registered, transform)},
                            moving, data, displacement, jacobian)
    font = ImageFont.load_default()
    canvas = Image.new("RGB", layout.size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_panels(canvas, draw, layout, grids, planes, panel_size, font)
    _draw_labels(draw, canvas, layout, grids, planes, title, title_colour, jacobian, font)
    note = _centre_note(centre, point is not None and centre is None, moving is not None)
    _draw_footer(draw, layout, note, bool(planes.outlines), jacobian is not None, font)
    if path is not None:
        _write_png_atomically(canvas, Path(path))
    return canvas


def _check_qa_inputs(fixed: sitk.Image, registered: sitk.Image, before: sitk.Image | None,
                     displacement: sitk.Image | None, moving: sitk.Image | None) -> None:
    """Raise ValueError unless every image render_qa gets is 3D, with the right number of
    components, and (but for ``moving``) on the fixed grid."""
    _check_on_grid("fixed image", fixed, fixed, 1)
    _check_on_grid("registered image", registered, fixed, 1)
    if before is not None:
        _check_on_grid("'before' image", before, fixed, 1)
    if displacement is not None:
        _check_on_grid("displacement field", displacement, fixed, 3)
    if moving is not None and (
        moving.GetDimension() != 3 or moving.GetNumberOfComponentsPerPixel() != 1
    ):
        raise ValueError("moving image must be a 3D scalar image")


def _given_or_overlap_centre(point: Sequence[float] | ViewCentre | None, fixed: sitk.Image,
                             moving: sitk.Image | None, transform: sitk.Transform | None,
                             data: sitk.Image | None) -> ViewCentre | None:
    """The ViewCentre the planes pass through: the caller's, else the overlap's when the
    moving image is given; None when a plain point (or the fixed centre) decides."""
    if isinstance(point, ViewCentre):
        return point
    if point is None and moving is not None:
        return view_centre(fixed, moving, transform, moving_mask=data)
    return None


@dataclass
class _Planes:
    """What render_qa draws, sampled on each of its planes (lists in plane order)."""

    fixed: list[np.ndarray]  # normalised to [0, 1]
    moving: dict[str, list[np.ndarray]]  # stage ("before", "after") -> normalised planes
    outlines: dict[str, list[np.ndarray]]  # stage -> edge of the moving data (bool)
    field: list[np.ndarray]  # displacement vectors (mm)
    max_mm: float  # largest |u| of the whole field, the scale of its row
    jacobian: list[tuple[np.ndarray, np.ndarray]]  # (det J, fixed foreground)
    limit: float  # det J at the top of the colour bar


def _largest_magnitude(field: np.ndarray, slab: int = 8) -> float:
    """max |u| (mm) over a (z, y, x, 3) field, NaN ignored (0 when every vector is NaN).

    A few z-planes at a time in float32 (a display scale needs no more): in float64 at once
    the squares of a clinical CT grid's field (70 M voxels) took 1.7 GB and 3.6 s."""
    largest = 0.0
    for z in range(0, field.shape[0], slab):
        block = field[z:z + slab]
        squares = np.einsum("...i,...i->...", block, block)
        if np.isfinite(squares).any():
            largest = max(largest, float(np.nanmax(squares)))
    return float(np.sqrt(largest))


def _sample_planes(grids: list[PlaneGrid], fixed: sitk.Image,
                   stages: dict[str, tuple[sitk.Image | None, sitk.Transform | None]],
                   moving: sitk.Image | None, data: sitk.Image | None,
                   displacement: sitk.Image | None,
                   jacobian: JacobianSummary | None) -> _Planes:
    """Every image of the picture on the planes ``grids``; ``stages`` maps a stage to its
    moving image on the fixed grid (None: no such rows) and the transform that made it."""
    fixed_planes = [_normalise(_resample_plane(fixed, g), _window(fixed)) for g in grids]
    # Before and after share one window from the moving data, so that they compare.
    shared_window = _data_window(moving, data) if moving is not None and data is not None else None
    moving_planes: dict[str, list[np.ndarray]] = {}
    outlines: dict[str, list[np.ndarray]] = {}
    for stage, (image, stage_transform) in stages.items():
        if image is None:
            continue
        window = shared_window or _window(image)
        moving_planes[stage] = [_normalise(_resample_plane(image, g), window) for g in grids]
        if data is not None:
            mapping = stage_transform or sitk.Transform()
            outlines[stage] = [_outline(data, mapping, g) for g in grids]
    max_mm = 0.0
    field_planes: list[np.ndarray] = []
    if displacement is not None:
        field_planes = [_resample_plane(displacement, g, vector=True) for g in grids]
        max_mm = _largest_magnitude(sitk.GetArrayViewFromImage(displacement))
    jacobian_planes: list[tuple[np.ndarray, np.ndarray]] = []
    limit = _JACOBIAN_MIN_LIMIT
    if jacobian is not None:
        limit = jacobian_limit(jacobian.statistics)
        jacobian_planes = [
            (_resample_plane(jacobian.determinant, g),
             _on_samples(jacobian.foreground, g.reference(), sitk.Transform(),
                         sitk.sitkNearestNeighbor, sitk.sitkUInt8)[0] > 0)
            for g in grids]
    return _Planes(fixed_planes, moving_planes, outlines, field_planes, max_mm,
                   jacobian_planes, limit)


def _draw_panels(canvas: Image.Image, draw: ImageDraw.ImageDraw, layout: QALayout,
                 grids: list[PlaneGrid], planes: _Planes, panel_size: int, font: Font) -> None:
    """Paste each row's panel of each plane into its box, with the edge letters."""
    tile = max(4, panel_size // 8)
    step = max(6, panel_size // 16)
    for row in layout.rows:
        for i, grid in enumerate(grids):
            box = layout.panels[(row, grid.name)]
            if row == "displacement":
                panel = _displacement_panel(planes.field[i], grid, max(planes.max_mm, 1e-6),
                                            step)
            elif row == "jacobian":
                panel = _jacobian_panel(*planes.jacobian[i], planes.limit)
            else:
                stage, kind = row.split(" ")
                f, m = planes.fixed[i], planes.moving[stage][i]
                rgb = _overlay(f, m) if kind == "overlay" else _checkerboard(f, m, tile)
                if stage in planes.outlines:
                    rgb[planes.outlines[stage][i]] = _OUTLINE_COLOUR
                panel = Image.fromarray(rgb)
            # Planes larger than the cell (only by rounding) are cropped to it.
            canvas.paste(panel.crop((0, 0, box[2] - box[0], box[3] - box[1])), box[:2])
            _draw_letters(draw, box, grid, font)


def _draw_labels(draw: ImageDraw.ImageDraw, canvas: Image.Image, layout: QALayout,
                 grids: list[PlaneGrid], planes: _Planes, title: str | None,
                 title_colour: tuple[int, int, int] | None,
                 jacobian: JacobianSummary | None, font: Font) -> None:
    """The title bar, the column headers (plane and its position) and the row names (the
    det J row's name column holds its colour bar and figures)."""
    if title_colour is not None:
        draw.rectangle((0, 0, layout.size[0], _TITLE_H - 1), fill=title_colour)
    _text(draw, (_GAP, _TITLE_H / 2), title or "registration QA", font, ("left", "middle"),
          fill=(255, 255, 255) if title_colour is not None else _LABEL_COLOUR)
    for i, grid in enumerate(grids):
        x_mid = _LABEL_W + _GAP + i * (layout.panel_size + _GAP) + layout.panel_size / 2
        axis = _AXIS_NAMES[int(np.flatnonzero(grid.normal)[0])]
        header = f"{grid.name}  {axis} = {grid.position:.1f} mm"
        _text(draw, (x_mid, _TITLE_H + _HEADER_H / 2), header, font, ("centre", "middle"))
    for r, row in enumerate(layout.rows):
        y_mid = _TITLE_H + _HEADER_H + r * (layout.panel_size + _GAP) + layout.panel_size / 2
        if row == "jacobian":
            assert jacobian is not None  # (the row exists only with it)
            _draw_jacobian_key(draw, canvas, int(y_mid) - layout.panel_size // 2,
                               layout.panel_size,
                               planes.limit, jacobian.statistics, font)
            continue
        if row == "displacement":
            text = f"displacement\n|u| 0 to {planes.max_mm:.1f} mm\ngrid: p + u(p)"
        else:
            stage, kind = row.split(" ")
            text = f"{stage}\n{kind}"
        _text(draw, (_GAP, y_mid), text, font, ("left", "middle"))


def _draw_footer(draw: ImageDraw.ImageDraw, layout: QALayout, note: str, outlined: bool,
                 has_jacobian: bool, font: Font) -> None:
    """Where the planes pass (``note``), the display convention and, with a det J row, its
    legend, wrapped to the picture's width."""
    chars_per_line = max(20, (layout.size[0] - 2 * _GAP) // 6)
    convention = CONVENTION_NOTE + (" Dotted cyan: edge of the moving data." if outlined else "")
    lines = textwrap.wrap(note, chars_per_line) + textwrap.wrap(convention, chars_per_line)
    footer_h = _FOOTER_H
    if has_jacobian:  # its legend gets the extra line qa_layout made room for
        lines = lines[:4] + textwrap.wrap(JACOBIAN_LEGEND, chars_per_line)
        footer_h += _FOOTER_LINE_H
    shown = footer_h // _FOOTER_LINE_H
    _text(draw, (_GAP, layout.size[1] - footer_h + _GAP), "\n".join(lines[:shown]), font)
