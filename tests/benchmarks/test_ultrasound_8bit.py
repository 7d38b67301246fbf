"""The 8-bit ultrasound benchmark harness: the export it simulates and a quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from .scripts import load_benchmark

u8 = load_benchmark("ultrasound_8bit")


def test_eight_bit_keeps_zeros_geometry_and_maps_the_bright_end_to_255() -> None:
    array = np.zeros((6, 7, 8), np.float32)
    array[2:5, 2:5, 2:6] = np.linspace(0.001, 2.0, 36).reshape(3, 3, 4)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 2.0, 2.5))
    image.SetOrigin((3.0, -4.0, 5.0))
    out = u8.eight_bit(image)
    values = sitk.GetArrayFromImage(out)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
    assert np.all(values[array == 0] == 0) and values.max() == 255
    assert values[2, 2, 2] == 0  # a faint echo rounds to the padding value: a shadow


def test_shadows_off_restores_the_engine_afterwards() -> None:
    from disa.registration import fov

    original = fov.acoustic_shadows
    with u8.shadows_off():
        assert fov.acoustic_shadows is not original
        assert not fov.acoustic_shadows(np.ones((4, 4, 4), bool), (1.0, 1.0, 1.0)).any()
    assert fov.acoustic_shadows is original


def test_the_lossy_and_thick_slice_exports_keep_the_fan_and_change_its_edge() -> None:
    array = np.zeros((12, 12, 12), np.float32)
    array[4:8, 4:8, 4:8] = 100.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.6, 0.7))
    ringed = sitk.GetArrayFromImage(u8.jpeg_ring(u8.eight_bit(image), width=2))
    assert np.all(ringed[4:8, 4:8, 4:8] == 255) and ringed[0, 0, 0] == 0
    assert ringed[2:10, 2:10, 2:10].max() == 255 and 0 < ringed[2, 2:10, 2:10].max() <= 5
    thick = u8.thick_slice(image)
    values = sitk.GetArrayFromImage(thick)
    assert thick.GetSpacing() == image.GetSpacing()
    assert 0 < values[3, 5, 5] < 100 and values[5, 3, 5] == 0  # ramps along slices only
    assert values.sum() == pytest.approx(array.sum(), rel=1e-4)


def test_hull_off_restores_the_engine_afterwards() -> None:
    from disa.registration import fov

    original = fov._hull_points
    with u8.hull_off():
        assert fov._hull_points(np.ones((8, 8, 8), bool), np.ones(3)) is None
    assert fov._hull_points is original
    assert set(u8.BEFORE.values()) <= set(u8.SWITCHES) and set(u8.BEFORE) == set(u8.EXPORTS)


def test_growth_off_restores_the_engine_afterwards() -> None:
    from disa.registration import fov

    original = fov.grown_padding
    padding = np.zeros((4, 4, 4), bool)
    with u8.growth_off():
        assert fov.grown_padding(np.zeros((4, 4, 4)), padding, 0.0) is padding
    assert fov.grown_padding is original


def test_quick_run_writes_both_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    assert u8.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ultrasound_8bit.jsonl").open()]
    assert [r["run"] for r in rows] == ["before", "after"]
    assert all(np.isfinite(r["tre_mm"]) and r["verdict"] for r in rows)
    assert "ct-us-moving after:" in capsys.readouterr().out
