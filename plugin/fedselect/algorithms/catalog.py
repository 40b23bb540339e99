"""What each algorithm's options mean, read from its options dataclass (no torch, no FedML).

An option's meaning is the block of ``#`` comment lines directly above its field in the
dataclass's source; a field written on the line right below another field (no blank line, no
comment between) shares that field's comment (``budgets``, ``budget_min``, ``budget_max``).
Types and defaults come from the dataclass itself. ``fedselect algorithms [NAME]`` and the
option tables of docs/ALGORITHMS.md (:mod:`fedselect.algorithms.docs`) are made from these.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import shutil
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from fedselect.registry import AlgorithmInfo

__all__ = ["OptionDoc", "algorithm_record", "describe_options", "field_comments", "format_algorithm",
           "format_table", "type_text", "value_text"]


@dataclass(frozen=True)
class OptionDoc:
    """One option under ``algo:``: its name, type, default (``dataclasses.MISSING``: required) and meaning."""

    name: str
    type: str
    default: Any
    help: str

    @property
    def default_text(self) -> str:
        return "(required)" if self.default is dataclasses.MISSING else value_text(self.default)


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    """Comment above each annotated attribute of ``cls``, from its module's source ({} without source)."""
    module = sys.modules.get(cls.__module__)
    try:
        lines = inspect.getsource(module).splitlines() if module else []
    except (OSError, TypeError):
        return {}
    body = next((node.body for node in ast.parse("\n".join(lines)).body
                 if isinstance(node, ast.ClassDef) and node.name == cls.__name__), [])
    comments: dict[str, str] = {}
    previous: tuple[str, int] | None = None  # the last field and its last line
    for stmt in body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            previous = None
            continue
        block: list[str] = []
        row = stmt.lineno - 2  # the line above, 0-based
        while row >= 0 and lines[row].strip().startswith("#"):
            block.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if block:
            text = " ".join(part for part in block if part)
        elif previous is not None and previous[1] == stmt.lineno - 1:
            text = comments[previous[0]]
        else:
            text = ""
        comments[stmt.target.id] = text
        previous = (stmt.target.id, stmt.end_lineno or stmt.lineno)
    return comments


def field_comments(cls: type) -> dict[str, str]:
    """The meaning of each field of dataclass ``cls`` (a subclass's comment wins over its base's)."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            merged.update({k: v for k, v in _class_comments(klass).items() if v or k not in merged})
    return {f.name: merged.get(f.name, "") for f in dataclasses.fields(cls)}


def type_text(tp: Any) -> str:
    """An annotation as a config writer reads it: ``int | null``, ``eval | train``, ``list of str``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(value_text(arg) for arg in args)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_text(arg) for arg in args)
    if origin in (list, tuple) or tp in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def value_text(value: Any) -> str:
    """A default as it is written in YAML: ``null``, ``true``, ``0.5``, ``ilp``, ``[head]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe_options(cls: type) -> list[OptionDoc]:
    """Every option of dataclass ``cls`` that a config can set, in declaration order."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a plugin's annotation that does not resolve: show it as written
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    comments = field_comments(cls)
    return [OptionDoc(f.name, type_text(hints[f.name]), _default(f), comments[f.name])
            for f in dataclasses.fields(cls) if f.init]


def _json_value(value: Any) -> Any:
    if value is dataclasses.MISSING:
        return None
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def algorithm_record(info: AlgorithmInfo) -> dict[str, Any]:
    """JSON-safe description of one algorithm (``fedselect algorithms --json``)."""
    options = [{"name": o.name, "type": o.type, "default": _json_value(o.default),
                "required": o.default is dataclasses.MISSING, "help": o.help}
               for o in describe_options(info.options_cls)]
    return {"name": info.name, "summary": info.summary, "builtin": info.builtin, "module": info.module,
            "options_class": f"{info.options_cls.__module__}.{info.options_cls.__qualname__}",
            "options": options}


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))


def _fill(text: str, width: int, first: str, rest: str) -> str:
    return textwrap.fill(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def format_table(infos: list[AlgorithmInfo]) -> str:
    """Every algorithm with its summary, one wrapped row each."""
    column = max(len("ALGORITHM"), *(len(info.name) for info in infos)) + 2
    rows = [f"{'ALGORITHM':<{column}}SUMMARY"]
    for info in infos:
        text = _fill(info.summary or "(no summary)", _width(), " " * column, " " * column)
        rows.append(info.name.ljust(column) + text[column:])
    rows += ["", "fedselect algorithms NAME: the options of NAME (under `algo:` in a run config)."]
    return "\n".join(rows) + "\n"


def format_algorithm(info: AlgorithmInfo) -> str:
    """The summary of one algorithm, then each option with its type, default and meaning."""
    width = _width()
    cls = info.options_cls
    rows = [_fill(f"{info.name}: {info.summary or '(no summary)'}", width, "", "  "),
            f"implemented in {info.module}; options: {cls.__module__}.{cls.__qualname__}", ""]
    options = describe_options(cls)
    if not options:
        rows.append("no options: `algo:` stays empty.")
        return "\n".join(rows) + "\n"
    rows.append(f"options under `algo:` (e.g. --set algo.{options[0].name}=VALUE):")
    for option in options:
        rows.append(f"  {option.name}: {option.type} = {option.default_text}")
        rows.append(_fill(option.help or "(undocumented)", width, " " * 6, " " * 6))
    return "\n".join(rows) + "\n"
