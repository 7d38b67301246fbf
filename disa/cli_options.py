"""Command-line flags generated from RegistrationOptions, shared by `disa register`,
`disa submit` and `disa pacs ...`: one --flag per field, so the commands never drift from
the engine (names, types, choices; `disa register` also takes the engine's defaults)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

#: Marks "not given" for add_option_argument's help and metavar (None is a valid value).
_FROM_FIELD: Any = object()


def add_option_arguments(p: argparse.ArgumentParser) -> None:
    """One --flag per RegistrationOptions field (the `disa register` names); unset flags are
    not sent, so the server applies the engine's defaults."""
    from disa.registration.options import RegistrationOptions

    group = p.add_argument_group("registration options (as disa register)")
    for name in RegistrationOptions.model_fields:
        add_option_argument(group, name, dest=f"opt_{name}", default=None)


def add_option_argument(p: argparse._ActionsContainer, name: str, *, dest: str,
                        default: Any, help: Any = _FROM_FIELD,
                        metavar: Any = _FROM_FIELD) -> argparse.Action:
    """The --flag of RegistrationOptions field `name`: its type and choices from the field's
    annotation, its help from the field's description unless `help` is given (None: no
    help text), its metavar the field's name in capitals (choices: none) unless given."""
    from disa.registration.options import RegistrationOptions

    info = RegistrationOptions.model_fields[name]
    flag = f"--{name.replace('_', '-')}"
    text = info.description if help is _FROM_FIELD else help
    if _is_point(info.annotation):  # an (x, y, z) triple in mm
        return p.add_argument(flag, dest=dest, type=float, nargs=3, default=default,
                              metavar=("X", "Y", "Z") if metavar is _FROM_FIELD else metavar,
                              help=text)
    kind, choices = _argument_type(info.annotation)
    if metavar is _FROM_FIELD:
        metavar = None if choices else name.upper()
    return p.add_argument(flag, dest=dest, type=kind, choices=choices, default=default,
                          help=text, metavar=metavar)


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
