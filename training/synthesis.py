"""Synthetic modalities of one anatomy: the multimodal pairs DISA trains on.

No package ships a real co-registered multimodal pair or any 3D ultrasound, so
both sides of a pair are made from one `Volume` (tissue maps, labels, native
intensities) by a named *setting*. Two settings applied to the same volume
give perfectly aligned images whose intensities are related by an unknown,
spatially varying, possibly non-monotonic function -- what LC2 is built for.

Settings (``SETTINGS``; training uses ``TRAINING_SETTINGS``, evaluation adds
``HELD_OUT_SETTINGS``, parameter families never seen in training):

    t1, t2, pd    tissue-map mixtures with MR-like contrast tables (+ jitter),
                  Rician noise
    ct            Hounsfield-like tissue values (air -1000, bone ~+900), optional
                  random window, Gaussian noise
    labels        independent random intensity per label (anatomy-agnostic)
    lut           a random smooth non-monotonic 1-D lookup table (4-8 knots)
                  applied to the native intensities
    native        the real native image (T1 or CT) itself
    us            ultrasound-like: reflection from impedance jumps along each ray
                  of a fan, depth attenuation, shadowing behind strong reflectors,
                  Rayleigh speckle, log compression, fan-shaped field of view
    held out:
    us-steep-attenuation   us with 3x attenuation, stronger shadows, narrower fan
    lut-high-frequency     lut with 12-20 knots
    flair                  FLAIR-like MR contrast (CSF dark, GM brighter than WM), a
                           contrast table no training setting uses

Shared corruptions (not for us-like settings, which have their own): smooth
multiplicative bias field, blur, noise, partial field of view (a half-space
cut). Everything is in voxels of the volume's 2 mm grid; images are returned
raw (arbitrary units) and z-scored later like real inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from disa.training.sources import TISSUES, Volume

TRAINING_SETTINGS: tuple[str, ...] = ("t1", "t2", "pd", "ct", "labels", "lut", "native", "us")
HELD_OUT_SETTINGS: tuple[str, ...] = ("us-steep-attenuation", "lut-high-frequency", "flair")

# (mean, between-scene sd) per tissue, in the order of TISSUES:
# air, soft, bone, csf, gm, wm, deep.
_MR_TABLES: dict[str, list[tuple[float, float]]] = {
    "t1": [
        (0.0, 0.02),
        (0.75, 0.2),
        (0.12, 0.08),
        (0.15, 0.08),
        (0.5, 0.08),
        (0.78, 0.08),
        (0.62, 0.08),
    ],
    "t2": [
        (0.0, 0.02),
        (0.45, 0.2),
        (0.06, 0.05),
        (1.0, 0.1),
        (0.62, 0.08),
        (0.42, 0.08),
        (0.5, 0.08),
    ],
    "pd": [
        (0.0, 0.02),
        (0.7, 0.15),
        (0.1, 0.06),
        (0.95, 0.08),
        (0.8, 0.06),
        (0.68, 0.06),
        (0.75, 0.06),
    ],
    # Held out (benchmarks): fluid-suppressed T2. CSF dark as in T1, but grey
    # matter brighter than white matter as in T2: a contrast order of the brain
    # tissues that none of the training tables has.
    "flair": [
        (0.0, 0.02),
        (0.5, 0.15),
        (0.05, 0.04),
        (0.12, 0.05),
        (0.7, 0.08),
        (0.48, 0.08),
        (0.6, 0.08),
    ],
}
_CT_TABLE_HU = [
    (-1000.0, 30.0),
    (20.0, 60.0),
    (900.0, 350.0),
    (8.0, 5.0),
    (40.0, 5.0),
    (28.0, 5.0),
    (36.0, 5.0),
]


@dataclass(frozen=True)
class UltrasoundParams:
    """Parameter family of the ultrasound simulation (ranges drawn uniformly).

    Attenuation is per voxel (2 mm) and one way, after the time-gain
    compensation a scanner applies, hence far below tissue values in dB/cm.
    """

    attenuation: tuple[float, float] = (0.002, 0.012)
    bone_attenuation_factor: tuple[float, float] = (4.0, 15.0)
    shadow_gain: tuple[float, float] = (0.5, 1.5)
    half_angle_deg: tuple[float, float] = (25.0, 45.0)
    reflection_weight: tuple[float, float] = (2.0, 8.0)
    compression: tuple[float, float] = (5.0, 60.0)


US_DEFAULT = UltrasoundParams()
US_STEEP = UltrasoundParams(
    attenuation=(0.015, 0.04),
    bone_attenuation_factor=(10.0, 30.0),
    shadow_gain=(2.0, 4.0),
    half_angle_deg=(18.0, 28.0),
)


@dataclass(frozen=True)
class UltrasoundResult:
    """Simulated ultrasound on the volume grid (float32) with its fan and transmission."""

    image: np.ndarray
    fan: np.ndarray  # bool: inside the field of view
    transmission: np.ndarray  # float32 in [0, 1]: energy reaching each voxel (0 in shadows)
    apex: np.ndarray  # (3,) voxel coordinates (z, y, x)
    axis: np.ndarray  # (3,) unit beam axis


# ---------------------------------------------------------------- helpers


def _tissue_mixture(
    volume: Volume, table: list[tuple[float, float]], label_sd: float, rng: np.random.Generator
) -> np.ndarray:
    """Soft tissue maps times drawn tissue values, plus a small per-label offset."""
    values = np.array([rng.normal(m, s) for m, s in table], dtype=np.float32)
    image = np.tensordot(values, volume.tissues, axes=1)
    offsets = rng.normal(0.0, label_sd, size=len(volume.label_tissue)).astype(np.float32)
    offsets[volume.label_tissue == TISSUES.index("air")] = 0.0
    return image + offsets[volume.labels]


def _unit_range(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Map the 1st-99th percentiles to [0, 1] (clipped)."""
    values = image[mask] if mask is not None and mask.any() else image
    lo, hi = np.percentile(values, (1, 99))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def random_lut(rng: np.random.Generator, knots: int) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth random non-monotonic map [0, 1] -> [0, 1] through ``knots`` random values."""
    x = np.linspace(0.0, 1.0, knots)
    y = rng.uniform(0.0, 1.0, knots)
    curve = PchipInterpolator(x, y)  # no overshoot: stays within the knot values
    table_x = np.linspace(0.0, 1.0, 1025)
    table_y = curve(table_x).astype(np.float32)
    return lambda v: np.interp(v, table_x, table_y).astype(np.float32)


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, coarse: int = 4) -> np.ndarray:
    """Zero-mean unit-std low-frequency field: random coarse grid, cubic upsampling."""
    low = rng.normal(size=(coarse,) * len(shape))
    up = ndimage.zoom(low, [s / coarse for s in shape], order=3, mode="nearest")
    up = up[tuple(slice(0, s) for s in shape)]
    return ((up - up.mean()) / (up.std() + 1e-9)).astype(np.float32)


def _rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt((image + n1) ** 2 + n2**2)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def corrupt(
    image: np.ndarray, rng: np.random.Generator, focus: np.ndarray, rician: bool
) -> np.ndarray:
    """Bias field, blur, noise and a partial field of view, each with some probability.

    ``image`` should be roughly in [0, 1]; ``focus`` (voxels, (z, y, x)) is where
    the crops will be taken, so a field-of-view cut lands near them.
    """
    out = image.astype(np.float32, copy=True)
    if rng.random() < 0.6:
        out *= np.exp(rng.uniform(0.05, 0.35) * smooth_field(out.shape, rng))
    if rng.random() < 0.5:
        out = ndimage.gaussian_filter(out, rng.uniform(0.3, 1.2))
    sigma = rng.uniform(0.0, 0.06)
    if sigma > 0.0:
        out = (
            _rician(out, sigma, rng)
            if rician
            else out + rng.normal(0.0, sigma, out.shape).astype(np.float32)
        )
    if rng.random() < 0.15:
        normal = _random_unit(rng)
        grid = np.indices(out.shape, dtype=np.float32)
        distance = np.tensordot(
            normal.astype(np.float32), grid - focus[:, None, None, None].astype(np.float32), axes=1
        )
        out[distance > rng.uniform(6.0, 30.0)] = float(out.min())
    return out


# ---------------------------------------------------------------- settings


def _mr(kind: str) -> Callable[[Volume, np.random.Generator, np.ndarray, float], np.ndarray]:
    def make(
        volume: Volume, rng: np.random.Generator, focus: np.ndarray, extent: float
    ) -> np.ndarray:
        return corrupt(
            _tissue_mixture(volume, _MR_TABLES[kind], 0.03, rng), rng, focus, rician=True
        )

    return make


def _ct(volume: Volume, rng: np.random.Generator, focus: np.ndarray, extent: float) -> np.ndarray:
    hu = _tissue_mixture(volume, _CT_TABLE_HU, 3.0, rng)
    if rng.random() < 0.5:  # a soft-tissue/brain window, as CT is often stored or viewed
        centre, width = rng.uniform(10.0, 70.0), rng.uniform(60.0, 400.0)
        lo, hi = centre - width / 2, centre + width / 2
    else:
        lo, hi = -1000.0, 2000.0
    scaled = (np.clip(hu, lo, hi) - lo) / (hi - lo)
    return corrupt(scaled, rng, focus, rician=False)


def _labels(
    volume: Volume, rng: np.random.Generator, focus: np.ndarray, extent: float
) -> np.ndarray:
    values = rng.uniform(0.0, 1.0, len(volume.label_tissue)).astype(np.float32)
    # Labels are hard at 2 mm; a little blur stands in for partial volume.
    image = ndimage.gaussian_filter(values[volume.labels], rng.uniform(0.4, 1.0))
    return corrupt(image, rng, focus, rician=False)


def _lut(
    knots: tuple[int, int],
) -> Callable[[Volume, np.random.Generator, np.ndarray, float], np.ndarray]:
    def make(
        volume: Volume, rng: np.random.Generator, focus: np.ndarray, extent: float
    ) -> np.ndarray:
        base = _unit_range(volume.native, volume.foreground())
        lut = random_lut(rng, int(rng.integers(knots[0], knots[1] + 1)))
        return corrupt(lut(base), rng, focus, rician=False)

    return make


def _native(
    volume: Volume, rng: np.random.Generator, focus: np.ndarray, extent: float
) -> np.ndarray:
    base = _unit_range(volume.native, volume.foreground())
    return corrupt(base, rng, focus, rician=volume.native_modality != "ct")


def _us(
    params: UltrasoundParams,
) -> Callable[[Volume, np.random.Generator, np.ndarray, float], np.ndarray]:
    def make(
        volume: Volume, rng: np.random.Generator, focus: np.ndarray, extent: float
    ) -> np.ndarray:
        return simulate_ultrasound(volume, rng, focus, extent, params).image

    return make


SETTINGS: dict[str, Callable[[Volume, np.random.Generator, np.ndarray, float], np.ndarray]] = {
    "t1": _mr("t1"),
    "t2": _mr("t2"),
    "pd": _mr("pd"),
    "ct": _ct,
    "labels": _labels,
    "lut": _lut((4, 8)),
    "native": _native,
    "us": _us(US_DEFAULT),
    "us-steep-attenuation": _us(US_STEEP),
    "lut-high-frequency": _lut((12, 20)),
    "flair": _mr("flair"),
}


def synthesize(
    volume: Volume,
    setting: str,
    rng: np.random.Generator,
    focus: np.ndarray | None = None,
    extent: float = 64.0,
) -> np.ndarray:
    """One synthetic modality of ``volume`` (float32, raw units, volume's grid).

    ``focus`` (voxel coordinates (z, y, x)) is where crops will be taken, default
    the centre; ``extent`` (voxels) the size of the region that must be imaged
    (the ultrasound fan is placed to cover it).
    """
    if setting not in SETTINGS:
        raise KeyError(f"unknown synthesis setting {setting!r}; known: {sorted(SETTINGS)}")
    f = np.asarray(
        focus if focus is not None else (np.array(volume.shape) - 1) / 2.0, dtype=np.float64
    )
    image = SETTINGS[setting](volume, rng, f, float(extent))
    return np.ascontiguousarray(image, dtype=np.float32)


# ---------------------------------------------------------------- ultrasound

# Acoustic impedance ranges (MRayl) per tissue: air, soft, bone, csf, gm, wm, deep.
# Soft-tissue contrasts are exaggerated against physics so boundaries show after
# log compression, as they do on real scanners through scattering differences.
_IMPEDANCE = [
    (0.0004, 0.001),
    (1.35, 1.75),
    (3.0, 7.0),
    (1.45, 1.55),
    (1.5, 1.7),
    (1.5, 1.7),
    (1.5, 1.7),
]
_ECHOGENICITY = [
    (0.0, 0.0),
    (0.2, 1.0),
    (0.3, 1.0),
    (0.0, 0.08),
    (0.1, 0.8),
    (0.1, 0.8),
    (0.1, 0.8),
]


def _orthonormal_frame(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(axis, e1)


def simulate_ultrasound(
    volume: Volume,
    rng: np.random.Generator,
    focus: np.ndarray,
    extent: float,
    params: UltrasoundParams = US_DEFAULT,
) -> UltrasoundResult:
    """Fan-beam ultrasound-like image of ``volume`` aimed at ``focus`` (voxels).

    Rays leave an apex placed 0.4-1.0 ``extent`` before the focus along a random
    axis, within a cone of random half angle, to a depth beyond the focus. Along
    each ray (sampled every voxel on a polar grid): intensity reflection
    coefficient from impedance jumps, transmission = product of (1 - reflection)
    ** shadow_gain times exp(-attenuation * depth) (so strong reflectors, bone and
    air, shadow what lies behind). The echo = transmission x (reflection
    amplitude + echogenicity x Rayleigh speckle), log-compressed; zero outside
    the fan.
    """
    # The draws from `rng` happen in one fixed order (tissue properties, fan, rays,
    # speckle, compression), so that a seed makes the same image: the helpers below are
    # called in that order.
    u = rng.uniform
    impedance, echogenicity, attenuation = _acoustic_maps(volume, rng, params)
    axis = _random_unit(rng)
    focus = np.asarray(focus, dtype=np.float64)
    apex = focus - axis * extent * u(0.4, 1.0)
    fan_shape = _Fan(apex, axis, *_orthonormal_frame(axis),
                     depth=float(np.linalg.norm(focus - apex) + extent * u(0.5, 0.9)),
                     tan_max=float(np.tan(np.deg2rad(u(*params.half_angle_deg)))))
    trans, refl, fan = _trace_fan(impedance, attenuation, volume, fan_shape, rng, params)

    # Rayleigh speckle: magnitude of a slightly correlated complex Gaussian field, mean ~1.
    re = ndimage.gaussian_filter(rng.normal(size=volume.shape).astype(np.float32), 0.7)
    im = ndimage.gaussian_filter(rng.normal(size=volume.shape).astype(np.float32), 0.7)
    speckle = np.sqrt(re * re + im * im)
    speckle /= speckle.mean() + 1e-9
    echo = trans * (refl + echogenicity * speckle)
    k = u(*params.compression)
    image = np.log1p(k * echo) / np.log1p(k)
    image = np.where(fan, image, 0.0).astype(np.float32)
    return UltrasoundResult(
        image=image,
        fan=fan,
        transmission=np.where(fan, trans, 0.0).astype(np.float32),
        apex=apex,
        axis=axis,
    )


def _acoustic_maps(volume: Volume, rng: np.random.Generator, params: UltrasoundParams
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(impedance, echogenicity, attenuation per voxel) of ``volume``: each tissue's value
    drawn from its range, plus a per-label jitter (none for air)."""
    u = rng.uniform
    z_t = np.array([u(*r) for r in _IMPEDANCE], dtype=np.float32)
    e_t = np.array([u(*r) for r in _ECHOGENICITY], dtype=np.float32)
    alpha = u(*params.attenuation)
    a_t = np.full(len(TISSUES), alpha, dtype=np.float32)
    a_t[TISSUES.index("bone")] *= u(*params.bone_attenuation_factor)
    n_labels = len(volume.label_tissue)
    air = volume.label_tissue == TISSUES.index("air")
    z_jit = np.where(air, 0.0, rng.normal(0.0, 0.03, n_labels)).astype(np.float32)
    e_jit = np.where(air, 0.0, rng.normal(0.0, 0.1, n_labels)).astype(np.float32)
    impedance = np.tensordot(z_t, volume.tissues, axes=1) + z_jit[volume.labels]
    echogenicity = np.clip(
        np.tensordot(e_t, volume.tissues, axes=1) + e_jit[volume.labels], 0.0, None
    )
    attenuation = np.tensordot(a_t, volume.tissues, axes=1)
    return impedance, echogenicity, attenuation


@dataclass(frozen=True)
class _Fan:
    """The probe's fan in voxel coordinates: rays from ``apex`` around the unit ``axis``
    (``e1``, ``e2`` complete the frame), lateral tangents up to ``tan_max`` on both frame
    axes, out to ``depth`` voxels."""

    apex: np.ndarray
    axis: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    depth: float
    tan_max: float


def _trace_fan(impedance: np.ndarray, attenuation: np.ndarray, volume: Volume, fan: _Fan,
               rng: np.random.Generator, params: UltrasoundParams
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(transmission, reflection echo, fan mask) on the volume's grid: reflection and
    shadowing computed along the rays on a polar grid, then sampled at every voxel of
    the fan (zero outside it)."""
    u = rng.uniform
    apex, axis, e1, e2, depth, tan_max = (fan.apex, fan.axis, fan.e1, fan.e2, fan.depth,
                                          fan.tan_max)
    # Polar grid: depth every voxel, lateral tangents so the far end is ~1.5 voxels apart.
    n_r = int(np.ceil(depth)) + 1
    n_t = max(8, int(np.ceil(2 * tan_max * depth / 1.5)) + 1)
    r = np.arange(n_r, dtype=np.float64)
    t = np.linspace(-tan_max, tan_max, n_t)
    ta, tb = np.meshgrid(t, t, indexing="ij")
    dirs = axis[None, None, :] + ta[..., None] * e1 + tb[..., None] * e2
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    pts = (
        apex[:, None, None, None] + r[None, :, None, None] * dirs.transpose(2, 0, 1)[:, None, :, :]
    )
    mode = volume.border_mode
    z_p = ndimage.map_coordinates(impedance, pts, order=1, mode=mode)
    a_p = ndimage.map_coordinates(attenuation, pts, order=1, mode=mode)

    z_next = np.concatenate([z_p[1:], z_p[-1:]], axis=0)
    amplitude = np.abs(z_next - z_p) / np.maximum(z_next + z_p, 1e-6)
    reflect = np.clip(amplitude**2, 0.0, 0.999)
    gain = u(*params.shadow_gain)
    log_t = gain * np.log1p(-reflect) - a_p
    # Exclusive cumulative sum: a reflector shadows what lies behind it, not itself.
    log_t = np.concatenate([np.zeros_like(log_t[:1]), np.cumsum(log_t, axis=0)[:-1]], axis=0)
    trans_p = np.exp(log_t).astype(np.float32)
    echo_p = (trans_p * amplitude * u(*params.reflection_weight)).astype(np.float32)

    # Back to the Cartesian grid: polar coordinates of every voxel.
    grid = np.indices(volume.shape, dtype=np.float32).reshape(3, -1).T - apex.astype(np.float32)
    dist = np.linalg.norm(grid, axis=1)
    along = grid @ axis.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ga = (grid @ e1.astype(np.float32)) / along
        gb = (grid @ e2.astype(np.float32)) / along
    inside = (along > 0) & (dist <= depth) & (ga * ga + gb * gb <= tan_max * tan_max)
    idx = np.flatnonzero(inside)
    step = (2 * tan_max) / (n_t - 1)
    coords = np.stack([dist[idx], (ga[idx] + tan_max) / step, (gb[idx] + tan_max) / step])
    trans = np.zeros(dist.shape, dtype=np.float32)
    refl = np.zeros(dist.shape, dtype=np.float32)
    trans[idx] = ndimage.map_coordinates(trans_p, coords, order=1, mode="nearest")
    refl[idx] = ndimage.map_coordinates(echo_p, coords, order=1, mode="nearest")
    return (trans.reshape(volume.shape), refl.reshape(volume.shape),
            inside.reshape(volume.shape))
