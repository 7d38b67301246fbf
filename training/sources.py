"""Real volumes carried by installed packages, and random label phantoms.

Nothing is downloaded: every file comes from a package installed in the
environment (docs/TRAINING.md, "Data"). Each source is one *subject* of one
*anatomy*; it is loaded once per process (``load_volume`` is cached), resampled
to the 2 mm working spacing with `disa.core.preprocess.resample_to_spacing`
and cropped to its head plus a small air margin. Arrays are numpy (z, y, x) on
that 2 mm grid; the physical frame is not needed for synthesis.

Every source provides
    native   -- its real intensities (a T1 MRI or a CT in HU),
    tissues  -- soft maps (partial volume at 2 mm) of the tissue classes
                ``TISSUES``, summing to 1 per voxel,
    labels   -- an integer label map (more labels than tissues where the data
                has them) with the tissue class of every label,
which the synthesis turns into arbitrary modalities.

Sources and the split (by subject AND anatomy)
-----------------------------------------------
training (subject ICBM152 2009a, anatomy brain-mri-template; plus phantoms):
  ``icbm152-brain`` nilearn: skull-stripped T1 with GM and WM maps (CSF = brain
      mask - GM - WM). Always present with the ``train`` extra.
  ``icbm152-head``  melage (``pip install --no-deps melage``): the whole-head T1
      and a 31-label segmentation on the same grid (the segmentation's header
      origin is wrong, its voxels are index-aligned with the T1 -- checked by
      per-label intensity spread). Outside the brain: air / bone / soft tissue
      from the T1 intensity.
  ``phantom`` random smooth label maps from seeded noise, anatomy-free.
held out (never used by ``disa-train fit``):
  ``mni152-nlin6asym`` nimare (``pip install --no-deps nimare``): FSL's MNI152
      NLin6Asym whole-head T1 + brain mask -- another subject of the same anatomy
      (a different population average). Tissues by 3-class k-means in the brain.
  ``ct-brain-atlas`` totalsegmentator (``pip install --no-deps totalsegmentator``):
      a skull-stripped CT brain template in HU -- held-out anatomy "head-ct" and
      a held-out native modality. Tissues by k-means on HU.
  ``phantom`` with seeds from a separate seed stream (``phantom_seed``), so no
      held-out phantom equals a training one.
  ``xcat-chest`` gecatsim (``pip install --no-deps gecatsim==1.5.4``, BSD-3-Clause):
      the XCAT/NCAT adult male torso (derived from the Visible Male) that GE's
      CT simulator ships as NURBS surfaces -- body outline, both lungs and the
      sternum; no other organs. Voxelised here (``_load_xcat_chest``) to the
      thorax; held-out anatomy "torso". Its ``native`` is a CT made from the
      labels (no scanner intensities exist). Benchmarks only: it is not one of
      the scenes of ``disa-train evaluate`` (``SourceInfo.evaluation``), so the
      model card's held-out figures stay reproducible.
A source whose package is missing is skipped (``available_sources``).

Tissue labels derived from intensities (k-means, thresholds) are approximate
by design: the synthesis only needs plausible piecewise-smooth anatomy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from disa.core.environment import Environment
from disa.core.preprocess import resample_to_spacing

SPACING_MM = 2.0
#: Tissue classes shared by every source; the synthesis has a contrast per class.
TISSUES: tuple[str, ...] = ("air", "soft", "bone", "csf", "gm", "wm", "deep")
T = {name: i for i, name in enumerate(TISSUES)}
#: Air margin (voxels) kept around the head's bounding box.
MARGIN_VOXELS = 4

PHANTOM = "phantom"
TRAINING_SOURCES: tuple[str, ...] = ("icbm152-brain", "icbm152-head", PHANTOM)
HELD_OUT_SOURCES: tuple[str, ...] = ("mni152-nlin6asym", "ct-brain-atlas", "xcat-chest", PHANTOM)


@dataclass(frozen=True, eq=False)
class Volume:
    """One subject at 2 mm: native intensities, tissue maps and labels, (z, y, x) arrays.

    Attributes:
        id: source id (``phantom`` for generated ones).
        subject: subject id; the split never puts one subject on both sides.
        anatomy: anatomy tag, e.g. "brain-mri-template", "head-ct", "phantom".
        native_modality: what ``native`` is: "t1", "ct" or "phantom".
        native: float32 real intensities.
        tissues: float32 (len(TISSUES), z, y, x) soft maps summing to 1.
        labels: int16 label map, values 0..len(label_tissue)-1.
        label_tissue: int array, tissue index (into TISSUES) of every label.
        border_mode: how crops continue past the array ("nearest": air around a
            head; "mirror": random phantoms, which have no outside).
    """

    id: str
    subject: str
    anatomy: str
    native_modality: str
    native: np.ndarray
    tissues: np.ndarray
    labels: np.ndarray
    label_tissue: np.ndarray
    border_mode: str = "nearest"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.native.shape)  # type: ignore[return-value]

    def foreground(self) -> np.ndarray:
        """Voxels that are not air (bool)."""
        return self.tissues[T["air"]] < 0.5


@dataclass(frozen=True)
class SourceInfo:
    """Catalogue entry of a packaged source."""

    id: str
    subject: str
    anatomy: str
    split: str
    package: str
    files: tuple[str, ...]
    #: What ``native`` holds ("t1" or "ct").
    native_modality: str = "t1"
    #: Whether ``load_split`` returns it (the scenes of ``disa-train evaluate``);
    #: False for sources added for the benchmarks after the shipped model's card.
    evaluation: bool = True


CATALOGUE: dict[str, SourceInfo] = {
    s.id: s
    for s in (
        SourceInfo(
            "icbm152-brain",
            "icbm152-2009a",
            "brain-mri-template",
            "training",
            "nilearn",
            (
                "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
            ),
        ),
        SourceInfo(
            "icbm152-head",
            "icbm152-2009a",
            "brain-mri-template",
            "training",
            "melage",
            (
                "data/MNI/mni_icbm152_t1_tal_nlin_sym_09a.nii",
                "data/MNI/mni_icbm152_t1_tal_nlin_sym_09a_seg.nii.gz",
            ),
        ),
        SourceInfo(
            "mni152-nlin6asym",
            "mni152-nlin6asym",
            "brain-mri-template",
            "held-out",
            "nimare",
            (
                "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
                "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
            ),
        ),
        SourceInfo(
            "ct-brain-atlas",
            "ct-brain-atlas",
            "head-ct",
            "held-out",
            "totalsegmentator",
            ("totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",),
            native_modality="ct",
        ),
        SourceInfo(
            "xcat-chest",
            "xcat-vmale50",
            "torso",
            "held-out",
            "gecatsim",
            ("gecatsim/phantom/vmale50_chest_less_surfaces.nrb",),
            native_modality="ct",
            evaluation=False,
        ),
    )
}


def _package_file(package: str, relative: str) -> Path | None:
    """Path of a file installed by ``package`` (read from its metadata, nothing imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(relative)))
    return path if path.is_file() else None


def source_files(source_id: str) -> list[Path] | None:
    """The files of a packaged source, or None if its package (or a file) is missing."""
    info = CATALOGUE[source_id]
    paths = [_package_file(info.package, f) for f in info.files]
    return None if any(p is None for p in paths) else paths  # type: ignore[return-value]


def available_sources(split: str | None = None) -> list[str]:
    """Ids of the packaged sources that are installed (optionally of one split)."""
    return [
        s
        for s, info in CATALOGUE.items()
        if (split is None or info.split == split) and source_files(s) is not None
    ]


# ---------------------------------------------------------------- helpers


def _read(path: Path) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def _resample(image: sitk.Image, nearest: bool = False) -> np.ndarray:
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = resample_to_spacing(image, SPACING_MM, interp, default_value=0.0)
    return sitk.GetArrayFromImage(out).astype(np.float32)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``array`` (z, y, x) as an image on ``reference``'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(reference)
    return image


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> np.ndarray:
    """Sorted centres of a 1-D k-means (quantile start; deterministic)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.argmin(np.abs(v[:, None] - centres[None, :]), axis=1)
        new = np.array(
            [v[assign == j].mean() if np.any(assign == j) else centres[j] for j in range(k)]
        )
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def _nearest_centre(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    edges = 0.5 * (centres[1:] + centres[:-1])
    return np.searchsorted(edges, values).astype(np.int16)


def _head_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    mask = ndimage.uniform_filter(image, 3) > threshold
    mask = ndimage.binary_closing(mask, iterations=2)
    labelled, n = ndimage.label(mask)
    if n > 1:  # keep the head, drop specks of noise in the air
        sizes = ndimage.sum(mask, labelled, range(1, n + 1))
        mask = labelled == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def _assemble(
    source_id: str,
    native: np.ndarray,
    label_map_1mm: np.ndarray,
    label_tissue: np.ndarray,
    reference: sitk.Image,
    native_modality: str,
) -> Volume:
    """Resample native and per-tissue indicators to 2 mm and crop to the head.

    Tissue maps come from the fine label map (binary indicators downsampled
    with anti-aliasing), so they carry partial volume; labels are resampled by
    nearest neighbour.
    """
    info = CATALOGUE[source_id]
    native2 = _resample(_like(native, reference))
    tissue_of_voxel = label_tissue[label_map_1mm]
    maps = np.stack(
        [
            _resample(_like((tissue_of_voxel == t).astype(np.float32), reference))
            for t in range(len(TISSUES))
        ]
    )
    maps = np.clip(maps, 0.0, None)
    # Outside the old field of view the resampler fills 0 for every tissue: that is air.
    maps[T["air"]] += np.clip(1.0 - maps.sum(0), 0.0, None)
    maps /= maps.sum(0, keepdims=True)
    labels2 = _resample(_like(label_map_1mm.astype(np.float32), reference), nearest=True)
    labels2 = np.rint(labels2).astype(np.int16)
    fg = maps[T["air"]] < 0.99
    box = _bounding_box(fg, MARGIN_VOXELS)
    return Volume(
        id=source_id,
        subject=info.subject,
        anatomy=info.anatomy,
        native_modality=native_modality,
        native=np.ascontiguousarray(native2[box]),
        tissues=np.ascontiguousarray(maps[(slice(None), *box)]),
        labels=np.ascontiguousarray(labels2[box]),
        label_tissue=np.asarray(label_tissue, dtype=np.int16),
    )


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _outside_brain_classes(t1: np.ndarray, brain: np.ndarray, wm_level: float) -> np.ndarray:
    """Air / bone / soft tissue outside the brain of a whole-head T1 (tissue indices).

    T1 shows the skull dark and scalp fat bright; thresholds are fractions of
    the white-matter level so they hold for any intensity scale.
    """
    head = _head_mask(t1, 0.1 * wm_level) | brain
    out = np.full(t1.shape, T["air"], dtype=np.int16)
    out[head & (t1 < 0.35 * wm_level)] = T["bone"]
    out[head & (t1 >= 0.35 * wm_level)] = T["soft"]
    return out


# ---------------------------------------------------------------- loaders


def _load_icbm152_brain() -> Volume:
    t1_path, gm_path, wm_path = source_files("icbm152-brain")  # type: ignore[misc]
    t1 = _read(t1_path)
    t1a = sitk.GetArrayFromImage(t1)
    gm = sitk.GetArrayFromImage(_read(gm_path)) / 255.0
    wm = sitk.GetArrayFromImage(_read(wm_path)) / 255.0
    brain = ndimage.binary_fill_holes(t1a > 0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    # Hard labels at 1 mm from the dominant soft class; tissues keep the partial volume.
    stack = np.stack([~brain, csf, gm, wm]).astype(np.float32)
    label_map = np.argmax(stack, axis=0).astype(np.int16)
    label_tissue = np.array([T["air"], T["csf"], T["gm"], T["wm"]])
    return _assemble("icbm152-brain", t1a, label_map, label_tissue, t1, "t1")


def _load_icbm152_head() -> Volume:
    t1_path, seg_path = source_files("icbm152-head")  # type: ignore[misc]
    t1 = _read(t1_path)
    t1a = sitk.GetArrayFromImage(t1)
    seg = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))).astype(np.int16)
    if seg.shape != t1a.shape:
        raise ValueError("melage ICBM152 segmentation and T1 differ in shape")
    n_seg = int(seg.max())
    # Tissue of each segmentation label from its mean T1 (thresholds in units of
    # the white-matter level): avoids relying on label names.
    means = ndimage.mean(t1a, seg, np.arange(1, n_seg + 1))
    wm_level = float(np.max(means))
    seg_tissue = np.select(
        [means < 0.56 * wm_level, means < 0.83 * wm_level, means < 0.94 * wm_level],
        [T["csf"], T["gm"], T["deep"]],
        T["wm"],
    )
    outside = _outside_brain_classes(t1a, seg > 0, wm_level)
    # Labels: 0 air, 1 soft, 2 bone, then 2 + segmentation label.
    label_map = np.where(
        seg > 0, seg + 2, np.select([outside == T["soft"], outside == T["bone"]], [1, 2], 0)
    )
    label_tissue = np.concatenate([[T["air"], T["soft"], T["bone"]], seg_tissue])
    return _assemble("icbm152-head", t1a, label_map.astype(np.int16), label_tissue, t1, "t1")


def _load_mni152_nlin6asym() -> Volume:
    t1_path, mask_path = source_files("mni152-nlin6asym")  # type: ignore[misc]
    t1 = _read(t1_path)
    t1a = sitk.GetArrayFromImage(t1)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
    centres = kmeans_1d(t1a[brain][::7], 3)  # csf < gm < wm in T1
    inside = _nearest_centre(t1a, centres)
    outside = _outside_brain_classes(t1a, brain, float(centres[-1]))
    # Labels: 0 air, 1 soft, 2 bone, 3 csf, 4 gm, 5 wm.
    label_map = np.where(
        brain, 3 + inside, np.select([outside == T["soft"], outside == T["bone"]], [1, 2], 0)
    )
    label_tissue = np.array([T["air"], T["soft"], T["bone"], T["csf"], T["gm"], T["wm"]])
    return _assemble("mni152-nlin6asym", t1a, label_map.astype(np.int16), label_tissue, t1, "t1")


def _load_ct_brain_atlas() -> Volume:
    (ct_path,) = source_files("ct-brain-atlas")  # type: ignore[misc]
    ct = _read(ct_path)
    hu = sitk.GetArrayFromImage(ct)
    # The template is skull-stripped with exactly 0 outside the brain.
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(hu != 0))
    soft = brain & (hu < 100)
    # CT grey/white contrast is a few HU, below the template's noise: classify a
    # smoothed copy (sigma 1.5 mm) so the classes form regions, not speckle.
    smooth = ndimage.gaussian_filter(np.clip(hu, -10, 80), 1.5)
    centres = kmeans_1d(smooth[soft][::7], 3)  # csf < wm < gm in CT
    cls = _nearest_centre(smooth, centres)
    # Labels: 0 air, 1 csf, 2 wm, 3 gm, 4 dense (calcification / bone-like, > 100 HU).
    label_map = np.where(brain, 1 + cls, 0)
    label_map = np.where(brain & (hu >= 100), 4, label_map)
    label_tissue = np.array([T["air"], T["csf"], T["wm"], T["gm"], T["bone"]])
    return _assemble("ct-brain-atlas", hu, label_map.astype(np.int16), label_tissue, ct, "ct")


# XCAT torso (gecatsim): NURBS surfaces -> label map. The file's coordinates are
# already LPS mm (right lung at -x, sternum at -y, head at +z).

#: The thorax box that is voxelised, LPS mm (x, y, z) low / high: the whole width
#: and depth of the body, from below the lungs' bases to the shoulders.
XCAT_BOX_MM = (np.array([-212.0, -132.0, -30.0]), np.array([206.0, 128.0, 290.0]))
#: Surfaces used, the tissue of each and the label painted (later ones win where they
#: overlap). "chest_surface" and "head" together are the body outline; the ears lie
#: outside the box.
_XCAT_SURFACES: tuple[tuple[str, str, int], ...] = (
    ("chest_surface", "soft", 1),
    ("head", "soft", 1),
    ("rlung", "air", 2),  # aerated lung: air-like in CT, MR and ultrasound
    ("llung", "air", 3),
    ("sternum", "bone", 4),
)
#: Labels: 0 air outside, 1 body, 2 right lung, 3 left lung, 4 sternum.
_XCAT_LABEL_TISSUE = np.array([T["air"], T["soft"], T["air"], T["air"], T["bone"]])
#: HU of each label for ``native`` (no scan exists: a CT made from the labels).
_XCAT_LABEL_HU = np.array([-1000.0, 30.0, -850.0, -850.0, 700.0], dtype=np.float32)


@dataclass(frozen=True)
class NurbsSurface:
    """One surface of an XCAT ``.nrb`` file: a non-rational B-spline patch.

    ``control`` is (m, n, 3) LPS mm; ``v_knots`` runs along the first axis (m
    rows, the body's long axis), ``u_knots`` along the second (n, around it).
    """

    name: str
    material: int
    u_knots: np.ndarray
    v_knots: np.ndarray
    control: np.ndarray


def read_nrb(path: Path) -> list[NurbsSurface]:
    """Parse an XCAT ``.nrb`` file: per surface a blank line, the name, a material
    index, "M :M", "N :N", the U and V knot vectors and M x N control points
    (x y z per line, the N index fastest)."""
    lines = [line.strip() for line in path.read_text(encoding="ascii").splitlines()]
    surfaces = []
    i = 0
    while i + 4 < len(lines):
        if not lines[i + 3].endswith(":M"):
            i += 1
            continue
        m, n = int(lines[i + 3].split()[0]), int(lines[i + 4].split()[0])
        v_at = lines.index("V Knot Vector", i + 5)
        c_at = lines.index("Control Points", v_at)
        control = np.array([[float(x) for x in line.split()]
                            for line in lines[c_at + 1:c_at + 1 + m * n]])
        surfaces.append(NurbsSurface(
            lines[i + 1], int(lines[i + 2]),
            np.array([float(x) for x in lines[i + 6:v_at]]),
            np.array([float(x) for x in lines[v_at + 1:c_at]]),
            control.reshape(m, n, 3)))
        i = c_at + 1 + m * n
    return surfaces


def surface_mesh(surface: NurbsSurface, step_mm: float = 1.5) -> np.ndarray:
    """Triangles (T, 3 vertices, xyz mm) of the surface sampled about every ``step_mm``."""
    from scipy.interpolate import BSpline

    p = surface.control
    m, n = p.shape[:2]
    du, dv = len(surface.u_knots) - n - 1, len(surface.v_knots) - m - 1
    # Sample counts from the control polygon's longest row / column (it bounds the length).
    lu = np.linalg.norm(np.diff(p, axis=1), axis=-1).sum(1).max()
    lv = np.linalg.norm(np.diff(p, axis=0), axis=-1).sum(0).max()
    su = np.linspace(surface.u_knots[du], surface.u_knots[-du - 1], int(lu / step_mm) + 8)
    sv = np.linspace(surface.v_knots[dv], surface.v_knots[-dv - 1], int(lv / step_mm) + 8)
    bu = BSpline.design_matrix(su, surface.u_knots, du).toarray()
    bv = BSpline.design_matrix(sv, surface.v_knots, dv).toarray()
    s = np.einsum("am,mnc,bn->abc", bv, p, bu)
    a, b, c, d = s[:-1, :-1], s[1:, :-1], s[1:, 1:], s[:-1, 1:]
    quads = [x.reshape(-1, 3) for x in (a, b, c, d)]
    return np.concatenate([np.stack([quads[0], quads[1], quads[2]], 1),
                           np.stack([quads[0], quads[2], quads[3]], 1)])


def voxelise_mesh(triangles: np.ndarray, origin: np.ndarray, spacing_mm: float,
                  shape: tuple[int, int, int]) -> np.ndarray:
    """Inside of a closed triangle mesh on a (z, y, x) grid (voxel i at origin + i *
    spacing, xyz mm), by the parity of ray crossings along +z below each voxel centre."""
    nz, ny, nx = shape
    g = (triangles - origin) / spacing_mm
    g = g[g[..., 2].min(1) < nz]  # crossings above the grid never count
    x, y, z = g[..., 0], g[..., 1], g[..., 2]
    x0, x1 = np.ceil(x.min(1)).astype(int), np.floor(x.max(1)).astype(int)
    y0, y1 = np.ceil(y.min(1)).astype(int), np.floor(y.max(1)).astype(int)
    keep = (x1 >= x0) & (y1 >= y0) & (x1 >= 0) & (y1 >= 0) & (x0 < nx) & (y0 < ny)
    x, y, z, x0, x1, y0, y1 = (a[keep] for a in (x, y, z, x0, x1, y0, y1))
    # Every (triangle, grid column) pair whose column lies in the triangle's xy box.
    wx, wy = x1 - x0 + 1, y1 - y0 + 1
    count = wx * wy
    t = np.repeat(np.arange(len(x0)), count)
    k = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    cx, cy = x0[t] + k % wx[t], y0[t] + k // wx[t]
    ax, ay, bx, by, qx, qy = x[t, 0], y[t, 0], x[t, 1], y[t, 1], x[t, 2], y[t, 2]
    det = (by - qy) * (ax - qx) + (qx - bx) * (ay - qy)
    safe = np.where(det == 0, 1.0, det)
    l1 = ((by - qy) * (cx - qx) + (qx - bx) * (cy - qy)) / safe
    l2 = ((qy - ay) * (cx - qx) + (ax - qx) * (cy - qy)) / safe
    l3 = 1.0 - l1 - l2
    # Half-open on one edge so a column through a shared edge crosses once, not twice.
    hit = ((det != 0) & (l1 >= 0) & (l2 >= 0) & (l3 > 0)
           & (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny))
    zc = l1 * z[t, 0] + l2 * z[t, 1] + l3 * z[t, 2]
    zi = np.clip(np.ceil(zc[hit]).astype(int), 0, nz)
    flat = (zi * ny + cy[hit]) * nx + cx[hit]
    crossings = np.bincount(flat, minlength=(nz + 1) * ny * nx).reshape(nz + 1, ny, nx)
    return (np.cumsum(crossings[:nz], axis=0) % 2).astype(bool)


def _load_xcat_chest() -> Volume:
    (path,) = source_files("xcat-chest")  # type: ignore[misc]
    by_name = {s.name: s for s in read_nrb(path)}
    lo, hi = XCAT_BOX_MM
    # Voxelise at 1 mm (half the working spacing), then average 2 x 2 x 2 blocks: the
    # tissue maps get partial volume at 2 mm, as the other sources' do. The small
    # offset keeps the rays off the meshes' vertices.
    fine = SPACING_MM / 2.0
    shape = tuple(int(v) for v in 2 * np.ceil((hi - lo)[::-1] / SPACING_MM))
    origin = lo + np.array([0.0131, 0.0297, 0.0])
    label_fine = np.zeros(shape, dtype=np.int16)
    for name, _tissue, label in _XCAT_SURFACES:
        inside = voxelise_mesh(surface_mesh(by_name[name]), origin, fine, shape)  # type: ignore[arg-type]
        label_fine[inside] = label
    n_labels = len(_XCAT_LABEL_TISSUE)
    coarse = tuple(s // 2 for s in shape)
    fractions = np.stack([
        (label_fine == k).reshape(coarse[0], 2, coarse[1], 2, coarse[2], 2).mean((1, 3, 5))
        for k in range(n_labels)]).astype(np.float32)
    tissues = np.zeros((len(TISSUES), *coarse), dtype=np.float32)
    for k in range(n_labels):
        tissues[_XCAT_LABEL_TISSUE[k]] += fractions[k]
    labels = np.argmax(fractions, axis=0).astype(np.int16)
    native = np.tensordot(_XCAT_LABEL_HU, fractions, axes=1).astype(np.float32)
    box = _bounding_box(labels > 0, MARGIN_VOXELS)
    info = CATALOGUE["xcat-chest"]
    return Volume(
        id="xcat-chest",
        subject=info.subject,
        anatomy=info.anatomy,
        native_modality="ct",
        native=np.ascontiguousarray(native[box]),
        tissues=np.ascontiguousarray(tissues[(slice(None), *box)]),
        labels=np.ascontiguousarray(labels[box]),
        label_tissue=_XCAT_LABEL_TISSUE.astype(np.int16),
    )


_LOADERS = {
    "icbm152-brain": _load_icbm152_brain,
    "icbm152-head": _load_icbm152_head,
    "mni152-nlin6asym": _load_mni152_nlin6asym,
    "ct-brain-atlas": _load_ct_brain_atlas,
    "xcat-chest": _load_xcat_chest,
}


#: Bump when a loader changes what it derives, so stale disk caches are ignored.
_DERIVATION_VERSION = 1


def cache_dir() -> Path:
    """Where derived 2 mm volumes are kept between processes ($DISA_CACHE_DIR or ~/.cache/disa)."""
    root = Environment.read().cache_dir or Path.home() / ".cache" / "disa"
    return Path(root) / "sources"


def _cache_file(source_id: str, paths: Sequence[Path]) -> Path:
    # Keyed by the package files' size and mtime: a package upgrade invalidates it.
    stamp = ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    key = hashlib.sha256(f"{_DERIVATION_VERSION};{stamp}".encode()).hexdigest()[:16]
    return cache_dir() / f"{source_id}-{key}.npz"


def _save_cached(volume: Volume, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                native=volume.native,
                tissues=volume.tissues,
                labels=volume.labels,
                label_tissue=volume.label_tissue,
            )
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the derivation next time


def _load_cached(source_id: str, path: Path) -> Volume | None:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("native", "tissues", "labels", "label_tissue")}
    except (OSError, KeyError, ValueError):
        return None
    info = CATALOGUE[source_id]
    return Volume(
        id=source_id,
        subject=info.subject,
        anatomy=info.anatomy,
        native_modality=info.native_modality,
        **arrays,
    )


@functools.cache
def load_volume(source_id: str, use_disk_cache: bool = True) -> Volume:
    """Load a packaged source (cached per process and on disk). LookupError if not installed.

    Deriving tissue maps from 1 mm files takes seconds per source; the result is
    kept in `cache_dir()` and reused while the package files are unchanged.
    """
    if source_id not in _LOADERS:
        raise KeyError(f"unknown source {source_id!r}; known: {sorted(_LOADERS)}")
    paths = source_files(source_id)
    if paths is None:
        info = CATALOGUE[source_id]
        raise LookupError(
            f"source {source_id!r} needs package {info.package!r}: "
            f"pip install --no-deps {info.package}"
        )
    cached = _cache_file(source_id, paths)
    if use_disk_cache and cached.is_file():
        volume = _load_cached(source_id, cached)
        if volume is not None:
            return volume
    volume = _LOADERS[source_id]()
    if use_disk_cache:
        _save_cached(volume, cached)
    return volume


def load_split(split: str, ids: Sequence[str] | None = None) -> list[Volume]:
    """Every installed packaged volume of ``split`` ("training" or "held-out"); without
    ``ids``, only the sources of the evaluation (``SourceInfo.evaluation``)."""
    wanted = available_sources(split)
    if ids is not None:
        wanted = [s for s in wanted if s in ids]
    else:  # benchmark-only sources are loaded by id (load_volume), never by default
        wanted = [s for s in wanted if CATALOGUE[s].evaluation]
    return [load_volume(s) for s in wanted]


# ---------------------------------------------------------------- phantoms

PHANTOM_SHAPE = (96, 96, 96)
#: Tissue class frequencies for phantom labels: mostly soft-tissue-like classes,
#: with some air and bone so that CT- and US-like settings see extremes.
_PHANTOM_TISSUE_P = np.array([0.06, 0.2, 0.08, 0.16, 0.18, 0.18, 0.14])


def phantom_seed(split: str, index: int, base_seed: int = 0) -> np.random.SeedSequence:
    """Seed of phantom number ``index``; training and held-out draw from disjoint streams."""
    stream = {"training": 0, "held-out": 1}[split]
    return np.random.SeedSequence([0xD15A, stream, base_seed, index])


def make_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = PHANTOM_SHAPE, subject: str = "phantom"
) -> Volume:
    """An anatomy-free random smooth label map with soft tissue maps and a native image.

    Each of L labels (4-9) owns a smooth random field (Gaussian noise generated
    at 1/4 resolution, upsampled); a voxel's soft label weights are a softmax of
    the fields with random sharpness, its label the argmax. Labels get random
    tissue classes, so every synthesis setting applies. Units: voxels of 2 mm.
    """
    n_labels = int(rng.integers(4, 10))
    coarse = tuple(max(4, s // 4) for s in shape)
    scale = rng.uniform(0.8, 2.0)  # larger -> smoother blobs
    fields = np.empty((n_labels, *shape), dtype=np.float32)
    for k in range(n_labels):
        low = ndimage.gaussian_filter(rng.normal(size=coarse), scale)
        up = ndimage.zoom(low, [s / c for s, c in zip(shape, coarse, strict=True)], order=1)
        fields[k] = (up / (up.std() + 1e-9))[: shape[0], : shape[1], : shape[2]]
    sharp = rng.uniform(3.0, 12.0)
    logits = fields * sharp
    logits -= logits.max(0, keepdims=True)
    soft = np.exp(logits)
    soft /= soft.sum(0, keepdims=True)
    labels = np.argmax(fields, axis=0).astype(np.int16)
    label_tissue = rng.choice(len(TISSUES), size=n_labels, p=_PHANTOM_TISSUE_P).astype(np.int16)
    tissues = np.zeros((len(TISSUES), *shape), dtype=np.float32)
    for k in range(n_labels):
        tissues[label_tissue[k]] += soft[k]
    native = np.tensordot(rng.uniform(0.0, 1.0, n_labels).astype(np.float32), soft, axes=1)
    return Volume(
        id=PHANTOM,
        subject=subject,
        anatomy="phantom",
        native_modality="phantom",
        native=native.astype(np.float32),
        tissues=tissues,
        labels=labels,
        label_tissue=label_tissue,
        border_mode="mirror",
    )
