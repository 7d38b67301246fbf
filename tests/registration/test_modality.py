"""Modality hints from intensities."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from disa.registration.modality import modality_hint


def _image(array: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(array.astype(np.float32))


def test_ct_like_volume_is_recognised_by_air() -> None:
    ct = np.full((20, 20, 20), -1000.0)
    ct[5:15, 5:15, 5:15] = 40.0
    ct[8:12, 8:12, 8:12] = 1200.0
    assert modality_hint(_image(ct)).startswith("CT-like")


def test_mr_like_volume_is_non_negative() -> None:
    mr = np.random.default_rng(0).uniform(10, 800, (20, 20, 20))
    assert modality_hint(_image(mr)).startswith("MR-like")


def test_ultrasound_like_volume_has_a_zero_background_and_speckle() -> None:
    rng = np.random.default_rng(1)
    us = np.zeros((20, 20, 20))
    us[:, 4:16, 6:14] = rng.rayleigh(40.0, (20, 12, 8)) * rng.uniform(0.1, 2.0, (20, 12, 8))
    assert modality_hint(_image(us)).startswith("ultrasound-like")
