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
