"""Open faces: where an image meets air at the edge of its box, what lies beyond is air
(fov.open_faces), on its own grid, on a working grid and in the translation scan."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from disa.core.grid import Grid
from disa.registration import pipeline
from disa.registration.fov import FACES, data_region, regions_on_grid
from disa.registration.search.translation_scan import ScanTerms
from disa.training import phantom as ph

TRUTH = ph.rigid_truth((12.0, -10.0, 11.0), (18.0, -15.0, 17.0))


@pytest.fixture(scope="module")
def head() -> sitk.Image:
    """A phantom framed by air on every face (64^3 at 3 mm)."""
    grid = ph.make_grid((64, 64, 64), (3.0, 3.0, 3.0))
    return ph.make_pair(TRUTH, fixed_grid=grid, seed=4).moving


def _region_of_interest(image: sitk.Image, low: tuple[int, ...], high: tuple[int, ...]
                        ) -> sitk.Image:
    """Voxels low..high (x, y, z, high exclusive) of ``image``, at their own positions."""
    return sitk.RegionOfInterest(image, [h - lo for lo, h in zip(low, high, strict=True)],
                                 list(low))


def _body_extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """First and last voxel (x, y, z) of the body (above the tissue threshold)."""
    region = data_region(image)
    body = np.argwhere(sitk.GetArrayFromImage(image) > region.tissue_threshold)[:, ::-1]
    return body.min(axis=0), body.max(axis=0)


def test_an_image_framed_by_air_has_open_faces_and_a_cut_closes_them(head) -> None:
    region = data_region(head)
    assert region.open_faces == (True,) * 6
    assert region.air_fill == region.air_value
    assert region.air_value < region.tissue_threshold
    # A crop through the body closes the faces it cuts, and only those.
    low, high = _body_extent(head)
    middle = (low + high) // 2
    cut = _region_of_interest(head, (0, 0, 0), (64, int(middle[1]), 64))  # y high cuts
    faces = dict(zip(FACES, data_region(cut).open_faces, strict=True))
    assert not faces["y high"]
    assert all(open_ for name, open_ in faces.items() if name != "y high")


def test_a_face_mostly_padded_is_closed_and_beyond_a_padded_part_nothing_is_air(head) -> None:
    """Padding (the fill of an oblique resampling, a fan's outside) says nothing about what
    lies beyond it: a face that is mostly padding is closed, and past an open face's
    padded part the region stays without data."""
    array = sitk.GetArrayFromImage(head)
    z, _, x = np.meshgrid(*(np.arange(n) for n in array.shape), indexing="ij")
    array[(x < 4) | (x + z < 40)] = array.min()  # x low all padding, an oblique cut
    padded = sitk.GetImageFromArray(array)
    padded.CopyInformation(head)
    region = data_region(padded)
    assert region.has_padding
    faces = dict(zip(FACES, region.open_faces, strict=True))
    # x low is all padding; z low 62 % padding, air else; the others air with less padding.
    assert faces == {"x low": False, "x high": True, "y low": True, "y high": True,
                     "z low": True, "z high": True}
    reference = sitk.Image([64, 64, 80], sitk.sitkUInt8)  # 16 voxels past z low
    reference.SetOrigin(head.TransformIndexToPhysicalPoint((0, 0, -16)))
    reference.SetSpacing(head.GetSpacing())
    reference.SetDirection(head.GetDirection())
    fov, _ = regions_on_grid(region.mask, reference, region.open_faces)
    beyond = fov[:16]  # past z low: air past the face's data, nothing past its padding
    assert not beyond[:, :, :40].any() and beyond[:, :, 40:].all()


def test_regions_on_grid_count_air_beyond_open_faces_only(head) -> None:
    region = data_region(head)
    reference = sitk.Image([80, 64, 64], sitk.sitkUInt8)  # 16 voxels past x high
    reference.SetOrigin(head.GetOrigin())
    reference.SetSpacing(head.GetSpacing())
    reference.SetDirection(head.GetDirection())
    closed, _ = regions_on_grid(region.mask, reference)
    assert not closed[:, :, 64:].any() and closed[:, :, :64].all()
    fov, unpadded = regions_on_grid(region.mask, reference, region.open_faces)
    assert fov.all() and unpadded.all()
    x_high_closed = (True, False, True, True, True, True)
    fov, _ = regions_on_grid(region.mask, reference, x_high_closed)
    assert not fov[:, :, 64:].any() and fov[:, :, :64].all()


def test_a_working_grid_on_oblique_axes_keeps_air_in_its_corners(head) -> None:
    """Prepared on axes turned 30 degrees, the phantom's working grid reaches past its box
    in the corners: air there (data, the image's air value), and the grid's faces open."""
    turn = sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(30.0))
    direction = np.asarray(turn.GetMatrix()).reshape(3, 3) @ Grid.from_image(head).direction
    prepared = pipeline.prepare(head, 3.0, None, direction=direction)
    assert prepared.fov.all()
    assert prepared.open_faces == (True,) * 6
    closed = pipeline.prepare(head, 3.0, None, direction=direction,
                              region=pipeline.replace(data_region(head),
                                                      open_faces=(False,) * 6))
    assert 0.05 < 1.0 - closed.fov.mean() < 0.5  # the corners, outside the buffer
    assert closed.open_faces == (False,) * 6


def test_the_scan_carries_open_faces_on_and_keeps_its_blocks_in_place() -> None:
    rng = np.random.default_rng(0)
    direction = np.asarray(sitk.VersorTransform((1.0, 2.0, 0.5), 0.4).GetMatrix()).reshape(3, 3)
    terms = ScanTerms(rng.normal(size=(4, 5, 6, 3)), rng.random((4, 5, 6)),
                      rng.random((4, 5, 6)), np.array([3.0, -2.0, 7.0]), 10.0, direction,
                      (True, False, False, True, True, True))  # x low, y high, z both
    grown = terms.extended(np.array([2, 3, 4]))  # (z, y, x) blocks
    assert grown.weight.shape == (4 + 2 + 2, 5 + 3, 6 + 4)
    assert grown.descriptor.shape == (8, 8, 10, 3)
    # Block (0, 0, 0) of the original is block (z 2, y 0, x 4) of the grown lattice, at
    # the same physical place.
    np.testing.assert_array_equal(grown.weight[2:6, 0:5, 4:10], terms.weight)
    np.testing.assert_allclose(grown.origin + direction @ (np.array([4, 0, 2]) * 10.0),
                               terms.origin)
    # Beyond an open face: that face's blocks.
    np.testing.assert_array_equal(grown.weight[2:6, 0:5, 0], terms.weight[:, :, 0])
    np.testing.assert_array_equal(grown.square[0, 0:5, 4:10], terms.square[0])
    np.testing.assert_array_equal(grown.descriptor[2:6, 7, 4:10], terms.descriptor[:, 4])
    assert terms.extended(np.array([2, 3, 4])) is not terms
    no_open = ScanTerms(terms.descriptor, terms.square, terms.weight, terms.origin, 10.0,
                        direction)
    assert no_open.extended(np.array([2, 3, 4])) is no_open


def test_air_beyond_open_faces_on_an_oblique_grid_equals_a_point_by_point_check(head) -> None:
    """Each voxel of an oblique, larger grid checked through ITK's own point mapping: past
    some face of the buffer and past open faces only."""
    faces = (True, False, True, True, False, True)
    region = data_region(head).mask
    turn = np.asarray(sitk.VersorTransform((0.3, 1.0, 0.2), 0.5).GetMatrix()).reshape(3, 3)
    reference = sitk.Image([30, 34, 28], sitk.sitkUInt8)
    reference.SetSpacing((9.0, 8.0, 9.5))
    reference.SetDirection(tuple((turn @ np.asarray(head.GetDirection()).reshape(3, 3))
                                 .ravel()))
    reference.SetOrigin(tuple(np.asarray(head.TransformContinuousIndexToPhysicalPoint(
        (32.0, 32.0, 32.0))) - turn @ np.array([135.0, 136.0, 133.0])))
    fov, _ = regions_on_grid(region, reference, faces)
    expected = np.zeros(fov.shape, dtype=bool)
    size = np.asarray(region.GetSize())
    for z, y, x in np.ndindex(*fov.shape):
        index = np.asarray(region.TransformPhysicalPointToContinuousIndex(
            reference.TransformIndexToPhysicalPoint((x, y, z))))
        below, above = index < -0.5, index > size - 0.5
        closed = np.logical_not(faces).reshape(3, 2)
        inside = not (below.any() or above.any())
        expected[z, y, x] = inside or not ((below & closed[:, 0]).any()
                                           or (above & closed[:, 1]).any())
    assert 0.2 < expected.mean() < 0.9
    assert np.mean(fov != expected) < 0.002  # (the buffer's own edge: ITK interpolates)


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_an_ultrasound_keeps_every_face_closed(head, role) -> None:
    """A dark face of an ultrasound is fluid or shadow, not air: an image declared or
    detected as ultrasound is prepared again with no open face, the other left as it was."""
    turn = np.asarray(sitk.VersorTransform((0.0, 0.0, 1.0), 0.4).GetMatrix()).reshape(3, 3)
    direction = turn @ Grid.from_image(head).direction
    inputs = pipeline._prepared_inputs(head, head, None, None, 3.0, direction,
                                       pipeline.MAX_WORKING_VOXELS, None)
    assert inputs.fixed_p.open_faces == inputs.moving_p.open_faces == (True,) * 6
    closed = pipeline._ultrasound_closed(inputs, role, head, head, None, None, direction,
                                         pipeline.MAX_WORKING_VOXELS)
    ultrasound, other = ((closed.fixed_p, closed.moving_p) if role == "fixed"
                         else (closed.moving_p, closed.fixed_p))
    assert ultrasound.open_faces == ultrasound.region.open_faces == (False,) * 6
    assert other is (inputs.moving_p if role == "fixed" else inputs.fixed_p)
    if role == "moving":  # on turned axes: its grid's corners lie outside its box
        assert not ultrasound.fov.all() and inputs.moving_p.fov.all()
