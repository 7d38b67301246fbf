"""Crop pairs with dense LC2 targets: what one training step sees.

A *scene* is one volume rendered in two settings (z-scored like real inputs).
A *crop pair* samples the scene on two grids of side n = crop + 2 * margin
voxels (2 mm):

    fixed  voxel x  ->  scene point  c + R (x - h)
    moving voxel x  ->  scene point  c + s + R Q (x - h)          h = (n - 1) / 2

R is a shared random rotation with axis flips (the paper's augmentation), s a
random relative shift and Q a small relative rotation. Descriptor i of the
fixed crop and descriptor i of the moving crop (both centred on crop voxel
4i) therefore see patches offset by s and Q, and the target at i is the LC2 of
those two patches as sampled: local LC2 of the two aligned arrays, taken at
the descriptor centres (every 4th voxel) by the pair kernel of
`disa.training.pair_lc2`, in one call with the cross pairs below
(`dense_targets`, the box-sum identities of `disa.registration.similarity.lc2`, is the
independent reference the tests hold it to). Every output voxel is supervised. The margin (8 = the
largest LC2 radius 7 + 1 voxel for the gradient) lets the cubes of border
descriptors use real context; the network sees only the central crop^3.

Cross pairs: besides descriptor i of both crops, ``cross_pairs`` pairs
(fixed descriptor i, moving descriptor j) with j - i drawn uniformly within
+-``cross_reach`` descriptor voxels (+-16 input voxels, the window of the
held-out evaluation) are supervised with the LC2 of their patches
(`disa.training.pair_lc2`). Without them the network only ever compares
nearly co-located patches and over-predicts the similarity of unrelated ones.

Targets are symmetric by default: the mean of LC2 with either crop in the MR
(gradient) role. The dot product is symmetric, so against a role drawn at
random (the paper's target, and our evaluation's) the best it can do is
predict that mean; training on it removes label noise the network cannot fit.
With ``symmetric_target=False`` the role is drawn per pair as in the paper.
Intensity augmentation (sign flip p = 0.3, shift N(0, 0.2^2), scale U(0.7, 1.3)) is drawn
per crop and applied before the target is computed, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from disa.core.errors import InputError
from disa.core.preprocess import normalise_intensities
from disa.registration.similarity import lc2
from disa.training.pair_lc2 import pair_lc2
from disa.training.sources import Volume
from disa.training.synthesis import TRAINING_SETTINGS, synthesize

STRIDE = 4  # the network's output stride (disa.model.card.STRIDE)


@dataclass(frozen=True)
class PairConfig:
    """How crop pairs are drawn (voxels of the 2 mm grid, degrees)."""

    crop: int = 64
    margin: int = 8
    radii: tuple[int, ...] = (3, 5, 7)
    settings: tuple[str, ...] = TRAINING_SETTINGS
    #: Probability of no relative shift/rotation (targets then follow local structure).
    p_aligned: float = 0.3
    #: Shift length = max_shift * u^2, u ~ U(0, 1): mostly small shifts, since
    #: LC2 falls to its floor within a few voxels and high targets are the rare ones.
    max_shift: float = 8.0
    max_rotation_deg: float = 10.0
    #: Crop centres scatter this much (voxels, sd) around the scene focus.
    centre_jitter: float = 4.0
    p_sign_flip: float = 0.3
    shift_sd: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.3)
    #: Target = mean LC2 over both MR roles (else one role drawn per pair).
    symmetric_target: bool = True
    #: Supervised pairs at different positions per crop pair, and their reach
    #: (descriptor voxels per axis; 4 = 16 input voxels).
    cross_pairs: int = 4096
    cross_reach: int = 4

    def __post_init__(self) -> None:
        if self.crop % STRIDE or self.crop < 2 * STRIDE:
            raise ValueError(
                f"crop must be a multiple of {STRIDE} and >= {2 * STRIDE}, got {self.crop}"
            )
        if self.margin < max(self.radii) + 1:
            raise ValueError("margin must cover the largest LC2 radius plus the gradient voxel")

    @property
    def side(self) -> int:
        return self.crop + 2 * self.margin

    @property
    def out_side(self) -> int:
        return self.crop // STRIDE


@dataclass(frozen=True)
class Scene:
    """One volume in two settings, each z-scored over the whole volume (float32)."""

    volume_id: str
    anatomy: str
    settings: tuple[str, str]
    images: tuple[np.ndarray, np.ndarray]
    focus: np.ndarray  # voxel (z, y, x) around which crops are taken
    border_mode: str


@dataclass
class CropPair:
    """Network inputs (crop^3 each), LC2 targets at equal positions ((crop/4)^3) and
    at cross positions (flat descriptor indices into fixed and moving, and targets)."""

    fixed: np.ndarray
    moving: np.ndarray
    target: np.ndarray
    cross_fixed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cross_moving: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cross_target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    meta: dict[str, object] = field(default_factory=dict)


def pick_focus(volume: Volume, rng: np.random.Generator) -> np.ndarray:
    """A random voxel inside the anatomy (any voxel for phantoms)."""
    if volume.border_mode == "mirror":
        return np.array([rng.uniform(0.3, 0.7) * (s - 1) for s in volume.shape])
    fg = np.flatnonzero(volume.foreground()[::2, ::2, ::2])
    idx = np.unravel_index(rng.choice(fg), tuple((s + 1) // 2 for s in volume.shape))
    return np.asarray(idx, dtype=np.float64) * 2.0


def normalise(image: np.ndarray) -> np.ndarray:
    """The inference normalisation; a constant image (possible for a tiny US fan) maps to 0."""
    try:
        return normalise_intensities(image)
    except InputError:
        return np.zeros(image.shape, np.float32)


def make_scene(
    volume: Volume, settings: tuple[str, str], rng: np.random.Generator, extent: float
) -> Scene:
    """Render ``volume`` in two settings around a random focus; ``extent`` sizes the US fan."""
    focus = pick_focus(volume, rng)
    images = tuple(normalise(synthesize(volume, s, rng, focus, extent)) for s in settings)
    return Scene(volume.id, volume.anatomy, settings, images, focus, volume.border_mode)  # type: ignore[arg-type]


def random_rotation(rng: np.random.Generator, max_deg: float | None = None) -> np.ndarray:
    """3x3 matrix: uniform rotation with random axis flips, or a rotation of at most max_deg."""
    if max_deg is None:
        flips = np.diag(rng.choice([-1.0, 1.0], size=3))
        return Rotation.random(random_state=rng).as_matrix() @ flips
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return Rotation.from_rotvec(axis * np.deg2rad(rng.uniform(0.0, max_deg))).as_matrix()


def sample_grid(
    image: np.ndarray, centre: np.ndarray, matrix: np.ndarray, side: int, mode: str
) -> np.ndarray:
    """Sample ``image`` on a side^3 grid: voxel x -> centre + matrix (x - h) (trilinear)."""
    h = (side - 1) / 2.0
    local = np.indices((side,) * 3, dtype=np.float32).reshape(3, -1) - np.float32(h)
    coords = (matrix.astype(np.float32) @ local) + centre.astype(np.float32)[:, None]
    out = ndimage.map_coordinates(image, coords, order=1, mode=mode)
    return out.reshape((side,) * 3).astype(np.float32)


@dataclass(frozen=True)
class IntensityDraw:
    """One crop's intensity augmentation: ``sign * scale * crop + shift``."""

    sign: float
    scale: float
    shift: float

    @property
    def gain(self) -> float:
        return self.sign * self.scale


def draw_intensity(rng: np.random.Generator, cfg: PairConfig) -> IntensityDraw:
    sign = -1.0 if rng.random() < cfg.p_sign_flip else 1.0
    scale = rng.uniform(*cfg.scale_range)
    shift = rng.normal(0.0, cfg.shift_sd)
    return IntensityDraw(sign, float(scale), float(shift))


def apply_intensity(crop: np.ndarray, draw: IntensityDraw) -> np.ndarray:
    return (draw.sign * draw.scale * crop + draw.shift).astype(np.float32)


def augment_intensity(crop: np.ndarray, rng: np.random.Generator, cfg: PairConfig) -> np.ndarray:
    return apply_intensity(crop, draw_intensity(rng, cfg))


@dataclass(frozen=True)
class CropDraw:
    """Everything random about one crop pair's geometry and intensities (voxels).

    fixed voxel x -> scene point ``centre + shared (x - h)``, moving voxel x ->
    ``centre + shift + shared relative (x - h)``, h = (side - 1) / 2. Drawn apart
    from the sampling so that the CPU pipeline (`sample_crop_pair`) and the device
    one (`disa.training.device`) make the same crops from the same generator.
    """

    shared: np.ndarray
    shift: np.ndarray
    relative: np.ndarray
    centre: np.ndarray
    fixed_intensity: IntensityDraw
    moving_intensity: IntensityDraw

    @property
    def moving_matrix(self) -> np.ndarray:
        return self.shared @ self.relative


def draw_crop(rng: np.random.Generator, focus: np.ndarray, cfg: PairConfig) -> CropDraw:
    """The random part of a crop pair around ``focus`` (consumes ``rng`` in the order the
    v1-v5 runs did, so their batches are unchanged)."""
    shared = random_rotation(rng)
    if rng.random() < cfg.p_aligned:
        shift, relative = np.zeros(3), np.eye(3)
    else:
        direction = rng.normal(size=3)
        shift = direction / np.linalg.norm(direction) * cfg.max_shift * rng.uniform() ** 2
        relative = random_rotation(rng, cfg.max_rotation_deg)
    centre = focus + rng.normal(0.0, cfg.centre_jitter, 3)
    fixed_intensity = draw_intensity(rng, cfg)
    moving_intensity = draw_intensity(rng, cfg)
    return CropDraw(shared, shift, relative, centre, fixed_intensity, moving_intensity)


def descriptor_centres(cfg: PairConfig) -> np.ndarray:
    """(K, 3) voxel indices, in the padded crop, of the descriptor centres 4i (+ margin)."""
    axis = cfg.margin + STRIDE * np.arange(cfg.out_side)
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)


def dense_targets(
    fixed: np.ndarray, moving: np.ndarray, mr_role: str, cfg: PairConfig
) -> np.ndarray:
    """Multi-radius LC2 of the two padded crops at every descriptor centre, (k, k, k) float32,
    by box sums: the reference for the pair kernel that `sample_crop_pair` uses."""
    source, target = (fixed, moving) if mr_role == "fixed" else (moving, fixed)
    values = lc2.local_lc2_multi(target, source, cfg.radii, points=descriptor_centres(cfg))
    k = cfg.out_side
    return values.reshape(k, k, k).astype(np.float32)


def cross_indices(
    rng: np.random.Generator, cfg: PairConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) descriptor indices i (fixed) and j (moving), j - i uniform in the reach, j != i."""
    k, reach, n = cfg.out_side, cfg.cross_reach, cfg.cross_pairs
    chosen_i: list[np.ndarray] = []
    chosen_j: list[np.ndarray] = []
    have = 0
    while have < n:
        i = rng.integers(0, k, size=(2 * n, 3))
        j = i + rng.integers(-reach, reach + 1, size=(2 * n, 3))
        ok = np.all((j >= 0) & (j < k), axis=1) & np.any(j != i, axis=1)
        chosen_i.append(i[ok])
        chosen_j.append(j[ok])
        have += int(ok.sum())
    return np.concatenate(chosen_i)[:n], np.concatenate(chosen_j)[:n]


def sample_crop_pair(scene: Scene, rng: np.random.Generator, cfg: PairConfig) -> CropPair:
    """One fixed/moving crop pair of ``scene`` with its dense LC2 targets."""
    draw = draw_crop(rng, scene.focus, cfg)
    shift = draw.shift
    fixed = sample_grid(scene.images[0], draw.centre, draw.shared, cfg.side, scene.border_mode)
    moving = sample_grid(
        scene.images[1], draw.centre + shift, draw.moving_matrix, cfg.side, scene.border_mode
    )
    fixed = apply_intensity(fixed, draw.fixed_intensity)
    moving = apply_intensity(moving, draw.moving_intensity)
    mr_role = "fixed" if rng.random() < 0.5 else "moving"
    k = cfg.out_side
    cross_i, cross_j = cross_indices(rng, cfg) if cfg.cross_pairs else (np.zeros((0, 3), int),) * 2
    # One kernel call for equal positions and cross pairs: the crops' gradients and
    # float64 copies are made once.
    centres = descriptor_centres(cfg)
    both = pair_lc2(
        fixed,
        moving,
        np.concatenate([centres, cfg.margin + STRIDE * cross_i]),
        np.concatenate([centres, cfg.margin + STRIDE * cross_j]),
        cfg.radii,
    )
    equal, cross = both[: len(centres)], both[len(centres):]
    if cfg.symmetric_target:
        mr_role = "both"
        target = equal.mean(axis=1)
        cross_target = cross.mean(axis=1)
    else:
        # Column 0: the fixed crop gives intensity and gradient (the MR role).
        target = equal[:, 0 if mr_role == "fixed" else 1]
        cross_target = cross[np.arange(len(cross)), rng.integers(0, 2, len(cross))]
    target = target.reshape(k, k, k).astype(np.float32)
    inner = slice(cfg.margin, cfg.margin + cfg.crop)
    return CropPair(
        fixed=np.ascontiguousarray(fixed[inner, inner, inner]),
        moving=np.ascontiguousarray(moving[inner, inner, inner]),
        target=target,
        cross_fixed=np.ravel_multi_index(tuple(cross_i.T), (k, k, k)).astype(np.int64),
        cross_moving=np.ravel_multi_index(tuple(cross_j.T), (k, k, k)).astype(np.int64),
        cross_target=cross_target.astype(np.float32),
        meta={
            "volume": scene.volume_id,
            "anatomy": scene.anatomy,
            "settings": scene.settings,
            "mr_role": mr_role,
            "shift_voxels": float(np.linalg.norm(shift)),
        },
    )
