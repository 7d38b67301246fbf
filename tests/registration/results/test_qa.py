"""Tests of the QA picture (SimpleITK images, LPS mm; numpy arrays are (z, y, x))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from disa.registration.results.qa import (
    PLANES,
    fixed_centre,
    moving_data_mask,
    plane_grids,
    qa_layout,
    render_qa,
    view_centre,
)

PANEL = 96  # small panels keep the tests fast
_OUTLINE = (0, 255, 255)  # the moving data's outline colour


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


# ------------------------------------------------ where the planes pass: the overlap centre

FOV_MM = 160.0  # fixed field of view: a 64^3 grid of 2.5 mm


def _body_fixed(radius_mm: float = 78.0) -> sitk.Image:
    """A 160 mm cube holding a textured spherical body (centred on (0, 0, 0) mm), zero air
    around it."""
    shape = (64, 64, 64)
    z, y, x = np.indices(shape, dtype=float)
    c = (np.array(shape) - 1) / 2
    body = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < (radius_mm / 2.5) ** 2
    texture = 100.0 + 40.0 * np.sin(x / 3.0) * np.sin(y / 4.0) * np.sin(z / 3.5)
    arr = ndimage.gaussian_filter(np.where(body, texture, 0.0), 0.7).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.5, 2.5, 2.5))
    img.SetOrigin((-78.75, -78.75, -78.75))  # centred on (0, 0, 0)
    return img


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    t = sitk.Euler3DTransform((0.0, 0.0, 0.0), ax, ay, az)
    return np.array(t.GetMatrix()).reshape(3, 3)


def _small_moving(
    fixed: sitk.Image,
    offset_mm: tuple[float, float, float],
    direction: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    size: int = 20,
) -> tuple[sitk.Image, sitk.Transform, np.ndarray]:
    """A small moving field of view and the rigid T (fixed -> moving) that registers it.

    The moving grid (``size`` voxels per axis, about 30 mm) is centred at (10, 20, -5) mm in
    its own frame; T maps the fixed point ``offset_mm`` (from the fixed centre) there, with
    a rotation. Its intensities are the fixed image's through T, plus 20 (no padding).
    Returns (moving, T, the fixed point of the moving grid's centre).
    """
    direction = np.eye(3) if direction is None else direction
    centre_fixed = np.asarray(offset_mm, dtype=float)
    centre_moving = np.array([10.0, 20.0, -5.0])
    transform = sitk.Euler3DTransform(tuple(centre_fixed), 0.15, -0.2, 0.3,
                                      tuple(centre_moving - centre_fixed))
    reference = sitk.Image([size] * 3, sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetDirection(tuple(direction.ravel()))
    half = direction @ (np.array(spacing) * (size - 1) / 2)
    reference.SetOrigin(tuple(centre_moving - half))
    # moving(y) = fixed(T^-1 y) + 20: the registered image then matches the fixed one.
    moving = sitk.Resample(fixed, reference, transform.GetInverse(), sitk.sitkLinear, 0.0) + 20.0
    return moving, transform, centre_fixed


def _inside_moving(moving: sitk.Image, transform: sitk.Transform, point) -> bool:
    index = np.array(moving.TransformPhysicalPointToContinuousIndex(
        transform.TransformPoint(tuple(point))))
    return bool(np.all(index >= -0.5) and np.all(index <= np.array(moving.GetSize()) - 0.5))


def _magenta(rgb: np.ndarray) -> np.ndarray:
    """Overlay pixels (R == B) where the moving image shows; letters and outline are R != B."""
    return (rgb[..., 0] == rgb[..., 2]) & (rgb[..., 0] > 40)


def test_planes_pass_through_a_small_moving_field_of_view_far_from_the_fixed_centre(
    tmp_path: Path,
) -> None:
    fixed = _body_fixed()
    moving, transform, expected = _small_moving(fixed, (32.0, -32.0, 28.0))
    centre = view_centre(fixed, moving, transform)
    assert centre.source == "overlap"
    assert _inside_moving(moving, transform, centre.point)
    np.testing.assert_allclose(centre.point, expected, atol=4.0)
    assert not _inside_moving(moving, transform, fixed_centre(fixed))

    registered = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    before = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    picture = render_qa(fixed, registered, before, mode="overlay", panel_size=PANEL,
                        moving=moving, transform=transform)
    layout = qa_layout(fixed, mode="overlay", panel_size=PANEL)
    for plane in PLANES:
        after = _panel(picture, layout.panels[("after overlay", plane)])
        # The registered moving data is in every plane (magenta channel), outlined in cyan.
        assert _magenta(after).sum() > 20, plane
        assert np.all(after == _OUTLINE, axis=-1).sum() > 4, plane
        # Before and after show the same planes: the fixed (green) channel agrees wherever
        # both are plain overlay pixels (no letter, no outline).
        first = _panel(picture, layout.panels[("before overlay", plane)])
        plain = (after[..., 0] == after[..., 2]) & (first[..., 0] == first[..., 2])
        np.testing.assert_array_equal(after[..., 1][plain], first[..., 1][plain])

    # Without the moving image the planes stay at the fixed centre: no moving data there.
    blind = render_qa(fixed, registered, before, mode="overlay", panel_size=PANEL)
    assert sum(_magenta(_panel(blind, layout.panels[("after overlay", p)])).sum()
               for p in PLANES) == 0


def test_oblique_moving_grid() -> None:
    fixed = _body_fixed()
    direction = _rotation(0.5, -0.4, 0.9)
    moving, transform, expected = _small_moving(fixed, (-35.0, 30.0, -15.0), direction,
                                                spacing=(1.2, 1.6, 2.0), size=18)
    centre = view_centre(fixed, moving, transform)
    assert centre.source == "overlap"
    assert _inside_moving(moving, transform, centre.point)
    np.testing.assert_allclose(centre.point, expected, atol=4.0)
    registered = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    picture = render_qa(fixed, registered, mode="overlay", panel_size=PANEL, moving=moving,
                        transform=transform)
    layout = qa_layout(fixed, mode="overlay", has_before=False, panel_size=PANEL)
    for plane in PLANES:
        assert _magenta(_panel(picture, layout.panels[("after overlay", plane)])).sum() > 20


def _fan(size: int = 40) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int, int]]:
    """A zero-padded ultrasound-like sector in a size^3 buffer (z, y, x): apex near the
    y = 0 face at x = z = 5, axis +y, half-angle 25 degrees; speckle, and an anechoic
    (exactly zero) blob inside it. Returns (array, the blob's voxel, a padding voxel)."""
    z, y, x = np.indices((size,) * 3, dtype=float)
    radial = np.hypot(x - 5, z - 5)
    sector = (y >= 1) & (radial <= np.tan(np.radians(25)) * y)
    rng = np.random.default_rng(3)
    arr = np.where(sector, rng.uniform(20.0, 200.0, sector.shape), 0.0)
    blob = (5, 28, 5)  # (z, y, x), on the axis, 12 voxels from the sector edge
    arr[(z - blob[0]) ** 2 + (y - blob[1]) ** 2 + (x - blob[2]) ** 2 <= 9] = 0.0
    return arr.astype(np.float32), blob, (35, 5, 35)


def test_zero_padded_sector_counts_only_where_it_has_data() -> None:
    fixed = _body_fixed()
    arr, blob, padding = _fan()
    moving = sitk.GetImageFromArray(arr)
    moving.SetSpacing((1.5, 1.5, 1.5))
    moving.SetOrigin((-20.0, -25.0, -10.0))
    transform = sitk.TranslationTransform(3, (-30.0, 5.0, 12.0))

    data = sitk.GetArrayFromImage(moving_data_mask(moving))
    assert data[blob] == 1  # enclosed dark tissue is data, not padding
    assert data[padding] == 0
    assert data.sum() == pytest.approx((arr > 0).sum(), rel=0.1)

    centre = view_centre(fixed, moving, transform)
    assert centre.source == "overlap"
    index = moving.TransformPhysicalPointToIndex(transform.TransformPoint(centre.point))
    assert data[index[::-1]] == 1, index
    # Not the middle of the buffer, which is padding.
    buffer_middle = np.array(moving.TransformContinuousIndexToPhysicalPoint((19.5,) * 3))
    moved = np.array(transform.TransformPoint(centre.point))
    assert np.linalg.norm(moved - buffer_middle) > 10.0
    assert data[(20, 20, 20)] == 0

    # A given mask replaces the automatic one.
    mask = sitk.Image(moving.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(moving)
    mask[30:38, 30:38, 30:38] = 1
    masked = view_centre(fixed, moving, transform, moving_mask=mask)
    moved = np.array(transform.TransformPoint(masked.point))
    np.testing.assert_allclose(moving.TransformPhysicalPointToContinuousIndex(tuple(moved)),
                               (33.5, 33.5, 33.5), atol=1.5)


def test_overlap_centre_prefers_the_fixed_foreground() -> None:
    fixed = _body_fixed(radius_mm=50.0)
    moving = sitk.Image([24, 24, 24], sitk.sitkFloat32) + 50.0  # 36 mm, no padding
    moving.SetSpacing((1.5, 1.5, 1.5))
    # The moving cube straddles the body's edge along +x: x from 32 to 68 mm (its centre,
    # voxel 11.5 at 17.25 mm in the moving frame, is the fixed point (50, 0, 0)).
    transform = sitk.TranslationTransform(3, (17.25 - 50.0, 17.25, 17.25))
    centre = view_centre(fixed, moving, transform)
    assert centre.source == "overlap"
    assert _inside_moving(moving, transform, centre.point)
    fixed_value = fixed.EvaluateAtPhysicalPoint(centre.point, sitk.sitkLinear)
    assert fixed_value > 50.0  # in the body, not in the air the cube also covers
    assert centre.point[0] < 46.0  # the cube's own centre is at x = 50 mm


def test_no_overlap_falls_back_to_the_fixed_centre() -> None:
    fixed = _body_fixed()
    moving, _, _ = _small_moving(fixed, (32.0, -32.0, 28.0))
    far = sitk.TranslationTransform(3, (1000.0, 0.0, 0.0))
    centre = view_centre(fixed, moving, far)
    assert centre.source == "fixed centre"
    assert centre.point == pytest.approx(fixed_centre(fixed))
    registered = sitk.Resample(moving, fixed, far, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    picture = render_qa(fixed, registered, mode="overlay", panel_size=PANEL, moving=moving,
                        transform=far)
    assert picture.size == qa_layout(fixed, mode="overlay", has_before=False,
                                     panel_size=PANEL).size
    grids = {g.name: g for g in plane_grids(fixed, panel_size=PANEL)}
    assert grids["axial"].position == pytest.approx(0.0, abs=1e-6)


def test_one_display_window_for_qa_and_the_viewer() -> None:
    """qa.png and the service's viewer share one window helper (percentiles of a strided
    subsample, non-finite values left out, a one-grey window for flat volumes)."""
    import disa.service.viewer as viewer
    from disa.registration.results.qa import display_window

    assert not hasattr(viewer, "auto_window")
    volume = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    volume[0, 0, 0] = np.nan
    low, high = display_window(volume)
    assert (low, high) == pytest.approx(np.percentile(volume[np.isfinite(volume)], [1, 99]))
    assert display_window(volume, (0.5, 99.5))[0] < low
    assert display_window(np.full((4, 4, 4), 7.0)) == (7.0, 8.0)
    big = np.random.default_rng(0).normal(size=(200, 200, 200)).astype(np.float32)
    assert display_window(big, max_voxels=10_000) == pytest.approx(display_window(big), abs=0.1)
