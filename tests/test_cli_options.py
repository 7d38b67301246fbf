"""Flags generated from RegistrationOptions (disa register, disa submit, disa pacs ...)."""

from __future__ import annotations

import argparse

import pytest

from disa.cli_options import add_option_arguments, options_from_args
from disa.registration.options import RegistrationOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_option_arguments(p)
    return p


def test_every_field_has_a_flag_and_set_flags_validate() -> None:
    p = _parser()
    args = p.parse_args(["--mode", "rigid+probe", "--starts", "5", "--rotation-range", "12.5",
                         "--probe-origin", "1", "2", "3", "--similarity", "mind"])
    options = options_from_args(args)
    assert options == {"mode": "rigid+probe", "starts": 5, "rotation_range": 12.5,
                       "probe_origin": [1.0, 2.0, 3.0], "similarity": "mind"}
    parsed = RegistrationOptions.model_validate(options)
    assert parsed.probe_origin == (1.0, 2.0, 3.0)
    flags = {a.dest for a in p._actions}
    assert all(f"opt_{name}" in flags for name in RegistrationOptions.model_fields)


def test_unset_flags_are_not_sent_and_bad_choices_are_refused() -> None:
    assert options_from_args(_parser().parse_args([])) == {}
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "bspline"])


def test_disa_register_defaults_and_choices_are_the_engines() -> None:
    """`disa register`'s flags are generated: each default and choice list must be the
    engine's (translation_range and ultrasound None: derived from the images; init auto)."""
    from disa.cli import build_parser
    from disa.cli_options import _argument_type

    parser = build_parser()
    register = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices["register"]
    actions = {a.dest: a for a in register._actions}
    checked = 0
    for name, info in RegistrationOptions.model_fields.items():
        if name not in actions:
            continue  # engine-only knobs (top_k, mind_*) have no `disa register` flag
        action = actions[name]
        assert action.default == info.default, name
        _, choices = _argument_type(info.annotation)
        assert (sorted(action.choices) if action.choices else None) == (
            sorted(choices) if choices else None), name
        checked += 1
    assert checked >= 15
    assert actions["init"].default == "auto" and "auto" in actions["init"].choices
    assert actions["translation_range"].default is None
    assert actions["ultrasound"].default is None
    # The initial transform is a file, not an option: a flag of its own.
    assert actions["initial_transform"].default is None


def _register_parser() -> argparse.ArgumentParser:
    from disa.cli import build_parser

    return next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices["register"]


def _hand_written_register() -> argparse.ArgumentParser:
    """`disa register` as it was written by hand before its flags were generated from
    RegistrationOptions (issue 21): the reference its flags and help must still match."""
    from pathlib import Path

    p = argparse.ArgumentParser(prog="disa register",
                                description="Register MOVING to FIXED. The output transform "
                                            "maps fixed points to moving points (LPS mm, ITK "
                                            "convention).")
    p.add_argument("fixed", type=Path, help="fixed image (NIfTI, NRRD, MetaImage .mha, DICOM "
                                            "folder or .zip)")
    p.add_argument("moving", type=Path, help="moving image (same formats)")
    p.add_argument("-o", "--output", type=Path, required=True, help="result folder")
    p.add_argument("--mode", choices=["rigid", "affine", "rigid+probe", "deformable"],
                   default="rigid", help="rigid+probe: ultrasound probe compression with the "
                                         "pose; deformable: dense field after rigid/affine")
    p.add_argument("--similarity", choices=["disa", "mind", "lc2"], default=None,
                   help="default: disa when the model ships, else mind")
    p.add_argument("--starts", type=int, default=500, help="random starts (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotation-range", type=float, default=40.0, metavar="DEG")
    p.add_argument("--translation-range", type=float, default=None, metavar="MM",
                   help="starts draw shifts in +- this many mm per axis (default: from the "
                        "images' extents)")
    p.add_argument("--working-spacing", type=float, default=None, metavar="MM")
    p.add_argument("--init", choices=["auto", "centers", "geometry"], default="auto",
                   help="poses the starts are drawn around: auto (default): the header pose, "
                        "the aligned foreground centroids and placements of a much smaller "
                        "field of view; centers: the centroids only; geometry: the header "
                        "pose (or --initial-transform) only")
    p.add_argument("--initial-transform", type=Path, default=None, metavar="FILE",
                   help="ITK linear transform (.tfm, .txt, .h5) mapping fixed to moving "
                        "points (LPS mm), e.g. an earlier result's transform.tfm or its "
                        "folder: replaces the header pose as the pose to start from")
    p.add_argument("--precision", choices=["int8", "float32"], default="int8")
    p.add_argument("--deformable-from", choices=["rigid", "affine"], default="affine",
                   help="deformable mode: the linear stage the field starts from")
    p.add_argument("--regularisation", type=float, default=1.0, metavar="W",
                   help="deformable mode: smoothness weight relative to the default (1)")
    p.add_argument("--search-radius", type=float, default=None, metavar="MM",
                   help="deformable mode: discrete search half-width (default 1.5 control "
                        "spacings)")
    p.add_argument("--ultrasound", choices=["moving", "fixed"], default=None,
                   help="which image is an ultrasound volume (default: detected from the "
                        "data); rigid+probe mode fits the probe compression in it")
    p.add_argument("--probe-origin", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="rigid+probe mode: probe face centre, LPS mm (default: from the "
                        "ultrasound's field of view)")
    p.add_argument("--probe-axis", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="rigid+probe mode: direction into the body, LPS (default: from the "
                        "ultrasound's field of view)")
    p.add_argument("--fixed-mask", type=Path, default=None, metavar="F")
    p.add_argument("--moving-mask", type=Path, default=None, metavar="M")
    # (Added after the flags were generated: a file, not an option, like the masks.)
    p.add_argument("--warp-labels", type=Path, default=None, metavar="FILE",
                   help="label map on MOVING's grid (integer voxels): also written onto the "
                        "fixed grid through the final transform, nearest neighbour, as "
                        "warped_labels.nii.gz")
    p.add_argument("--fixed-series-uid", default=None, metavar="UID",
                   help="series to use when FIXED is a DICOM folder/zip with several")
    p.add_argument("--moving-series-uid", default=None, metavar="UID",
                   help="series to use when MOVING is a DICOM folder/zip with several")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def test_disa_register_flags_and_help_are_unchanged_by_generating_them(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    generated, reference = _register_parser(), _hand_written_register()

    def described(parser: argparse.ArgumentParser) -> list[tuple]:
        return [(a.option_strings, a.dest, a.default, a.choices, a.nargs, a.required, a.help,
                 a.metavar or a.dest.upper()) for a in parser._actions]

    assert described(generated) == described(reference)
    assert generated.format_help() == reference.format_help()
    assert generated.format_usage() == reference.format_usage()


def test_disa_register_passes_every_flag_to_the_engine() -> None:
    from disa.cli import ENGINE_ONLY_OPTIONS, _options_from_args

    argv = ["f.nii", "m.nii", "-o", "out", "--mode", "rigid+probe", "--similarity", "mind",
            "--starts", "7", "--seed", "3", "--rotation-range", "12.5",
            "--translation-range", "30", "--working-spacing", "2.5", "--init", "centers",
            "--precision", "float32", "--deformable-from", "rigid", "--regularisation", "2",
            "--search-radius", "4", "--ultrasound", "moving", "--probe-origin", "1", "2", "3",
            "--probe-axis", "0", "0", "1"]
    options = _options_from_args(_register_parser().parse_args(argv))
    assert options == RegistrationOptions(
        mode="rigid+probe", similarity="mind", starts=7, seed=3, rotation_range=12.5,
        translation_range=30.0, working_spacing=2.5, init="centers", precision="float32",
        deformable_from="rigid", regularisation=2.0, search_radius=4.0, ultrasound="moving",
        probe_origin=(1.0, 2.0, 3.0), probe_axis=(0.0, 0.0, 1.0))
    assert _options_from_args(_register_parser().parse_args(argv[:4])) == RegistrationOptions()
    # every field has a flag but the engine's tuning knobs
    flags = {a.dest for a in _register_parser()._actions}
    assert set(RegistrationOptions.model_fields) - flags == set(ENGINE_ONLY_OPTIONS)
