"""Values for MLflow: a nested config flattened to params, long values cut with a marker, JSON for numpy.

Imports no MLflow (and nothing else slow): flattening a config stays fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

Scalar = str | int | float | bool


def flatten(d: Mapping, prefix: str = "", sep: str = ".") -> dict[str, Scalar]:
    """Nested mappings -> ``{"a.b.c": value}``.

    Scalars (str/int/float/bool) are kept, lists and tuples become JSON strings, None becomes
    ``"None"``, an empty mapping ``"{}"`` (so the key is not silently dropped) and anything
    else ``str(value)``. Two paths that flatten to the same key raise ValueError.
    """
    out: dict[str, Scalar] = {}
    _flatten_into(out, d, prefix, sep)
    return out


def _flatten_into(out: dict[str, Scalar], d: Mapping, prefix: str, sep: str) -> None:
    for raw_key, value in d.items():
        key = f"{prefix}{sep}{raw_key}" if prefix else str(raw_key)
        if isinstance(value, Mapping) and value:
            _flatten_into(out, value, key, sep)
            continue
        if key in out:
            raise ValueError(f"flatten: key {key!r} occurs twice (a dotted key collides with a nested one)")
        out[key] = _flat_value(value)


def _flat_value(value: Any) -> Scalar:
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return json.dumps(value, default=json_default)
    return str(value)


def truncate(value: str, limit: int) -> str:
    """``value`` if it fits in ``limit`` characters, else cut with a marker counting what was cut."""
    if len(value) <= limit:
        return value
    # a marker counting all chars is at least as long as the real one, so the result fits
    keep = limit - len(f"...[truncated {len(value)} chars]")
    return value[:keep] + f"...[truncated {len(value) - keep} chars]"


def json_default(obj: Any) -> Any:
    """JSON for what ``json`` refuses: numpy scalars/arrays, paths, sets."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
