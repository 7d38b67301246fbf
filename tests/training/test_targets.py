"""Dense crop-pair targets and the paper-style sampler."""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats

from disa.registration import lc2
from disa.training import pairs, sampling, sources

CFG = pairs.PairConfig(crop=16)


def _related(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth field and a noisy non-monotonic function of it: LC2 spans [0, 1]."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    a = (a - a.mean()) / a.std()
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    # Noise strength varies over the volume, so local LC2 covers the whole range.
    strength = np.linspace(0.0, 1.0, shape[2])[None, None, :]
    b = np.cos(1.5 * a) + a + strength * noise / noise.std()
    return a.astype(np.float32), ((b - b.mean()) / b.std()).astype(np.float32)


def test_dense_targets_match_naive_lc2_at_descriptor_centres() -> None:
    fixed, moving = _related(0, (CFG.side,) * 3)
    centres = pairs.descriptor_centres(CFG)
    assert centres.shape == (CFG.out_side**3, 3) and np.all(centres % 4 == 0)
    for role in ("fixed", "moving"):
        t = pairs.dense_targets(fixed, moving, role, CFG)
        assert t.shape == (CFG.out_side,) * 3
        mr, us = (fixed, moving) if role == "fixed" else (moving, fixed)
        rng = np.random.default_rng(1)
        for k in rng.choice(len(centres), 6, replace=False):
            c = centres[k]
            ref = np.mean(
                [
                    lc2.lc2_patch_naive(
                        us[tuple(slice(x - r, x + r + 1) for x in c)],
                        mr[tuple(slice(x - r - 1, x + r + 2) for x in c)],
                    )
                    for r in CFG.radii
                ]
            )
            i = tuple((c - CFG.margin) // 4)
            assert abs(t[i] - ref) < 1e-6


def test_crop_pair_shapes_ranges_and_determinism(phantom: sources.Volume) -> None:
    scene = pairs.make_scene(phantom, ("t1", "ct"), np.random.default_rng(2), 16.0)
    a = pairs.sample_crop_pair(scene, np.random.default_rng(3), CFG)
    b = pairs.sample_crop_pair(scene, np.random.default_rng(3), CFG)
    assert a.fixed.shape == a.moving.shape == (16, 16, 16)
    assert a.target.shape == (4, 4, 4)
    assert np.isfinite(a.fixed).all() and np.isfinite(a.target).all()
    assert a.target.min() >= 0.0 and a.target.max() <= 1.0
    np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(a.moving, b.moving)


def test_aligned_same_image_gives_high_targets(phantom: sources.Volume) -> None:
    scene = pairs.make_scene(phantom, ("t1", "t1"), np.random.default_rng(4), 16.0)
    same = pairs.Scene(
        scene.volume_id,
        scene.anatomy,
        scene.settings,
        (scene.images[0], scene.images[0]),
        scene.focus,
        scene.border_mode,
    )
    cfg = pairs.PairConfig(crop=16, p_aligned=1.0)
    pair = pairs.sample_crop_pair(same, np.random.default_rng(5), cfg)
    # Identical content up to an affine intensity change: LC2 = 1 wherever textured.
    assert np.median(pair.target) > 0.9


def test_sampled_targets_are_near_uniform_and_exact() -> None:
    fixed, moving = _related(6, (48, 48, 48))
    rng = np.random.default_rng(7)
    drawn = sampling.sample_patch_pairs(fixed, moving, 100, rng)
    targets = np.array([p.target for p in drawn])
    assert len(drawn) >= 90
    counts = np.histogram(targets, bins=10, range=(0, 1))[0]
    assert counts.max() <= 10 and counts.min() >= 5
    assert stats.kstest(targets, "uniform").statistic < 0.12
    for p in drawn[:8]:
        assert all(c % 4 == 0 for c in p.fixed_centre + p.moving_centre)
        assert abs(sampling.patch_pair_lc2(fixed, moving, p) - p.target) < 1e-6
