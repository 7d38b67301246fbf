"""Tests of the QA picture (SimpleITK images, LPS mm; numpy arrays are (z, y, x))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from disa.registration.qa import PLANES, plane_grids, qa_layout, render_qa

PANEL = 96  # small panels keep the tests fast


def _phantom(shape: tuple[int, int, int] = (24, 32, 36)) -> np.ndarray:
    """Ellipsoid body with two inserts, smooth edges, intensities 0..~400 (z, y, x)."""
    z, y, x = np.indices(shape, dtype=float)
    cz, cy, cx = (np.array(shape) - 1) / 2

    def ellipsoid(oz: float, oy: float, ox: float, rz: float, ry: float, rx: float) -> np.ndarray:
        return (((z - oz) / rz) ** 2 + ((y - oy) / ry) ** 2 + ((x - ox) / rx) ** 2) < 1

    vol = 100.0 * ellipsoid(cz, cy, cx, 0.4 * shape[0], 0.4 * shape[1], 0.4 * shape[2])
    vol += 300.0 * ellipsoid(cz + 2, cy - 4, cx + 5, 4, 5, 4)
    vol += 150.0 * ellipsoid(cz - 3, cy + 5, cx - 6, 3, 3, 4)
    return ndimage.gaussian_filter(vol, 1.0).astype(np.float32)


def _image(arr: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-20.0, 5.0, 30.0))
    return img


def _on_grid(arr: np.ndarray, fixed: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(fixed)
    return img


def _panel(picture: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(picture.crop(box), dtype=float)


@pytest.fixture
def pair() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(fixed, registered = aligned copy, before = shifted copy), all on the fixed grid."""
    arr = _phantom()
    fixed = _image(arr)
    return fixed, _on_grid(arr.copy(), fixed), _on_grid(np.roll(arr, (2, 4, -5), (0, 1, 2)), fixed)


def test_png_written_atomically_with_layout_size(tmp_path: Path, pair) -> None:
    fixed, registered, before = pair
    target = tmp_path / "qa.png"
    picture = render_qa(fixed, registered, before, path=target, title="case 1", panel_size=PANEL)

    layout = qa_layout(fixed, mode="both", has_before=True, panel_size=PANEL)
    assert layout.rows == (
        "before overlay",
        "after overlay",
        "before checkerboard",
        "after checkerboard",
    )
    assert picture.size == layout.size
    assert picture.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["qa.png"]  # no temp file left behind
    with Image.open(target) as written:
        assert written.format == "PNG"
        assert written.size == layout.size
        np.testing.assert_array_equal(np.asarray(written), np.asarray(picture))
    pixels = np.asarray(picture, dtype=float)
    assert pixels.std() > 20  # not blank
    for box in layout.panels.values():
        assert _panel(picture, box).max() > 200

    # Rows are stacked cells of at least the panel height; columns are the
    # three planes, so the width does not depend on the rows.
    one_row = qa_layout(fixed, mode="overlay", has_before=False, panel_size=PANEL)
    assert one_row.rows == ("after overlay",)
    assert one_row.size[0] == layout.size[0] >= 3 * PANEL
    cell_height = (layout.size[1] - one_row.size[1]) / 3
    assert cell_height == int(cell_height) >= PANEL


def test_overlay_and_checkerboard_differ(pair) -> None:
    fixed, registered, before = pair
    overlay = render_qa(fixed, registered, before, mode="overlay", panel_size=PANEL)
    checker = render_qa(fixed, registered, before, mode="checkerboard", panel_size=PANEL)
    assert overlay.size == checker.size
    box_o = qa_layout(fixed, mode="overlay", panel_size=PANEL).panels[("before overlay", "axial")]
    box_c = qa_layout(fixed, mode="checkerboard", panel_size=PANEL).panels[
        ("before checkerboard", "axial")
    ]
    assert box_o == box_c
    assert np.abs(_panel(overlay, box_o) - _panel(checker, box_c)).mean() > 5
    # A checkerboard is grey (R == G == B) apart from the orientation letters.
    grey = _panel(checker, box_c)
    assert np.mean((grey[..., 0] == grey[..., 1]) & (grey[..., 1] == grey[..., 2])) > 0.95


def test_misaligned_before_shows_more_colour_than_aligned_after(pair) -> None:
    fixed, registered, before = pair
    picture = render_qa(fixed, registered, before, mode="overlay", panel_size=PANEL)
    layout = qa_layout(fixed, mode="overlay", panel_size=PANEL)
    for plane in PLANES:
        # Fixed is green, moving magenta: |G - R| is the misalignment signal.
        sep = {}
        for stage in ("before", "after"):
            rgb = _panel(picture, layout.panels[(f"{stage} overlay", plane)])
            sep[stage] = np.abs(rgb[..., 1] - rgb[..., 0]).mean()
        assert sep["after"] < 1.0, (plane, sep)
        assert sep["before"] > 5.0, (plane, sep)


def test_anisotropic_voxels_keep_physical_proportions() -> None:
    # 36 x 32 x 12 voxels of 1 x 1 x 3 mm (x, y, z): 36 x 32 x 36 mm.
    fixed = _image(_phantom((12, 32, 36)), spacing=(1.0, 1.0, 3.0))
    grids = {g.name: g for g in plane_grids(fixed, panel_size=PANEL)}
    mm_per_px = 36.0 / PANEL
    assert grids["axial"].size == (PANEL, round(32 / mm_per_px))
    assert grids["coronal"].size == (PANEL, PANEL)  # x by z: 36 x 36 mm
    assert grids["sagittal"].size == (round(32 / mm_per_px), PANEL)  # y by z

    picture = render_qa(fixed, fixed, mode="overlay", panel_size=PANEL)
    layout = qa_layout(fixed, mode="overlay", has_before=False, panel_size=PANEL)
    x0, y0, x1, y1 = layout.panels[("after overlay", "coronal")]
    assert (x1 - x0, y1 - y0) == (PANEL, PANEL)
    # The axial panel (36 x 32 mm) is shorter than its square cell: the strip
    # above it is background, the panel itself is overlay (R == B) pixels.
    x0, y0, x1, y1 = layout.panels[("after overlay", "axial")]
    assert y1 - y0 < PANEL
    pixels = np.asarray(picture)
    strip = pixels[y0 - (PANEL - (y1 - y0)) // 2 : y0, x0:x1]
    assert strip.size > 0
    assert np.all(strip == pixels[0, -1])  # the canvas background colour
    inside = pixels[y0:y1, x0:x1]
    assert np.mean(inside[..., 0] == inside[..., 2]) > 0.95


def test_physical_space_not_voxel_order() -> None:
    # The same object stored with the x axis reversed (direction -1 along x and
    # the origin at the other end) must give the same picture.
    arr = _phantom()
    fixed = _image(arr)
    flipped = sitk.GetImageFromArray(arr[:, :, ::-1].copy())
    flipped.SetSpacing(fixed.GetSpacing())
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    origin = np.array(fixed.GetOrigin())
    origin[0] += (arr.shape[2] - 1) * fixed.GetSpacing()[0]
    flipped.SetOrigin(tuple(origin))
    a = np.asarray(render_qa(fixed, fixed, mode="overlay", panel_size=PANEL), dtype=float)
    b = np.asarray(render_qa(flipped, flipped, mode="overlay", panel_size=PANEL), dtype=float)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 2


def test_planes_through_given_point() -> None:
    fixed = _image(_phantom())
    point = (-10.0, 20.0, 40.0)
    grids = {g.name: g for g in plane_grids(fixed, point=point, panel_size=PANEL)}
    assert grids["axial"].position == pytest.approx(40.0)
    assert grids["coronal"].position == pytest.approx(20.0)
    assert grids["sagittal"].position == pytest.approx(-10.0)
    assert grids["axial"].edge_letters() == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert grids["coronal"].edge_letters() == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert grids["sagittal"].edge_letters() == {
        "left": "A",
        "right": "P",
        "top": "S",
        "bottom": "I",
    }
    render_qa(fixed, fixed, point=point, panel_size=PANEL)


def test_geometry_mismatch_raises(pair) -> None:
    fixed, registered, _ = pair
    other = sitk.Image(registered)
    other.SetSpacing((1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match=r"registered image is not on the fixed grid.*spacing"):
        render_qa(fixed, other)
    shifted = sitk.Image(registered)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"'before' image .*origin"):
        render_qa(fixed, registered, before=shifted)
    smaller = sitk.GetImageFromArray(_phantom((10, 10, 10)))
    with pytest.raises(ValueError, match="size"):
        render_qa(fixed, smaller)
    with pytest.raises(ValueError, match="component"):
        render_qa(fixed, registered, displacement=registered)
    with pytest.raises(ValueError, match="mode"):
        render_qa(fixed, registered, mode="sideways")  # type: ignore[arg-type]


def test_displacement_row(pair) -> None:
    fixed, registered, before = pair
    z, y, x = np.indices(sitk.GetArrayViewFromImage(fixed).shape, dtype=float)
    field = np.zeros((*z.shape, 3))
    field[..., 0] = 3.0 * np.sin(y / 5.0)  # x component (ITK vector order x, y, z), mm
    field[..., 2] = 2.0 * np.cos(x / 6.0)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(fixed)

    without = render_qa(fixed, registered, before, mode="overlay", panel_size=PANEL)
    picture = render_qa(
        fixed, registered, before, mode="overlay", panel_size=PANEL, displacement=displacement
    )
    layout = qa_layout(fixed, mode="overlay", has_displacement=True, panel_size=PANEL)
    assert layout.rows[-1] == "displacement"
    assert picture.size == layout.size
    assert picture.size[1] > without.size[1]
    for plane in PLANES:
        rgb = _panel(picture, layout.panels[("displacement", plane)])
        # Colour-mapped magnitude (not grey) with white grid lines drawn over it.
        assert np.mean(np.abs(rgb[..., 0] - rgb[..., 2]) > 10) > 0.5
        assert np.any(np.all(rgb == 255, axis=-1))
