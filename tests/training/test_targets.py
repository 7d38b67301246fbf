"""Dense crop-pair targets and the paper-style sampler."""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats

from disa.registration.similarity import lc2
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
    np.testing.assert_array_equal(a.cross_target, b.cross_target)
    np.testing.assert_array_equal(a.cross_moving, b.cross_moving)


def test_cross_pairs_lie_within_reach_and_carry_their_patches_lc2(
    phantom: sources.Volume,
) -> None:
    cfg = pairs.PairConfig(crop=32, cross_pairs=200, cross_reach=2)
    scene = pairs.make_scene(phantom, ("t2", "labels"), np.random.default_rng(12), 32.0)
    rng = np.random.default_rng(13)
    pair = pairs.sample_crop_pair(scene, rng, cfg)
    k = cfg.out_side
    i = np.array(np.unravel_index(pair.cross_fixed, (k,) * 3)).T
    j = np.array(np.unravel_index(pair.cross_moving, (k,) * 3)).T
    assert len(i) == 200 and pair.cross_target.shape == (200,)
    offsets = j - i
    assert np.abs(offsets).max() <= 2 and np.all(np.any(offsets != 0, axis=1))
    assert np.all((pair.cross_target >= 0) & (pair.cross_target <= 1))
    # One image on both sides, aligned: equal positions match perfectly while
    # patches at other positions mostly do not.
    same = pairs.Scene(scene.volume_id, scene.anatomy, scene.settings,
                       (scene.images[0], scene.images[0]), scene.focus, scene.border_mode)
    aligned = pairs.PairConfig(crop=32, p_aligned=1.0, cross_pairs=400, cross_reach=2)
    twin = pairs.sample_crop_pair(same, np.random.default_rng(14), aligned)
    assert twin.meta["mr_role"] == "both"
    assert np.median(twin.target) > 0.9
    assert np.mean(twin.cross_target) < np.mean(twin.target) - 0.3


def test_symmetric_targets_are_the_mean_of_both_roles() -> None:
    fixed, moving = _related(15, (CFG.side,) * 3)
    centres = pairs.descriptor_centres(CFG)
    from disa.training.pair_lc2 import pair_lc2

    both = pair_lc2(fixed, moving, centres, centres, CFG.radii).mean(axis=1)
    ref = 0.5 * (
        pairs.dense_targets(fixed, moving, "fixed", CFG)
        + pairs.dense_targets(fixed, moving, "moving", CFG)
    )
    np.testing.assert_allclose(both.reshape(ref.shape), ref, atol=1e-6)
    # Cross targets index the same padded crops: offset (0, 0, 1) descriptors.
    shifted = pair_lc2(fixed, moving, centres[:-1], centres[:-1] + np.array([0, 0, 4]), CFG.radii)
    c, d = centres[0], centres[0] + np.array([0, 0, 4])
    ref0 = np.mean(
        [
            lc2.lc2_patch_naive(
                moving[tuple(slice(x - r, x + r + 1) for x in d)],
                fixed[tuple(slice(x - r - 1, x + r + 2) for x in c)],
            )
            for r in CFG.radii
        ]
    )
    assert abs(shifted[0, 0] - ref0) < 1e-6


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
