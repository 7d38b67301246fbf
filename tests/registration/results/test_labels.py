"""`disa register --warp-labels`: a moving label map carried onto the fixed grid.

End to end through the CLI on a small deformed phantom (40^3 x 2.5 mm, a few
seconds), the rigid path through the result writer, and the refusals (each
exits 2 with one line before any image is registered).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from disa.cli import EXIT_INPUT, EXIT_OK, main
from disa.core.io.images import inspect_image, write_image
from disa.registration.pipeline import RegistrationResult
from disa.registration.results.labels import read_label_map, warp_labels
from disa.registration.results.outputs import write_result_folder
from disa.registration.results.qa import qa_layout
from disa.training import phantom as ph

LABELS = range(1, 9)


def _dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    return float(np.mean([2 * np.sum((x == k) & (y == k)) / max(1, np.sum(x == k)
                                                                + np.sum(y == k))
                          for k in LABELS]))


@pytest.fixture(scope="module")
def pair() -> ph.PhantomPair:
    """Four 6 mm bumps after a 5 mm / 3 degree rigid offset, 40^3 x 2.5 mm."""
    grid = ph.make_grid((40, 40, 40), (2.5, 2.5, 2.5))
    bumps = ph.random_bumps(np.random.default_rng(1), count=4, max_mm=6.0, sigma_mm=16.0,
                            extent_mm=25.0)
    linear = ph.rigid_truth((3.0, -2.0, 2.0), (4.0, -3.0, 3.0))
    return ph.make_deformed_pair(linear, bumps, grid, seed=1,
                                 anatomy=ph.default_anatomy(scale_mm=40.0))


@pytest.fixture(scope="module")
def inputs(pair, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("labels")
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nii.gz",
             "labels": folder / "labels.nii.gz"}
    write_image(pair.fixed, paths["fixed"])
    write_image(pair.moving, paths["moving"])
    # int16, as segmentation tools often write: the type must come back unchanged.
    write_image(sitk.Cast(pair.moving_labels, sitk.sitkInt16), paths["labels"])
    return paths


@pytest.fixture(scope="module")
def deformable_run(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["register", str(inputs["fixed"]), str(inputs["moving"]), "-o", str(out),
                 "--mode", "deformable", "--deformable-from", "rigid", "--similarity", "mind",
                 "--starts", "20", "--rotation-range", "10", "--translation-range", "10",
                 "--init", "geometry", "--quiet", "--warp-labels", str(inputs["labels"])])
    assert code == EXIT_OK
    return out


def test_warped_labels_land_on_the_fixed_labels(deformable_run, pair) -> None:
    warped = sitk.ReadImage(str(deformable_run / "warped_labels.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkInt16
    assert warped.GetSize() == pair.fixed.GetSize()
    np.testing.assert_allclose(warped.GetOrigin(), pair.fixed.GetOrigin(), atol=1e-4)
    # Exactly the nearest-neighbour resampling through the written full mapping.
    full = sitk.ReadTransform(str(deformable_run / "transform.h5"))
    expected = sitk.Resample(sitk.Cast(pair.moving_labels, sitk.sitkInt16), pair.fixed, full,
                             sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped),
                                  sitk.GetArrayFromImage(expected))
    # Dice against the fixed labels, relative to what the true mapping achieves (labels a
    # few 2.5 mm voxels across cap it well below 1). Measured: 0.78 through transform.h5,
    # 0.73 through its rigid part (transform.tfm), 0.86 for the truth, 0.41 unregistered.
    perfect = _dice(warp_labels(pair.moving_labels, pair.fixed, pair.truth), pair.fixed_labels)
    achieved = _dice(warped, pair.fixed_labels)
    rigid = _dice(warp_labels(pair.moving_labels, pair.fixed,
                              sitk.ReadTransform(str(deformable_run / "transform.tfm"))),
                  pair.fixed_labels)
    assert achieved >= 0.85 * perfect and achieved > rigid + 0.02
    data = json.loads((deformable_run / "result.json").read_text())
    assert data["warped_labels"] == {"file": "warped_labels.nii.gz", "source": "labels.nii.gz",
                                     "voxel_type": "16-bit signed integer", "labels": 8,
                                     "labels_missing": []}
    assert data["inputs"]["warp_labels"] == "labels.nii.gz"
    assert "warped_labels.nii.gz" in data["files"]


def test_a_deformable_result_has_its_inverse_and_the_jacobian_in_qa(deformable_run,
                                                                    pair) -> None:
    data = json.loads((deformable_run / "result.json").read_text())
    assert "inverse_displacement.nii.gz" in data["files"]
    inverse = sitk.ReadImage(str(deformable_run / "inverse_displacement.nii.gz"))
    assert inverse.GetSize() == pair.moving.GetSize()
    assert inverse.GetNumberOfComponentsPerPixel() == 3
    facts = data["deformation"]["inverse"]
    # Measured on this run: max 0.14 mm, p95 0.02 mm over ~15k moving voxels.
    assert facts["points"] > 5000 and facts["residual_max_mm"] < 0.5
    assert facts["residual_p95_mm"] < 0.1
    # The written inverse carries the fixed labels onto the moving labels.
    back = sitk.Resample(pair.fixed_labels, pair.moving, sitk.DisplacementFieldTransform(
        sitk.Cast(inverse, sitk.sitkVectorFloat64)), sitk.sitkNearestNeighbor, 0)
    forward = sitk.ReadImage(str(deformable_run / "warped_labels.nii.gz"))
    assert _dice(back, pair.moving_labels) >= _dice(forward, pair.fixed_labels) - 0.03
    jacobian = data["deformation"]["foreground_jacobian"]
    assert jacobian["voxels"] > 1000 and jacobian["foreground"] == "automatic"
    assert (jacobian["jacobian_min"] <= jacobian["jacobian_p1"] <= jacobian["jacobian_p99"]
            <= jacobian["jacobian_max"])
    assert jacobian["negative_jacobian_fraction"] == 0.0
    # Inside the foreground the range lies within the whole grid's.
    assert jacobian["jacobian_min"] >= data["deformation"]["jacobian_min"] - 1e-6
    layout = qa_layout(pair.fixed, has_displacement=True, has_jacobian=True)
    assert layout.rows[-2:] == ("displacement", "jacobian")
    with Image.open(deformable_run / "qa.png") as qa:
        assert qa.size == layout.size


def test_rigid_results_warp_labels_through_the_linear_transform(pair, tmp_path: Path) -> None:
    """No field: warped_labels.nii.gz comes through transform.tfm (here a known shift)."""
    shift = sitk.TranslationTransform(3, (5.0, 0.0, 0.0))
    result = RegistrationResult(
        mode="rigid", similarity="mind", theta=np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0]),
        transform=shift, initial_transform=sitk.Transform(), matrix=np.eye(4), cost=-0.5,
        similarity_value=0.5, evaluations=1, starts=1, confidence=1.0, agreeing=1, refined=1,
        ambiguous=False, overlap=1.0, working_spacing_mm=2.5, descriptor_spacing_mm=2.5,
        timings={"total": 1.0})
    labels = sitk.Cast(pair.moving_labels, sitk.sitkUInt8)
    data = write_result_folder(result, pair.fixed, pair.moving, tmp_path / "out",
                               labels=labels, labels_path=tmp_path / "organs.nrrd")
    warped = sitk.ReadImage(str(tmp_path / "out" / "warped_labels.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkUInt8
    moving = sitk.GetArrayFromImage(pair.moving_labels)
    # A 5 mm shift along x is two voxels: fixed voxel i shows moving voxel i + 2.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped)[:, :, :-2], moving[:, :, 2:])
    assert data["warped_labels"]["source"] == "organs.nrrd"
    assert "inverse_displacement.nii.gz" not in data["files"] and "deformation" not in data


# ------------------------------------------------------------------ reading the label map


def test_whole_numbers_stored_as_floats_become_the_smallest_integer_type(inputs,
                                                                       tmp_path: Path) -> None:
    moving = sitk.ReadImage(str(inputs["labels"]))
    as_float = sitk.Cast(moving, sitk.sitkFloat64)
    path = tmp_path / "float_labels.nii.gz"
    write_image(as_float, path)
    labels = read_label_map(path, inspect_image(inputs["moving"]))
    assert labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels),
                                  sitk.GetArrayFromImage(moving))
    negative = sitk.Cast(moving, sitk.sitkFloat32) - 3.0
    write_image(negative, path)
    assert read_label_map(path, inspect_image(inputs["moving"])).GetPixelID() == sitk.sitkInt8


def _bad_label_file(kind: str, inputs: dict[str, Path], folder: Path) -> tuple[Path, str]:
    """A bad --warp-labels argument and a phrase its error must hold."""
    labels = sitk.ReadImage(str(inputs["labels"]))
    path = folder / "bad.nii.gz"
    if kind == "missing":
        return folder / "absent.nii.gz", "absent.nii.gz: cannot be accessed"
    if kind == "folder":
        (folder / "segs").mkdir()
        return folder / "segs", "segs: is a folder"
    if kind == "wrong_size":
        write_image(labels[:, :, :30], path)
        return path, "bad.nii.gz: is 40 x 40 x 30 voxels, the moving image 40 x 40 x 40"
    if kind == "wrong_origin":
        shifted = sitk.Image(labels)
        shifted.SetOrigin(tuple(v + 5.0 for v in labels.GetOrigin()))
        write_image(shifted, path)
        return path, "same size but not the moving image's grid (origin"
    if kind == "fractional":
        write_image(sitk.Cast(labels, sitk.sitkFloat32) * 0.5, path)
        return path, "not whole numbers (e.g. 0.5)"
    if kind == "text":
        text = folder / "labels.nii.gz"
        text.write_text("not an image")
        return text, "labels.nii.gz: "
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "folder", "wrong_size", "wrong_origin",
                                  "fractional", "text"])
def test_a_bad_label_map_exits_2_with_one_line_before_registering(
        kind: str, inputs, tmp_path: Path, capsys, monkeypatch) -> None:
    from disa.registration import runner

    def not_now(*args, **kwargs):
        raise AssertionError("registered before the label map was checked")

    monkeypatch.setattr(runner, "register", not_now)
    path, phrase = _bad_label_file(kind, inputs, tmp_path)
    code = main(["register", str(inputs["fixed"]), str(inputs["moving"]), "-o",
                 str(tmp_path / "out"), "--similarity", "mind", "--quiet", "--warp-labels",
                 str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert err.count("\n") == 1 and err.startswith("disa: error: label map: "), err
    assert phrase in err, err
    assert not (tmp_path / "out").exists()
