"""Checking the options of kpg's commands before anything runs or is written.

Every config dataclass (``TrainConfig``, ``MAPPOConfig``, ...) is checked in two layers:
:func:`check_options` compares each field's value with its annotation (so a field added later is
type-checked without more code), and the class's ``validate()`` adds the ranges its values must
lie in, with :func:`require`. A bad value raises :class:`OptionError`, whose one-line message names
the option as a flag, the value and what is allowed; ``kpg`` prints it and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal


class Refusal(Exception):
    """An input kpg refuses before anything is written; its message is one line that says what to do."""


class OptionError(Refusal, ValueError):
    """An option's value that kpg refuses; the message names the option, the value and what is allowed."""

    def __init__(self, option: str, value: Any, allowed: str):
        self.option, self.value, self.allowed = option, value, allowed
        super().__init__(f"{option} {_shown(value)}: {allowed}")


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def flag(prefix: str, name: str) -> str:
    """The command-line flag of field ``name`` of the config at ``prefix`` ("" or "mappo.")."""
    return f"--{prefix}{name.replace('_', '-')}"


def check_options(config: Any, prefix: str = "") -> None:
    """Raises :class:`OptionError` for the first field of dataclass ``config`` (nested ones too)
    whose value does not have its annotated type (floats must be finite), then for the first value
    out of range (each config's ``validate()``)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        option = flag(prefix, field.name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise OptionError(option, value, f"expected a table of {hint.__name__} options")
            check_options(value, f"{prefix}{field.name}.")
        elif not _matches(value, hint):
            raise OptionError(option, value, _mismatch(value, hint))
    if hasattr(config, "validate"):
        config.validate()


def _matches(value: Any, hint: Any) -> bool:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in arguments)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in arguments)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer is a float, as in Python's annotations
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is Path:
        return isinstance(value, Path)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return all(_matches(item, arguments[0]) for item in value)
        return len(value) == len(arguments) and all(_matches(v, a) for v, a in zip(value, arguments))
    if origin is list:
        return isinstance(value, list) and all(_matches(item, arguments[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _matches(k, arguments[0]) and _matches(v, arguments[1]) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"kpg.options cannot check the annotation {hint!r}; add it to kpg.options._matches")


def _mismatch(value: Any, hint: Any) -> str:
    """What is wrong with ``value`` for ``hint``: the first item that is not of its type, for a list
    of the right length; else the value's type."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if (
        origin in (tuple, list)
        and isinstance(value, (tuple, list))
        and (origin is list or arguments[1:] == (Ellipsis,))
    ):
        bad = next(item for item in value if not _matches(item, arguments[0]))
        return f"expected {_describe(hint)}; {_shown(bad)} is not {_describe(arguments[0])}"
    name = type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    return f"expected {_describe(hint)}, got {article} {name}"


def _plural(description: str) -> str:
    """ "an integer" -> "integers": the description of one item made that of several."""
    for article in ("a ", "an "):
        if description.startswith(article):
            return description.removeprefix(article) + "s"
    return f"values that are {description}"


def _describe(hint: Any) -> str:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "nothing (None)"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in arguments)
    if origin is Literal:
        return "one of " + ", ".join(map(str, arguments))
    if origin is tuple:
        return (
            f"a list of {_plural(_describe(arguments[0]))}" if arguments[1:] == (Ellipsis,) else "a fixed-length list"
        )
    if origin is list:
        return f"a list of {_plural(_describe(arguments[0]))}"
    if origin is dict:
        return f"a table of {_describe(arguments[0])} to {_describe(arguments[1])}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def require(config: Any, prefix: str, name: str, ok: bool, allowed: str) -> None:
    """Raises :class:`OptionError` for field ``name`` of ``config`` unless ``ok``; ``allowed`` says
    what the option takes (e.g. "an integer >= 1")."""
    if not ok:
        raise OptionError(flag(prefix, name), getattr(config, name), f"expected {allowed}")


def require_ranges(config: Any, prefix: str, ranges: dict[str, tuple[float | None, float | None, bool]]) -> None:
    """:func:`require` for numeric fields: ``ranges`` maps a field to (lowest, highest, lowest
    excluded); None is unbounded. A field that is None (an optional option left unset) passes;
    every number of a tuple field is checked."""
    for name, (low, high, open_low) in ranges.items():
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else () if value is None else (value,)
        ok = all((low is None or (v > low if open_low else v >= low)) and (high is None or v <= high) for v in values)
        kind = "an integer" if all(isinstance(v, int) for v in values) else "a number"
        if low is not None and high is not None:
            allowed = f"{kind} in {'(' if open_low else '['}{low}, {high}]"
        elif low is not None:
            allowed = f"{kind} {'>' if open_low else '>='} {low}"
        else:
            allowed = f"{kind} <= {high}"
        require(config, prefix, name, ok, allowed + (" (each)" if isinstance(value, tuple) else ""))
