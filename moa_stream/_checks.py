"""Shared checks of configuration values: where a problem is, what was expected, what came instead.

Every configuration error is one line naming the source, the preset (once known), the field and the
bad value, shown briefly.
"""

from __future__ import annotations

import difflib
import reprlib
import types
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from ._errors import ConfigError

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


def show(value: object) -> str:
    return _short.repr(value)


class Where:
    """Where an error is: the source, and the preset once known."""

    def __init__(self, source: str, preset: str | None = None) -> None:
        self.source = source
        self.preset = preset

    def error(self, field: str | None, problem: str) -> ConfigError:
        parts = [self.source]
        if self.preset is not None:
            parts.append(f"preset {self.preset!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        parts.append(problem)
        return ConfigError(" ".join(": ".join(parts).splitlines()))


_NOUNS: dict[Any, tuple[str, str]] = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("true or false", "booleans"),
}


def describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if tp is type(None):
        return "None"
    if origin is list:
        return f"a list of {_NOUNS[args[0]][1]}"
    if origin is dict:
        return "a table of request parameters"
    return _NOUNS[tp][0]


def typed(scope: Where, field: str, value: object, tp: Any) -> Any:
    # msgspec's strict conversion is the type check: no bool for int, no str for numbers; ints become
    # floats where a float is expected, tuples become lists.
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError:
        raise scope.error(field, f"expected {describe(tp)}, got {show(value)}") from None


def unknown_key(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key; valid keys: " + ", ".join(valid)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check_table_keys(
    scope: Where, field: str, table: dict[str, Any], valid: Mapping[str, Any], *, required: tuple[str, ...]
) -> None:
    for key in table:
        if key not in valid:
            raise scope.error(f"{field}.{key}", unknown_key(key, set(valid) - {"client"}))
    for key in required:
        if key not in table:
            raise scope.error(f"{field}.{key}", "missing")


class KeywordOnly(type(msgspec.Struct)):  # type: ignore[misc]
    """A struct whose positional arguments get an error that says so, and names its fields
    (msgspec's own says only "Extra positional arguments provided")."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            fields = ", ".join(cls.__struct_fields__)
            first = cls.__struct_fields__[0]
            raise TypeError(
                f"{cls.__name__}() takes keyword arguments only, as in {cls.__name__}({first}=...); "
                f"its fields: {fields}"
            )
        return super().__call__(**kwargs)
