"""Validation problems as one line each, the same words for the query, the path and the
options JSON.

pydantic's own wording misleads in two cases this service meets: a NaN checked against
bounds reads "should be less than or equal to 180" (every comparison with NaN fails),
and a strict number field given "10" or true reads "should be a valid integer".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

NOT_A_NUMBER = "not-a-number (NaN) or infinite: give a finite number"
_NUMBER_TYPES = {"int_type": "an integer", "float_type": "a number"}


def describe(error: Mapping[str, Any]) -> str:
    """`location: problem` for one pydantic error (as `ValidationError.errors()` lists)."""
    where = ".".join(str(part) for part in error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "finite_number":
        problem = NOT_A_NUMBER
    elif kind in _NUMBER_TYPES and isinstance(error.get("input"), str | bool):
        problem = (f"must be {_NUMBER_TYPES[kind]} (a JSON number), not a "
                   f"{'boolean' if isinstance(error['input'], bool) else 'string'}")
    else:
        problem = error.get("msg", "invalid")
    return f"{where}: {problem}" if where else problem


def describe_all(errors: Iterable[Mapping[str, Any]]) -> str:
    """Every problem, `; `-separated, on one line."""
    return "; ".join(describe(error) for error in errors)
