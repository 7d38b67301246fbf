"""qa.png's det J row: colours by det J, dimmed outside the foreground, colour bar, figures."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from disa.registration.results import qa
from disa.registration.results.qa import PLANES, jacobian_limit, qa_layout, render_qa
from disa.registration.transform.displacement import summarise_jacobian

PANEL = 96  # small panels keep the tests fast


def _fixed() -> sitk.Image:
    """A 30^3 x 2 mm block holding a bright ball (the foreground) of radius 20 mm."""
    z, y, x = np.indices((30, 30, 30), dtype=float)
    ball = ((z - 14.5) ** 2 + (y - 14.5) ** 2 + (x - 14.5) ** 2) < 10.0**2
    image = sitk.GetImageFromArray(np.where(ball, 200.0, 0.0).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-29.0, -29.0, -29.0))
    return image


def _stretch(fixed: sitk.Image, factor: float) -> sitk.Image:
    """u(x) = (factor - 1) x_L: det J = factor everywhere (x_L the L coordinate, mm)."""
    size = fixed.GetSize()
    lps_x = np.asarray(fixed.GetOrigin())[0] + 2.0 * np.arange(size[0])
    u = np.zeros((size[2], size[1], size[0], 3))
    u[..., 0] = (factor - 1.0) * lps_x[None, None, :]
    field = sitk.GetImageFromArray(u.astype(np.float32), isVector=True)
    field.CopyInformation(fixed)
    return field


def _render(fixed: sitk.Image, factor: float) -> tuple[Image.Image, dict]:
    field = _stretch(fixed, factor)
    summary = summarise_jacobian(field, sitk.Cast(fixed > 100, sitk.sitkUInt8))
    picture = render_qa(fixed, fixed, mode="overlay", panel_size=PANEL, displacement=field,
                        jacobian=summary)
    return picture, summary.statistics


def _inside(picture: Image.Image, fixed: sitk.Image, plane: str) -> np.ndarray:
    """Mean RGB of the middle of the det J panel (inside the ball)."""
    layout = qa_layout(fixed, mode="overlay", has_before=False, has_displacement=True,
                       has_jacobian=True, panel_size=PANEL)
    x0, y0, x1, y1 = layout.panels[("jacobian", plane)]
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    return np.asarray(picture.crop((cx - 8, cy - 8, cx + 8, cy + 8)), dtype=float).reshape(
        -1, 3).mean(axis=0)


@pytest.mark.parametrize(("factor", "colour"), [(1.4, "red"), (0.7, "blue"), (-0.5, "green")])
def test_the_jacobian_row_shows_growth_red_shrinkage_blue_folding_green(factor: float,
                                                                        colour: str) -> None:
    fixed = _fixed()
    picture, statistics = _render(fixed, factor)
    layout = qa_layout(fixed, mode="overlay", has_before=False, has_displacement=True,
                       has_jacobian=True, panel_size=PANEL)
    assert layout.rows == ("after overlay", "displacement", "jacobian")
    assert picture.size == layout.size
    assert statistics["jacobian_min"] == pytest.approx(factor, abs=1e-4)
    assert statistics["negative_jacobian_fraction"] == (1.0 if factor < 0 else 0.0)
    for plane in PLANES:
        r, g, b = _inside(picture, fixed, plane)
        if colour == "red":
            assert r > b + 60 and r > g + 60
        elif colour == "blue":
            assert b > r + 60 and b > g + 20
        else:
            assert (r, g, b) == pytest.approx((0.0, 255.0, 0.0), abs=1.0)


def test_outside_the_foreground_is_dimmed_and_the_key_has_a_colour_bar() -> None:
    fixed = _fixed()
    picture, _ = _render(fixed, 1.4)
    layout = qa_layout(fixed, mode="overlay", has_before=False, has_displacement=True,
                       has_jacobian=True, panel_size=PANEL)
    x0, y0, x1, y1 = layout.panels[("jacobian", "axial")]
    panel = np.asarray(picture.crop((x0, y0, x1, y1)), dtype=float)
    # A corner of the slice (outside the ball, inside the border of undefined det J).
    corner = panel[8:12, 8:12].reshape(-1, 3).mean(axis=0)
    middle = _inside(picture, fixed, "axial")
    assert corner.sum() < 0.5 * middle.sum() and corner[0] > corner[2]  # dim red
    # The label column of the row holds the bar: red at its top, blue at its bottom.
    column = np.asarray(picture.crop((0, y0, x0 - 4, y1)), dtype=int)
    red = (column[..., 0] > 180) & (column[..., 2] < 80)
    blue = (column[..., 2] > 180) & (column[..., 0] < 80)
    assert red.any() and blue.any()
    assert np.argwhere(red)[:, 0].mean() < np.argwhere(blue)[:, 0].mean()


def test_without_a_summary_there_is_no_jacobian_row() -> None:
    fixed = _fixed()
    field = _stretch(fixed, 1.2)
    picture = render_qa(fixed, fixed, mode="overlay", panel_size=PANEL, displacement=field)
    layout = qa_layout(fixed, mode="overlay", has_before=False, has_displacement=True,
                       panel_size=PANEL)
    assert layout.rows[-1] == "displacement" and picture.size == layout.size


def test_the_caption_carries_the_foreground_figures() -> None:
    statistics = {"voxels": 1000, "jacobian_min": 0.61234, "jacobian_p1": 0.8,
                  "jacobian_p99": 1.2345, "jacobian_max": 1.5,
                  "negative_jacobian_fraction": 0.00012, "sd_log_jacobian": 0.05}
    caption = qa._jacobian_caption(statistics)
    assert caption.splitlines() == ["min 0.612", "p1 0.8", "p99 1.23", "folded 0.012%"]
    assert "no fixed" in qa._jacobian_caption({"voxels": 0, "jacobian_min": None})


def test_the_colour_bar_spans_the_furthest_percentile() -> None:
    assert jacobian_limit({"jacobian_p1": 0.5, "jacobian_p99": 1.3}) == pytest.approx(2.0)
    assert jacobian_limit({"jacobian_p1": 0.9, "jacobian_p99": 1.6}) == pytest.approx(1.6)
    assert jacobian_limit({"jacobian_p1": 0.99, "jacobian_p99": 1.01}) == 1.25
    assert jacobian_limit({"jacobian_p1": -2.0, "jacobian_p99": 1.1}) == 4.0  # folding
    assert jacobian_limit({"jacobian_p1": None, "jacobian_p99": None}) == 1.25


def test_the_displacement_row_s_scale_is_the_largest_vector_of_the_whole_field() -> None:
    """max |u| read a few planes at a time in float32 is the float64 maximum over every
    voxel (NaN voxels left out), wherever the largest vector lies."""
    rng = np.random.default_rng(8)
    field = rng.normal(size=(21, 9, 7, 3)).astype(np.float32)
    field[17, 3, 2] = (4.0, -30.0, 12.5)  # past the first slabs
    field[2, 2, 2] = np.nan
    expected = np.sqrt(np.nanmax(np.sum(np.square(field, dtype=np.float64), axis=-1)))
    assert qa._largest_magnitude(field, slab=4) == pytest.approx(expected, rel=1e-6)
    assert qa._largest_magnitude(np.full((3, 2, 2, 3), np.nan, np.float32)) == 0.0
