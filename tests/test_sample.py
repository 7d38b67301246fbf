"""The bundled sample pair looks like real data: no clipped intensities, its known transform."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from disa.sample import sample_paths


def test_the_bundled_images_are_not_clipped_and_keep_their_known_transform() -> None:
    fixed_path, moving_path, truth_path = sample_paths()
    for path in (fixed_path, moving_path):
        data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        foreground = data[data > 0.05 * data.max()]
        # a saturated image piles its voxels at the clip value (the old moving T2: 84 %)
        assert np.mean(foreground == data.max()) < 0.001, path.name
    truth = sitk.ReadTransform(str(truth_path))
    np.testing.assert_allclose(truth.GetParameters(),
                               [*np.deg2rad([12.0, -8.0, 15.0]), 25.0, -18.0, 30.0])
