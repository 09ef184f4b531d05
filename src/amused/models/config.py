"""Checks shared by the model configs (`UViTConfig`, `VQGANConfig`).

A config read from a checkpoint's config.json is untrusted input: each field must have the type its annotation
gives (no "1024" for an int, no "false" or 0 for a bool, no NaN for a float) and a size in range, so a bad file
is refused with the key's name before a model is built, not with a ZeroDivisionError or "not all arguments
converted" deep inside one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing


def check_types(config) -> None:
    """Raise ValueError naming the first field whose value does not match its annotation."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if not _matches(value, hint):
            raise ValueError(f"{field.name} must be {_describe(hint)}, got {value!r}")


def check_at_least(config, minimum: int, *names: str) -> None:
    for name in names:
        values = getattr(config, name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {values!r}")


def check_fraction(config, *names: str) -> None:
    """Dropout-like fields: in [0, 1)."""
    for name in names:
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)!r}")


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 0.0 as 0: ints are numbers too
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).partition(' ')[2]}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(hint, str(hint))
