"""The `disa` command: register end to end, the transform convention, info, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from disa.cli import EXIT_INPUT, EXIT_OK, main
from disa.core.io.images import write_image

from ..core.io_fixtures import phantom
from ..core.test_io import BAD_INPUTS


@pytest.fixture(scope="module")
def registered(small_pair, tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.mha"
    write_image(small_pair.fixed, fixed)
    write_image(small_pair.moving, moving)
    out = folder / "out"
    code = main(["register", str(fixed), str(moving), "-o", str(out), "--similarity", "mind",
                 "--starts", "60", "--rotation-range", "20", "--translation-range", "30",
                 "--init", "geometry", "--quiet"])
    assert code == EXIT_OK
    return fixed, moving, out


def test_register_writes_the_result_folder(registered) -> None:
    _, _, out = registered
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["transform.tfm", "registered.nii.gz", "result.json", "qa.png"])
    data = json.loads((out / "result.json").read_text())
    for key in ("mode", "similarity", "parameters", "final_objective", "evaluations", "starts",
                "timings_s", "confidence", "ambiguous", "versions"):
        assert key in data
    assert data["mode"] == "rigid" and data["similarity"] == "mind" and data["starts"] == 60
    with Image.open(out / "qa.png") as qa:
        assert qa.size[0] > 300 and np.asarray(qa).std() > 10


def test_written_transform_follows_the_itk_resampling_convention(registered, small_pair) -> None:
    """sitk.Resample(moving, fixed, T) with the written file aligns moving with fixed."""
    _, _, out = registered
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    fixed = sitk.GetArrayFromImage(small_pair.fixed_labels)

    def dice(tx: sitk.Transform) -> np.ndarray:
        warped = sitk.GetArrayFromImage(sitk.Resample(
            small_pair.moving_labels, small_pair.fixed_labels, tx, sitk.sitkNearestNeighbor, 0))
        return np.array([2 * np.sum((warped == k) & (fixed == k))
                         / (np.sum(warped == k) + np.sum(fixed == k)) for k in range(1, 9)])

    # Nearest-neighbour labels of small organs at 3 mm cap Dice below 1 even for the true
    # transform: compare with what the truth itself achieves.
    achieved, perfect, before = dice(transform), dice(small_pair.truth), dice(sitk.Transform())
    assert achieved.mean() >= 0.97 * perfect.mean() and np.all(achieved >= 0.9 * perfect)
    assert before.mean() < 0.6 * perfect.mean()
    # registered.nii.gz is exactly that resampling of the moving image.
    registered_image = sitk.ReadImage(str(out / "registered.nii.gz"))
    assert registered_image.GetSize() == small_pair.fixed.GetSize()
    np.testing.assert_allclose(registered_image.GetOrigin(), small_pair.fixed.GetOrigin())


def test_info_prints_the_geometry(registered, capsys) -> None:
    fixed, _, _ = registered
    assert main(["info", str(fixed)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "64" in text and "3" in text
    assert main(["info", str(fixed), "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == [64, 64, 64] and info["format"] == "nifti"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, registered, case: str, capsys) -> None:
    build, phrase, limits, series_uid = BAD_INPUTS[case]
    if limits != BAD_INPUTS["empty_file"][2] or series_uid is not None:
        pytest.skip("needs non-default limits or a series choice: covered in test_io")
    bad = build(tmp_path)
    fixed, _, _ = registered
    code = main(["register", str(fixed), str(bad), "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert err.count("\n") == 1 and err.startswith("disa: error: ") and phrase in err
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.parametrize("args, phrase", [
    (["--starts", "0"], "starts"),
    (["--rotation-range", "-5"], "rotation_range"),
    (["--mode", "bspline"], "invalid choice"),
    # A check across options has no field name: no stray ": " before its message.
    (["--mode", "rigid+probe", "--probe-axis", "0", "0", "0"],
     "invalid options: Value error, probe_axis must not be the zero vector"),
])
def test_bad_options_exit_2(registered, tmp_path: Path, args: list[str], phrase: str,
                            capsys) -> None:
    fixed, moving, _ = registered
    with pytest.raises(SystemExit) as caught:
        code = main(["register", str(fixed), str(moving), "-o", str(tmp_path), *args])
        raise SystemExit(code)
    assert caught.value.code == EXIT_INPUT
    assert phrase in capsys.readouterr().err


def test_missing_model_is_a_clear_input_error(registered, tmp_path: Path, capsys,
                                              monkeypatch) -> None:
    import disa.model.card as card

    monkeypatch.setattr(card, "default_card_path", lambda: None)
    fixed, moving, _ = registered
    code = main(["register", str(fixed), str(moving), "-o", str(tmp_path), "--similarity",
                 "disa", "--quiet"])
    assert code == EXIT_INPUT
    assert "DISA model" in capsys.readouterr().err


def _address_space_limit(limit_bytes: int):
    """preexec_fn: cap the child's address space, so that an unguarded giant allocation
    fails at once (MemoryError) instead of taking the machine's memory."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def test_a_working_spacing_too_fine_for_memory_exits_2_with_one_line(small_pair,
                                                                      tmp_path: Path) -> None:
    """0.1 mm over a 189 mm field of view would be a 1891^3 grid (27 GB as float32): the
    engine refuses it as bad input before allocating anything."""
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    write_image(small_pair.fixed, fixed)
    write_image(small_pair.moving, moving)
    done = subprocess.run(
        [sys.executable, "-m", "disa", "register", str(fixed), str(moving), "-o",
         str(tmp_path / "o"), "--similarity", "mind", "--working-spacing", "0.1"],
        capture_output=True, text=True, timeout=300,
        preexec_fn=_address_space_limit(6 * 1024**3))
    assert done.returncode == EXIT_INPUT, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("disa: error: "), error
    assert "--working-spacing 0.1 mm makes a working grid of 1891 x 1891 x 1891 voxels" in error
    assert "above the limit of 134,217,728 voxels" in error


def test_console_script_plain_progress_lines(registered, tmp_path: Path) -> None:
    """Not a terminal: progress comes as plain lines; exit code 0."""
    fixed, moving, _ = registered
    done = subprocess.run(
        [sys.executable, "-m", "disa", "register", str(fixed), str(moving), "-o",
         str(tmp_path / "o"), "--similarity", "mind", "--starts", "20", "--init", "geometry"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "search" in done.stderr and "\x1b[" not in done.stderr
    assert done.stdout.startswith("verdict: ") and "refined solutions agree" in done.stdout
    assert "confidence" not in done.stdout  # the verdict's evidence, not a competing figure


def test_info_gives_a_modality_hint_unless_header_only(registered, capsys) -> None:
    fixed, _, _ = registered
    assert main(["info", str(fixed)]) == EXIT_OK
    assert "modality hint: " in capsys.readouterr().out
    assert main(["info", str(fixed), "--header-only"]) == EXIT_OK
    assert "modality hint" not in capsys.readouterr().out


# ------------------------------------------------- output folder, input roles


def _write_phantom_inputs(folder: Path) -> tuple[Path, Path]:
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.nrrd"
    write_image(phantom(), fixed)
    write_image(phantom(), moving)
    return fixed, moving


@pytest.mark.parametrize("case", ["existing_file", "under_a_file", "folder_of_other_files"])
def test_bad_output_folder_exits_2_before_reading_the_inputs(tmp_path: Path, case: str,
                                                             capsys, monkeypatch) -> None:
    """A bad -o is refused at once (it used to cost a whole registration, then exit 1)."""
    from disa.registration import runner

    def not_now(*args, **kwargs):
        raise AssertionError("an input was read before the output folder was checked")

    monkeypatch.setattr(runner, "inspect_image", not_now)
    monkeypatch.setattr(runner, "read_image", not_now)
    fixed, moving = _write_phantom_inputs(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "notes.txt").write_text("mine")
    out, phrase = {
        "existing_file": (tmp_path / "afile", "is an existing file, not a folder"),
        "under_a_file": (tmp_path / "afile" / "sub", "cannot create the result folder: afile "
                                                     "is a file"),
        "folder_of_other_files": (tmp_path / "study", "not part of a DISA result (notes.txt)"),
    }[case]
    code = main(["register", str(fixed), str(moving), "-o", str(out), "--similarity", "mind",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert err.count("\n") == 1 and err.startswith(f"disa: error: {out}: ") and phrase in err
    assert (tmp_path / "study" / "notes.txt").read_text() == "mine"


def _tiny(folder: Path) -> dict[str, Path]:
    path = folder / "tiny.nii.gz"
    write_image(phantom()[:4, :4, :4], path)
    return {"moving": path}


def _zeros(folder: Path) -> dict[str, Path]:
    path = folder / "zeros.nii.gz"
    write_image(phantom() * 0.0, path)
    return {"fixed": path}


def _constant_in_mask(folder: Path) -> dict[str, Path]:
    image, mask = folder / "ones.mha", folder / "mask.nii.gz"
    write_image(phantom() * 0.0 + 1.0, image)
    write_image(phantom() * 0.0 + 1.0, mask)
    return {"moving": image, "--moving-mask": mask}


def _mask_elsewhere(folder: Path) -> dict[str, Path]:
    mask = phantom() * 0.0 + 1.0
    mask.SetOrigin(tuple(o + 1000.0 for o in mask.GetOrigin()))
    path = folder / "far.nii.gz"
    write_image(mask, path)
    return {"--fixed-mask": path}


def _one_voxel_mask(folder: Path) -> dict[str, Path]:
    array = np.zeros(phantom().GetSize()[::-1], dtype=np.float32)
    array[8, 10, 12] = 1.0
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(phantom())
    path = folder / "speck.nii.gz"
    write_image(mask, path)
    return {"--moving-mask": path}


@pytest.mark.parametrize(("build", "start"), [
    (_tiny, "moving: image is only"),
    (_zeros, "fixed: image foreground is (nearly) empty"),
    (_constant_in_mask, "moving: image has constant intensity over its foreground"),
    (_mask_elsewhere, "fixed mask: mask does not overlap its image"),
    (_one_voxel_mask, "moving mask: mask covers only "),
])
def test_preparation_errors_name_the_input(tmp_path: Path, build, start: str, capsys) -> None:
    """Errors found while preparing the images say which input they are about."""
    fixed, moving = _write_phantom_inputs(tmp_path)
    given = build(tmp_path)
    args = ["register", str(given.pop("fixed", fixed)), str(given.pop("moving", moving)),
            "-o", str(tmp_path / "out"), "--similarity", "mind", "--quiet"]
    for option, path in given.items():
        args += [option, str(path)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert err.count("\n") == 1 and err.startswith(f"disa: error: {start}"), err
    assert not (tmp_path / "out").exists()


def test_demo_registers_the_bundled_pair_within_2_mm_and_replaces_its_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command: the bundled pair, checked against its known transform."""
    out = tmp_path / "disa-demo"
    for _ in range(2):  # a second run replaces the first result whole
        assert main(["demo", "-o", str(out), "--quiet"]) == EXIT_OK
        printed = capsys.readouterr().out
        error = float(printed.split("known transform: ")[1].split(" mm")[0])
        assert error < 2.0
        # a correct result is called likely, first thing, with the evidence qa.png's title
        # and the web page show (the same words from result.json)
        data = json.loads((out / "result.json").read_text())
        assert data["verdict"] == "likely", data["verdict_reason"]
        summary = printed.split("\n", 2)[2]  # after the fixed: and moving: lines
        assert summary.startswith(f"verdict: LIKELY: {data['verdict_evidence']}\n"), printed
        from PIL import Image  # qa.png's title bar: the verdict's colour (green: likely)

        assert Image.open(out / "qa.png").convert("RGB").getpixel((1, 1)) == (21, 128, 61)
        assert {"transform.tfm", "registered.nii.gz", "qa.png", "result.json"} <= {
            p.name for p in out.iterdir()}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    assert main(["demo", "-o", str(tmp_path / "notes"), "--quiet"]) == EXIT_INPUT
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------ --initial-transform


def _bspline_tfm(folder: Path) -> Path:
    path = folder / "bspline.tfm"
    grid = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    sitk.WriteTransform(sitk.BSplineTransformInitializer(grid, [3, 3, 3]), str(path))
    return path


def _field_h5(folder: Path) -> Path:
    # A zero field maps every point linearly (the identity): refused by its class,
    # not by probing the mapping.
    path = folder / "field.h5"
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(path))
    return path


def _garbage_tfm(folder: Path) -> Path:
    path = folder / "garbage.tfm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a transform at all")
    return path


def _truncated_affine(folder: Path) -> Path:
    path = folder / "short.tfm"
    path.write_text("#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n"
                    "Parameters: 1 0 0\nFixedParameters: 0 0 0\n")
    return path


def _singular_affine(folder: Path) -> Path:
    path = folder / "flat.tfm"
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1, 0, 0, 0, 1, 0, 0, 0, 0))  # squashes z
    sitk.WriteTransform(affine, str(path))
    return path


def _infinite_h5(folder: Path) -> Path:
    path = folder / "inf.h5"
    sitk.WriteTransform(sitk.TranslationTransform(3, (float("inf"), 0.0, 0.0)), str(path))
    return path


def _oversized_tfm(folder: Path) -> Path:
    path = folder / "huge.tfm"
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    return path


@pytest.mark.parametrize(("build", "phrase"), [
    (_bspline_tfm, "(bspline.tfm): BSplineTransform is not a linear transform"),
    (_field_h5, "(field.h5): DisplacementFieldTransform is not a linear transform"),
    (_garbage_tfm, "(garbage.tfm): not an ITK transform file"),
    (_truncated_affine, "(short.tfm): not a readable ITK transform file"),
    (_singular_affine, "(flat.tfm): the transform's matrix is singular"),
    (_infinite_h5, "(inf.h5): parameters are not finite numbers"),
    (_oversized_tfm, "(huge.tfm): file is 1,048,577 bytes, above the limit"),
    (lambda folder: folder / "absent.tfm", "(absent.tfm): file not found"),
    (lambda folder: folder, "a folder without transform.tfm"),
])
def test_a_bad_initial_transform_exits_2_with_one_line_before_reading_images(
        tmp_path: Path, build, phrase: str, capsys, monkeypatch) -> None:
    from disa.registration import runner

    def not_now(*args, **kwargs):
        raise AssertionError("an image was read before the initial transform was checked")

    fixed, moving = _write_phantom_inputs(tmp_path)
    bad = build(tmp_path)
    monkeypatch.setattr(runner, "inspect_image", not_now)
    monkeypatch.setattr(runner, "read_image", not_now)
    code = main(["register", str(fixed), str(moving), "-o", str(tmp_path / "out"),
                 "--similarity", "mind", "--quiet", "--initial-transform", str(bad)])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert err.count("\n") == 1 and err.startswith("disa: error: initial transform ("), err
    assert phrase in err and str(tmp_path) not in err
    assert not (tmp_path / "out").exists()


class _Captured(Exception):
    """Stops a run once register() has shown its arguments."""


@pytest.mark.parametrize("given", ["file", "result_folder"])
def test_a_rigid_initial_transform_reaches_register_intact_and_is_recorded(
        tmp_path: Path, given: str, capsys, monkeypatch) -> None:
    """The Euler3D file arrives in register() as the same mapping (fixed -> moving), with
    the CLI's defaults; result.json's inputs record its matrix. The engine is stubbed."""
    from disa.registration import runner
    from disa.registration.transform.parametric import linear_matrix

    euler = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.2, -0.1, 0.3, (12.0, -8.0, 9.0))
    expected = linear_matrix(euler)
    folder = tmp_path / "earlier"
    folder.mkdir()
    sitk.WriteTransform(euler, str(folder / "transform.tfm"))
    seen: dict = {}

    def fake_register(fixed, moving, options, fixed_mask, moving_mask, progress, cancel,
                      initial_transform=None, max_voxels=None):
        seen["options"], seen["transform"] = options, initial_transform
        seen["max_voxels"] = max_voxels
        return "result"

    def fake_write(result, fixed, moving, outdir, inputs, extra=None, **kwargs):
        seen["inputs"] = inputs
        raise _Captured

    monkeypatch.setattr(runner, "register", fake_register)
    monkeypatch.setattr(runner, "write_result_folder", fake_write)
    fixed, moving = _write_phantom_inputs(tmp_path)
    path = folder / "transform.tfm" if given == "file" else folder
    with pytest.raises(_Captured):
        main(["--debug", "register", str(fixed), str(moving), "-o", str(tmp_path / "out"),
              "--quiet", "--initial-transform", str(path)])
    np.testing.assert_allclose(linear_matrix(seen["transform"]), expected, atol=1e-12)
    # The same mapping at a point far from the centre: fixed -> moving, not inverted.
    point = (40.0, -30.0, 25.0)
    np.testing.assert_allclose(seen["transform"].TransformPoint(point),
                               euler.TransformPoint(point), atol=1e-9)
    recorded = seen["inputs"]["initial_transform"]
    assert recorded["path"] == path.name
    np.testing.assert_allclose(recorded["matrix_fixed_to_moving"], expected, atol=1e-12)
    json.dumps(seen["inputs"])  # plain JSON for result.json
    options = seen["options"]
    assert (options.translation_range, options.init, options.ultrasound) == (None, "auto", None)
    assert seen["max_voxels"] == 512**3  # the CLI's default cap reaches the pipeline
    capsys.readouterr()


def test_without_an_initial_transform_result_json_says_none(tmp_path: Path,
                                                             monkeypatch) -> None:
    from disa.registration import runner

    seen: dict = {}

    def fake_register(*args, initial_transform=None, **kwargs):
        seen["transform"] = initial_transform
        return "result"

    def fake_write(result, fixed, moving, outdir, inputs, extra=None, **kwargs):
        seen["inputs"] = inputs
        raise _Captured

    monkeypatch.setattr(runner, "register", fake_register)
    monkeypatch.setattr(runner, "write_result_folder", fake_write)
    fixed, moving = _write_phantom_inputs(tmp_path)
    with pytest.raises(_Captured):
        main(["--debug", "register", str(fixed), str(moving), "-o", str(tmp_path / "out"),
              "--quiet"])
    assert seen["transform"] is None and seen["inputs"]["initial_transform"] is None


def test_the_summary_puts_an_uncertain_verdict_first_with_why(tmp_path: Path, capsys) -> None:
    from disa.cli import _print_summary

    data = {"verdict": "uncertain", "verdict_reason": "another pose scores almost as well: "
            "check qa.png", "verdict_evidence": "8 of 8 refined solutions agree, match quality "
            "0.70 (0 chance, 1 perfect), overlap 99%, another pose scores almost as well",
            "mode": "rigid", "similarity": "mind", "similarity_value": 0.5, "evaluations": 10,
            "timings_s": {"search": 1.0, "search_adam": 0.5}, "files": ["qa.png"]}
    _print_summary(data, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"verdict: UNCERTAIN: {data['verdict_evidence']}"
    assert lines[1] == f"  why: {data['verdict_reason']}"
    assert lines[2].startswith("rigid registration with mind: similarity 0.5000")
