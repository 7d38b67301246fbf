"""Flags generated from RegistrationOptions (disa submit, disa pacs ...)."""

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
    """`disa register` spells its flags by hand: each default and choice list must be the
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
