"""Synthesis: finite, sensible, deterministic per seed; the ultrasound has a fan and shadows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from disa.training import sources, synthesis
from disa.training.pairs import normalise

ALL = synthesis.TRAINING_SETTINGS + synthesis.HELD_OUT_SETTINGS


def test_training_and_held_out_settings_are_disjoint() -> None:
    assert not set(synthesis.TRAINING_SETTINGS) & set(synthesis.HELD_OUT_SETTINGS)
    assert set(ALL) == set(synthesis.SETTINGS)


@pytest.mark.parametrize("setting", ALL)
def test_setting_is_finite_sensible_and_deterministic(
    phantom: sources.Volume, setting: str
) -> None:
    a = synthesis.synthesize(phantom, setting, np.random.default_rng(5), extent=24.0)
    b = synthesis.synthesize(phantom, setting, np.random.default_rng(5), extent=24.0)
    c = synthesis.synthesize(phantom, setting, np.random.default_rng(6), extent=24.0)
    assert a.shape == phantom.shape and a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Raw images live on a unit-ish scale (CT is windowed / scaled to [0, 1]).
    assert a.min() > -0.5 and a.max() < 5.0
    assert a.std() > 1e-3
    z = normalise(a)
    assert np.isfinite(z).all() and np.abs(z).max() <= 5.0


def test_lut_is_smooth_and_non_monotonic_in_general() -> None:
    lut = synthesis.random_lut(np.random.default_rng(3), 8)
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    y = lut(x)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.abs(np.diff(y)).max() < 0.05  # no jumps
    assert np.any(np.diff(y) > 0) and np.any(np.diff(y) < 0)


def _slab_volume() -> sources.Volume:
    """Soft tissue with a bone slab across z = 20..22: a known strong reflector."""
    shape = (48, 40, 40)
    tissues = np.zeros((len(sources.TISSUES), *shape), np.float32)
    tissues[sources.T["gm"]] = 1.0
    tissues[:, 20:23] = 0.0
    tissues[sources.T["bone"], 20:23] = 1.0
    labels = np.zeros(shape, np.int16)
    labels[20:23] = 1
    return sources.Volume(
        id="slab",
        subject="slab",
        anatomy="test",
        native_modality="phantom",
        native=tissues[sources.T["bone"]].copy(),
        tissues=tissues,
        labels=labels,
        label_tissue=np.array([sources.T["gm"], sources.T["bone"]]),
    )


def test_ultrasound_has_fan_and_shadow_behind_bone() -> None:
    volume = _slab_volume()
    params = dataclasses.replace(synthesis.US_DEFAULT, shadow_gain=(1.0, 1.0))
    for seed in range(20):
        us = synthesis.simulate_ultrasound(
            volume, np.random.default_rng(seed), np.array([24.0, 20.0, 20.0]), 30.0, params
        )
        if us.axis[0] > 0.8:  # beam crosses the slab from above
            break
    else:
        pytest.fail("no seed aimed the beam across the slab")
    assert us.fan.any() and not us.fan.all()
    assert np.all(us.image[~us.fan] == 0.0)
    assert np.all(us.transmission[~us.fan] == 0.0)

    # Beam axis voxels in front of and behind the slab.
    def inside(p: np.ndarray) -> bool:
        return all(0 <= q < s for q, s in zip(p, volume.shape, strict=True)) and bool(
            us.fan[tuple(p)]
        )

    line = [np.round(us.apex + t * us.axis).astype(int) for t in range(0, 80)]
    before = [us.transmission[tuple(p)] for p in line if 12 <= p[0] <= 17 and inside(p)]
    behind = [us.transmission[tuple(p)] for p in line if 26 <= p[0] <= 40 and inside(p)]
    assert before and behind
    assert max(behind) < 0.5 * min(before)
    assert np.isfinite(us.image).all() and us.image.min() >= 0.0
