"""Resampling onto new axes (whole or cropped) and the reusable intensity normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.errors import InputError
from disa.core.grid import Grid
from disa.core.preprocess import (
    MAX_WORKING_VOXELS,
    intensity_normalisation,
    masked_gaussian,
    normalise_intensities,
    resample_to_spacing,
    working_grid_size,
)
from disa.registration.transform.parametric import rotation_matrix
from disa.training import phantom as ph


def _image() -> sitk.Image:
    truth = ph.rigid_truth((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    return ph.make_pair(truth, fixed_grid=ph.make_grid((48, 44, 40), (2.5, 2.5, 2.5)),
                        seed=5).fixed


def _axes() -> np.ndarray:
    return rotation_matrix(np.deg2rad(np.array([[12.0, -7.0, 20.0]])))[0]


def test_cropped_grid_keeps_the_uncropped_voxels() -> None:
    image, axes, spacing, align = _image(), _axes(), 2.0, 4
    whole = resample_to_spacing(image, spacing, direction=axes)
    whole_grid = Grid.from_image(whole)
    low = np.asarray(whole.GetOrigin()) @ axes  # first voxel, mm along the new axes
    bounds = (low + np.array([13.0, 21.0, 9.0]), low + np.array([60.0, 70.0, 50.0]))
    crop = resample_to_spacing(image, spacing, direction=axes, bounds=bounds, align_voxels=align)

    # The crop starts a whole number of aligned steps into the uncropped grid ...
    offset_voxels = (np.asarray(crop.GetOrigin()) @ axes - low) / spacing
    np.testing.assert_allclose(offset_voxels, np.round(offset_voxels / align) * align, atol=1e-6)
    assert np.all(offset_voxels <= (bounds[0] - low) / spacing + 1e-6)
    # ... covers the requested box and is much smaller than the whole grid ...
    high = np.asarray(crop.GetOrigin()) @ axes + spacing * (np.asarray(crop.GetSize()) - 1)
    assert np.all(high >= bounds[1] - spacing)
    assert np.prod(crop.GetSize()) < 0.5 * np.prod(whole.GetSize())
    # ... and its voxels hold the uncropped grid's values.
    start = np.round(offset_voxels).astype(int)  # (x, y, z)
    size = crop.GetSize()
    expected = sitk.GetArrayFromImage(whole)[start[2]:start[2] + size[2],
                                             start[1]:start[1] + size[1],
                                             start[0]:start[0] + size[0]]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), expected)
    assert Grid.from_image(crop).direction.tolist() == whole_grid.direction.tolist()


def test_bounds_that_miss_the_image_leave_the_whole_grid() -> None:
    image, axes = _image(), _axes()
    whole = resample_to_spacing(image, 2.0, direction=axes)
    far = (np.full(3, 1e4), np.full(3, 1e4 + 50.0))
    missed = resample_to_spacing(image, 2.0, direction=axes, bounds=far, align_voxels=4)
    assert missed.GetSize() == whole.GetSize() and missed.GetOrigin() == whole.GetOrigin()


def test_kept_normalisation_maps_the_same_intensities_to_the_same_values() -> None:
    volume = sitk.GetArrayFromImage(_image())
    normalisation = intensity_normalisation(volume)
    np.testing.assert_array_equal(normalisation.apply(volume), normalise_intensities(volume))
    # A sub-volume (a crop seen again later) keeps the whole image's z-score.
    part = volume[5:30, 4:20, 10:35]
    np.testing.assert_array_equal(normalisation.apply(part),
                                  normalise_intensities(volume)[5:30, 4:20, 10:35])
    assert normalisation.low < normalisation.high and normalisation.std > 0


@pytest.mark.parametrize("spacing", [1.0, 2.0, 3.3, 7.5])
def test_working_grid_size_is_the_grid_that_resampling_makes(spacing: float) -> None:
    image = _image()
    expected = resample_to_spacing(image, spacing).GetSize()
    assert working_grid_size(image.GetSize(), image.GetSpacing(), spacing) == expected


def test_a_working_grid_over_the_voxel_limit_is_refused_before_it_is_made() -> None:
    image, axes = _image(), _axes()  # 48 x 44 x 40 voxels of 2.5 mm
    size = working_grid_size(image.GetSize(), image.GetSpacing(), 2.0)  # 60 x 55 x 50
    voxels = int(np.prod(size))
    with pytest.raises(InputError) as caught:
        resample_to_spacing(image, 2.0, max_voxels=voxels - 1)
    message = str(caught.value)
    assert message.startswith("--working-spacing 2 mm makes a working grid of 60 x 55 x 50")
    assert f"({voxels:,})" in message and f"limit of {voxels - 1:,} voxels" in message
    assert "\n" not in message
    # Grids on rotated axes (the re-oriented refinement) are held to the limit too.
    with pytest.raises(InputError, match="--working-spacing"):
        resample_to_spacing(image, 2.0, direction=axes, max_voxels=voxels - 1)
    # Exactly at the limit: allowed.
    assert resample_to_spacing(image, 2.0, max_voxels=voxels).GetSize() == size
    # Without a cap the default limit applies.
    assert voxels < MAX_WORKING_VOXELS == 512**3
    assert resample_to_spacing(image, 2.0).GetSize() == size


def test_masked_gaussian_smooths_inside_the_mask_and_keeps_the_padding() -> None:
    """Speckle inside a sector is smoothed (its spread drops), a constant inside stays that
    constant up to the sector's edge (no darkening from the zeros outside), and the padding
    stays exactly 0."""
    rng = np.random.default_rng(0)
    shape = (32, 40, 48)  # (z, y, x)
    z, _, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    inside = np.abs(x - 24) < 0.6 * (z + 2)  # a wedge widening with depth
    for values, constant in ((rng.normal(100.0, 20.0, shape), False), (np.full(shape, 7.0), True)):
        image = sitk.GetImageFromArray(np.where(inside, values, 0.0).astype(np.float32))
        image.SetSpacing((0.8, 0.8, 0.8))
        mask = sitk.GetImageFromArray(inside.astype(np.uint8))
        mask.CopyInformation(image)
        out = sitk.GetArrayFromImage(masked_gaussian(image, mask, 1.5))
        assert np.all(out[~inside] == 0.0)
        if constant:
            np.testing.assert_allclose(out[inside], 7.0, rtol=1e-4)
        else:
            assert out[inside].std() < 0.4 * values[inside].std()
            assert abs(out[inside].mean() - 100.0) < 2.0
