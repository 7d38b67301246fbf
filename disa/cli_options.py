"""Command-line flags generated from RegistrationOptions, shared by `disa submit` and
`disa pacs ...`: one --flag per field, so the commands never drift from the engine."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any


def add_option_arguments(p: argparse.ArgumentParser) -> None:
    """One --flag per RegistrationOptions field (the `disa register` names); unset flags are
    not sent, so the server applies the engine's defaults."""
    from disa.registration.options import RegistrationOptions

    group = p.add_argument_group("registration options (as disa register)")
    for name, info in RegistrationOptions.model_fields.items():
        flag, dest = f"--{name.replace('_', '-')}", f"opt_{name}"
        if _is_point(info.annotation):  # an (x, y, z) triple in mm
            group.add_argument(flag, dest=dest, type=float, nargs=3, default=None,
                               metavar=("X", "Y", "Z"), help=info.description)
            continue
        kind, choices = _argument_type(info.annotation)
        group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None,
                           help=info.description, metavar=None if choices else name.upper())


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user set, by engine name."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def _is_point(annotation: Any) -> bool:
    """True for tuple[float, float, float] (optionally | None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _is_point(args[0])
    return typing.get_origin(annotation) is tuple


def _argument_type(annotation: Any) -> tuple[type, list[str] | None]:
    """argparse type and choices for an options field (Literal, int, float; optional)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _argument_type(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in args]
    if annotation in (int, float):
        return annotation, None
    return str, None
