"""Grids: index <-> physical mapping as SimpleITK defines it; strided output grids."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from disa.core.grid import Grid


def _image() -> sitk.Image:
    image = sitk.Image([7, 6, 5], sitk.sitkFloat32)
    image.SetSpacing((0.8, 1.3, 2.5))
    image.SetOrigin((-10.0, 4.0, 30.0))
    r = sitk.Euler3DTransform()
    r.SetRotation(0.2, -0.3, 0.5)
    image.SetDirection(r.GetMatrix())
    return image


def test_physical_points_match_simpleitk() -> None:
    image = _image()
    grid = Grid.from_image(image)
    idx = np.array([[0, 0, 0], [6, 5, 4], [1.5, 2.25, 3.0]])
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in idx])
    np.testing.assert_allclose(grid.to_physical(idx), expected, atol=1e-9)
    np.testing.assert_allclose(grid.to_index(expected), idx, atol=1e-9)
    assert grid.shape == (5, 6, 7)


def test_strided_grid_puts_voxel_i_on_input_voxel_stride_i() -> None:
    grid = Grid.from_image(_image())
    coarse = grid.strided(4)
    assert coarse.shape == (2, 2, 2)
    np.testing.assert_allclose(coarse.to_physical(np.array([[1.0, 1.0, 1.0]])),
                               grid.to_physical(np.array([[4.0, 4.0, 4.0]])), atol=1e-9)


def test_image_like_round_trips_geometry() -> None:
    image = _image()
    grid = Grid.from_image(image)
    wrapped = grid.image_like(np.zeros(grid.shape, dtype=np.float32))
    assert wrapped.GetSize() == image.GetSize()
    np.testing.assert_allclose(wrapped.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(grid.center, image.TransformContinuousIndexToPhysicalPoint(
        (3.0, 2.5, 2.0)), atol=1e-9)
