"""Typed options from plain mappings: the leaf every validated section is built with.

:func:`build_dataclass` turns a YAML/JSON mapping into a (frozen) dataclass, checking every key
against the dataclass's annotations and naming a bad one by its dotted path (``algo.p``);
:class:`ConfigError` is the one error bad input raises. Nothing here knows about experiments or
algorithms, so both :mod:`fedselect.config` and :mod:`fedselect.registry` build on
it without importing each other.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key is unknown, missing, mistyped or out of range."""


def check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _either(key: str, value: Any, errors: list[str]) -> str:
    """One message for a value that fits none of a union's types: what each would have needed."""
    head, tail = f"config key '{key}' must be ", f", got {value!r}"
    needs = [e[len(head):-len(tail)] for e in errors if e.startswith(head) and e.endswith(tail)]
    if len(needs) != len(errors):
        return f"config key '{key}': {value!r} matches no allowed type"
    return f"{head}{', or '.join(needs)}{tail}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"config key '{key}' must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else _either(key, value, errors))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, prefix=f"{key}.")
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") if item_tp is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}' has unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values``, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under "
            f"'{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(known))})"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}': {exc}") from exc


@dataclass(frozen=True)
class NoOptions:
    """An algorithm without options of its own."""


def resolved_dict(options: Any) -> dict[str, Any]:
    """Every field of an options dataclass, defaults filled in, as a plain (JSON-safe) dict."""
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
