"""Realistic capture-range cases: each image on its own grid, cropped fields of view,
ultrasound on an oblique probe grid (the "realistic" family of capture_range.py).

Frames. Every case is built in the *anatomy frame* A: the source volume's 2 mm
array (z, y, x) as an image with origin 0 and identity direction (LPS mm). The
fixed image lies in A (on the anatomy grid, or on a probe lattice for an
ultrasound fixed image). The moving image is first sampled on its own lattice in
A (oblique direction, own spacing, its own box), then its header (origin and
direction) is mapped by the true rigid transform T, so that the anatomy at fixed
point x lies at moving point T(x): T is exactly the fixed -> moving mapping of
ITK's convention (``sitk.Resample(moving, fixed, T)`` aligns). Its voxels are
interpolated once (linear, after a Gaussian when the lattice is coarser than the
2 mm source along some direction), never twice.

Pairs (``PAIRS``); partner modalities come from ``disa.training.synthesis`` with
settings held out of training ("flair", "us-steep-attenuation"), the anatomy from
held-out sources of ``disa.training.sources`` (a held-out phantom when a source's
package is missing):

    ct-mr               fixed: CT (real HU), full field, the 2 mm anatomy grid;
                        moving: FLAIR-like MR made from the full volume, then
                        cropped to an oblique box of 40-85 % of the body's extent
                        per axis, spacing 1.2-3 mm per axis
    t1-t2               fixed: whole-head T1 (real intensities); moving: a T2-like
                        (FLAIR) slab 30-50 mm thick along a random oblique axis,
                        60-85 % in-plane, on a finer grid (1.0-1.5 mm; the source
                        is 2 mm, so the finer grid adds no detail)
    ct-us-moving        fixed: CT, full field; moving: 3-D ultrasound fan on an
                        oblique probe lattice (one axis along the beam), spacing
                        1-2 mm, zero outside the fan; its apex in tissue, energy
                        reaching a third of it, and a tissue boundary inside
                        (``fan_structure``: a sonographer aims at structure)
    us-ct               fixed: that ultrasound on its probe lattice; moving: the
                        CT on an oblique lattice covering the whole volume,
                        spacing 1.2-3 mm
    ct-mr-torso,        as ct-mr and ct-us-moving on the XCAT torso (gecatsim:
    ct-us-moving-torso  body outline, lungs, sternum; its CT is made from labels)

TRE points: fixed foreground points where both images have data at the true
pose (inside the moving lattice's box, inside the fan where an image is an
ultrasound). The initial error (the identity's TRE) is measured on the same
points, so a bin says how far the header pose is over the region that can
actually be matched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

SPACING_MM = 2.0  # the sources' grid (disa.training.sources.SPACING_MM)
#: Least ``fan_structure`` of a benchmark ultrasound (the head atlas's fans: 0.17-0.61).
MIN_FAN_STRUCTURE = 0.1


@dataclass(frozen=True)
class PairSpec:
    """How one realistic pair is made.

    ``fixed``: "ct" (the volume's native CT), "t1" (its native T1) or "us".
    ``moving``: "mr-crop", "t2-slab", "us" or "ct-oblique".
    ``swapped``: the pair is built as written, then its fixed and moving images are
    exchanged (the partial view, on its own oblique grid, becomes the fixed image, the
    whole volume the moving one; capture_range.make_realistic_cases does it).
    """

    source: str
    fixed: str
    moving: str
    note: str = ""
    swapped: bool = False


PAIRS: dict[str, PairSpec] = {
    "ct-mr": PairSpec("ct-brain-atlas", "ct", "mr-crop"),
    "t1-t2": PairSpec("mni152-nlin6asym", "t1", "t2-slab",
                      "held-out subject; brain MRI templates are also training anatomy"),
    "ct-us-moving": PairSpec("ct-brain-atlas", "ct", "us"),
    "us-ct": PairSpec("ct-brain-atlas", "us", "ct-oblique"),
    "ct-mr-torso": PairSpec("xcat-chest", "ct", "mr-crop",
                            "XCAT torso: body outline, lungs, sternum; CT made from labels"),
    "ct-us-moving-torso": PairSpec("xcat-chest", "ct", "us",
                                   "XCAT torso: body outline, lungs, sternum; CT made from labels"),
    # The partial view as the fixed image (a user's MR slab registered to a planning CT):
    # not in the default run, whose tables predate them (capture_range.REALISTIC_PAIRS).
    "mr-ct": PairSpec("ct-brain-atlas", "ct", "mr-crop", swapped=True),
    "t2-t1": PairSpec("mni152-nlin6asym", "t1", "t2-slab",
                      "held-out subject; brain MRI templates are also training anatomy",
                      swapped=True),
    "mr-ct-torso": PairSpec("xcat-chest", "ct", "mr-crop",
                            "XCAT torso: body outline, lungs, sternum; CT made from labels",
                            swapped=True),
}
#: Held-out synthesis settings of the partners.
MR_SETTING = "flair"
US_SETTING = "us-steep-attenuation"
CROP_FRACTION = (0.4, 0.85)
SLAB_MM = (30.0, 50.0)
SLAB_IN_PLANE = (0.6, 0.85)
#: Fewest overlap points a case must have (else the crop is drawn again).
MIN_OVERLAP_POINTS = 200


@dataclass(frozen=True)
class Lattice:
    """A voxel grid in physical space: voxel (i, j, k) (x, y, z order) lies at
    origin + direction @ (spacing * (i, j, k)), LPS mm; direction is a rotation."""

    size: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    def reference(self) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        image.SetSpacing(tuple(map(float, self.spacing)))
        image.SetOrigin(tuple(map(float, self.origin)))
        image.SetDirection(tuple(map(float, self.direction.ravel())))
        return image

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether each (N, 3) point lies where linear interpolation has data."""
        index = ((points - self.origin) @ self.direction) / self.spacing
        return np.all((index >= 0) & (index <= np.asarray(self.size) - 1), axis=1)


def box_lattice(centre: np.ndarray, axes: np.ndarray, extent_mm: np.ndarray,
                spacing: np.ndarray) -> Lattice:
    """The lattice covering a box (centre, columns of ``axes``, full extents, mm)."""
    size = np.maximum(2, np.round(extent_mm / spacing).astype(int) + 1)
    origin = centre - axes @ (spacing * (size - 1) / 2.0)
    return Lattice(tuple(int(s) for s in size), spacing.astype(float), origin, axes)  # type: ignore[arg-type]


def anatomy_image(array: np.ndarray) -> sitk.Image:
    """A (z, y, x) source array as an image of the anatomy frame (2 mm, origin 0)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((SPACING_MM,) * 3)
    return image


def voxel_points(mask: np.ndarray) -> np.ndarray:
    """Physical points (N, 3, LPS mm, anatomy frame) of the True voxels of a (z, y, x) mask."""
    return np.argwhere(mask)[:, ::-1].astype(np.float64) * SPACING_MM


def resample_onto(array: np.ndarray, lattice: Lattice, default: float) -> sitk.Image:
    """``array`` (anatomy grid) sampled on ``lattice`` (linear), antialiased first.

    The Gaussian has, per source axis, the variance the lattice's footprint (0.4
    spacing per lattice axis, rotated into the source axes) exceeds the source's
    own: a separable approximation of the oblique footprint, applied only where
    the lattice is coarser than 2 mm.
    """
    image = anatomy_image(array)
    footprint = lattice.direction @ np.diag((0.4 * lattice.spacing) ** 2) @ lattice.direction.T
    for axis in range(3):
        variance = footprint[axis, axis] - (0.4 * SPACING_MM) ** 2
        if variance > 0.01:
            image = sitk.RecursiveGaussian(image, float(np.sqrt(variance)), False,
                                           sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return sitk.Resample(image, lattice.reference(), sitk.Transform(), sitk.sitkLinear,
                         float(default))


def move_header(image: sitk.Image, truth: sitk.Euler3DTransform) -> sitk.Image:
    """The same voxels with the header mapped by ``truth``: a voxel at p (anatomy
    frame) is then at T(p), so T maps fixed (anatomy) points to moving points."""
    moved = sitk.Image(image)
    rotation = np.asarray(truth.GetMatrix()).reshape(3, 3)
    moved.SetOrigin(truth.TransformPoint(image.GetOrigin()))
    direction = rotation @ np.asarray(image.GetDirection()).reshape(3, 3)
    moved.SetDirection(tuple(map(float, direction.ravel())))
    return moved


def body_mask(volume) -> np.ndarray:  # volume: disa.training.sources.Volume
    """Foreground of a source: not air, and for real anatomy everything inside the
    body outline (the torso's aerated lungs are air-like tissue but still anatomy)."""
    body = volume.foreground()
    if volume.border_mode == "nearest":
        body = body | (volume.labels > 0)
    return body


def _projection_range(points: np.ndarray, axis: np.ndarray) -> tuple[float, float]:
    values = points @ axis
    return float(values.min()), float(values.max())


def crop_lattice(rng: np.random.Generator, body_points: np.ndarray, slab: bool) -> Lattice:
    """An oblique box over part of the body: per lattice axis 40-85 % of the body's
    extent along it (a slab: 30-50 mm along one axis, 60-85 % along the others), at
    a random offset inside the body's range; spacing 1.2-3 mm (slab 1.0-1.5 mm)."""
    axes = Rotation.random(random_state=rng).as_matrix()
    thin = int(rng.integers(3))
    extent, centre = np.empty(3), np.zeros(3)
    for a in range(3):
        lo, hi = _projection_range(body_points, axes[:, a])
        if slab and a == thin:
            extent[a] = min(rng.uniform(*SLAB_MM), hi - lo)
        else:
            extent[a] = rng.uniform(*(SLAB_IN_PLANE if slab else CROP_FRACTION)) * (hi - lo)
        centre += axes[:, a] * rng.uniform(lo + extent[a] / 2, hi - extent[a] / 2)
    spacing = rng.uniform(1.0, 1.5, 3) if slab else rng.uniform(1.2, 3.0, 3)
    return box_lattice(centre, axes, extent, spacing)


def full_lattice(rng: np.random.Generator, shape: tuple[int, int, int]) -> Lattice:
    """An oblique lattice covering the whole anatomy box, spacing 1.2-3 mm per axis."""
    axes = Rotation.random(random_state=rng).as_matrix()
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners *= (np.asarray(shape[::-1]) - 1) * SPACING_MM
    local = corners @ axes
    centre = axes @ ((local.min(0) + local.max(0)) / 2)
    return box_lattice(centre, axes, local.max(0) - local.min(0), rng.uniform(1.2, 3.0, 3))


@dataclass
class Ultrasound:
    """An ultrasound of the anatomy: its probe lattice image and its fan (anatomy grid)."""

    image: sitk.Image
    fan: np.ndarray  # (z, y, x) bool on the anatomy grid
    lattice: Lattice


def draw_fan(volume, rng: np.random.Generator, body: np.ndarray,
             simulate: Callable[..., object]):  # -> synthesis.UltrasoundResult
    """A fan of the held-out steep-attenuation family on the volume's own grid, drawn (up
    to 20 times) until a probe could have made it: apex in solid tissue, energy reaching
    a third of the fan, a tissue boundary inside (``fan_structure``); when no draw
    qualifies, the best of the 20 (coupled, then energy, then ``fan_boundaries``).
    Shared by ``ultrasound`` (which then puts it on a probe lattice) and
    benchmarks/deformable.py.
    """
    from disa.training.synthesis import US_STEEP

    shape = np.asarray(volume.shape)
    solid = volume.foreground()
    inner = np.argwhere(body & solid)
    central = inner[np.all(np.abs(inner - (shape - 1) / 2) <= shape / 4, axis=1)]
    candidates = central if len(central) else inner
    # Extent (voxels) as the full-field family's ct-us (0.6 of the smallest side), at
    # most 90 mm: fans 70-170 mm deep, as a probe images; a fan across a whole torso
    # would be dark past half its depth at this attenuation.
    extent = min(0.6 * float(min(volume.shape)), 45.0)
    best, best_key = None, (-1.0, -1.0, -1.0)
    for _ in range(20):
        focus = candidates[rng.integers(len(candidates))]
        us = simulate(volume, rng, focus.astype(float), extent, US_STEEP)
        apex = np.round(np.asarray(us.apex)).astype(int)
        coupled = bool(np.all((apex >= 0) & (apex < shape)) and solid[tuple(apex)])
        # ... and until energy reaches a third of the fan: a sonographer turns the probe
        # away from a lung or bone that shadows everything.
        reached = float(np.mean(us.transmission[us.fan] > 0.1)) if us.fan.any() else 0.0
        # ... and until the insonified part shows a tissue boundary: a sonographer aims at
        # structure. A fan inside one homogeneous tissue (the XCAT torso's body is one
        # soft-tissue label) has no correct pose to find: refined from the true pose,
        # every similarity drifted 5-117 mm on such torso fans (stop 19 diagnosis).
        if coupled and reached >= 1 / 3 and fan_structure(volume, us) >= MIN_FAN_STRUCTURE:
            return us
        # No draw qualifies on the XCAT torso (its only tissues are soft tissue, aerated
        # lung and bone, and energy never crosses the pleura, so ``fan_structure`` stays
        # < 0.1): keep the draw a sonographer would have kept, coupled, then reaching a
        # third of the fan, then with the most insonified tissue next to a boundary (the
        # pleura, a rib, the sternum). Returning the last draw instead gave fans dark
        # past their first centimetre (median echo 1e-11) that no method could register.
        key = (float(coupled), float(min(reached, 1 / 3)), fan_boundaries(volume, us))
        if key > best_key:
            best, best_key = us, key
    return best


def ultrasound(volume, rng: np.random.Generator, body: np.ndarray,
               simulate: Callable[..., object]) -> Ultrasound:
    """A fan of the held-out attenuation family aimed at a random body point near the
    centre (depth 70-170 mm), resampled onto a probe lattice: third axis along the
    beam, first axis at a random angle about it, box = the fan's bounding box in that
    frame, spacing 1-2 mm per axis. Zero outside the fan.

    The fan is drawn again (up to 20 times) until its apex lies in tissue that is not
    air-like: a probe is coupled to the skin, and a fan starting in air (or in an
    aerated lung) shows nothing past the first boundary (the simulation reflects
    almost all energy at an air / tissue boundary).
    """
    us = draw_fan(volume, rng, body, simulate)
    beam = np.asarray(us.axis, float)[::-1]  # (z, y, x) -> (x, y, z)
    helper = np.array([1.0, 0.0, 0.0]) if abs(beam[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(beam, helper)
    e1 /= np.linalg.norm(e1)
    e1 = Rotation.from_rotvec(beam * rng.uniform(0, 2 * np.pi)).apply(e1)
    axes = np.column_stack([e1, np.cross(beam, e1), beam])
    local = voxel_points(us.fan) @ axes
    lo, hi = local.min(0) - SPACING_MM, local.max(0) + SPACING_MM
    lattice = box_lattice(axes @ ((lo + hi) / 2), axes, hi - lo, rng.uniform(1.0, 2.0, 3))
    return Ultrasound(resample_onto(us.image, lattice, 0.0), us.fan, lattice)


def fan_structure(volume, us) -> float:
    """Share of the fan's insonified voxels (transmission > 0.1) outside its commonest
    tissue class: 0 for a fan inside one tissue, about 0.5 for a head fan across skull,
    CSF and brain."""
    reached = us.fan & (us.transmission > 0.1)
    if not reached.any():
        return 0.0
    tissue = np.asarray(volume.label_tissue)[volume.labels[reached]]
    counts = np.bincount(tissue)
    return float(1.0 - counts.max() / counts.sum())


def fan_boundaries(volume, us) -> float:
    """Share of the fan's insonified voxels (transmission > 0.1) within 2 voxels (4 mm)
    of a change of tissue class: the reflectors (pleura, bone surfaces, skin) that give
    an ultrasound its pose, where ``fan_structure`` only counts the tissue reached."""
    reached = us.fan & (us.transmission > 0.1)
    if not reached.any():
        return 0.0
    tissue = np.asarray(volume.label_tissue)[volume.labels]
    edge = np.zeros(tissue.shape, dtype=bool)
    for axis in range(3):
        change = np.diff(tissue, axis=axis) != 0
        before = [slice(None)] * 3
        after = [slice(None)] * 3
        before[axis], after[axis] = slice(0, -1), slice(1, None)
        edge[tuple(before)] |= change
        edge[tuple(after)] |= change
    near = ndimage.binary_dilation(edge, iterations=2)
    return float(near[reached].mean())


def crop_volume(volume, crop: int):  # -> Volume
    """A centred cube of ``crop`` voxels of a source (quick runs)."""
    lo = [max(0, (n - crop) // 2) for n in volume.shape]
    box = tuple(slice(a, a + crop) for a in lo)
    return dataclasses.replace(volume, native=volume.native[box],
                               tissues=volume.tissues[(slice(None), *box)],
                               labels=volume.labels[box])


@dataclass
class Built:
    """One realistic pair before the pose is drawn: both images in the anatomy frame."""

    fixed: sitk.Image
    moving: sitk.Image  # on its own lattice, header not yet moved
    overlap: np.ndarray  # (N, 3) fixed points (anatomy frame, mm) where both have data


def build_pair(volume, spec: PairSpec, rng: np.random.Generator,
               synthesize: Callable[..., np.ndarray], simulate: Callable[..., object]) -> Built:
    """Fixed and moving images of ``spec`` (anatomy frame) and their overlap points.

    ``synthesize`` / ``simulate``: disa.training.synthesis.synthesize and
    simulate_ultrasound (parameters so that a test can substitute its own).
    """
    body = body_mask(volume)
    body_points = voxel_points(body)
    for _ in range(50):
        fixed_data = np.ones(volume.shape, bool)
        if spec.fixed == "us":
            us = ultrasound(volume, rng, body, simulate)
            fixed, fixed_data = us.image, us.fan
        else:
            fixed = anatomy_image(synthesize(volume, "native", rng))
        candidates = body & fixed_data
        points = voxel_points(candidates)
        if spec.moving in ("mr-crop", "t2-slab"):
            lattice = crop_lattice(rng, body_points, slab=spec.moving == "t2-slab")
            array = synthesize(volume, MR_SETTING, rng)
            moving = resample_onto(array, lattice, float(array.min()))
            inside = lattice.contains(points)
        elif spec.moving == "us":
            us = ultrasound(volume, rng, body, simulate)
            moving, inside = us.image, us.fan[candidates]
        elif spec.moving == "ct-oblique":
            array = synthesize(volume, "native", rng)
            moving = resample_onto(array, full_lattice(rng, volume.shape), float(array.min()))
            inside = np.ones(len(points), bool)
        else:
            raise ValueError(f"unknown moving kind {spec.moving!r}")
        if inside.sum() >= MIN_OVERLAP_POINTS:
            return Built(fixed, moving, points[inside])
    raise RuntimeError(f"no overlap of at least {MIN_OVERLAP_POINTS} voxels for {spec}")
