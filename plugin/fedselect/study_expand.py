"""A study's runs from ``grid:`` and ``zip:`` axes: names, display names and config overrides.

An axis is a dotted config key (``algo.p``, ``data.partition.classes_per_client``) with its
values, either a list (each value names itself: a string by itself, a number or boolean by the
key's label and the value, ``p0.25``) or a mapping ``{name part: value}`` (``{b25: 0.25}``).
``grid:`` takes the cartesian product of its axes, ``zip:`` walks its (equal-length) axes
together. A run entry may carry its own ``grid:``/``zip:``; the study's top-level ``grid:``/
``zip:`` apply to every run. Run names are the entry's name (or its ``name:`` template, whose
``{dotted.key}`` fields take the axes' name parts) followed by the name parts of the remaining
axes, joined by ``_``. Kept free of torch/FedML imports: the Snakefile imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# what a run name may contain (the workflow's `run` wildcard)
RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# experiment-config sections an axis may vary: every key but the seed (the study's) and tracking (the workflow's)
AXIS_ROOTS = ("algorithm", "algo", "data", "model", "train", "device")
ENTRY_KEYS = ("grid", "zip", "name", "display")

# display names of the built-in algorithms (a plugin's algorithm shows under its registered name)
ALGORITHM_DISPLAY = {
    "fedavg": "FedAvg", "local": "Local", "fedper": "FedPer", "fedrep": "FedRep", "lg_fedavg": "LG-FedAvg",
    "fedbabu": "FedBABU", "fedalt": "FedAlt", "ditto": "Ditto", "lotteryfl": "LotteryFL",
    "fedselect": "FedSelect", "layersel": "Layer selection",
}
# layer selection's strategies, shown instead of "Layer selection"
STRATEGY_DISPLAY = {"ilp": "ILP", "top": "Top", "bottom": "Bottom", "both": "Both", "snr": "SNR", "rgn": "RGN",
                    "random": "Random", "full": "Full"}


class StudyExpandError(ValueError):
    """A ``grid:``/``zip:`` axis, a name template or an expanded run name is malformed."""


@dataclass(frozen=True)
class Axis:
    """One varied key: its dotted path, its values and the name part of each value."""

    key: str
    values: tuple[Any, ...]
    parts: tuple[str, ...]


@dataclass(frozen=True)
class ExpandedRun:
    """One run of a study after expansion: its overrides over ``base`` and how it was named."""

    name: str
    entry: str                          # the run entry of the study file it came from
    overrides: dict[str, Any]           # merged over the study's base
    settings: tuple[tuple[str, Any], ...] = ()   # (dotted key, value) of every axis, run's then study's
    stem: str = ""                      # the name before the study-wide axes' parts
    shared: tuple[tuple[str, Any], ...] = ()     # the study-wide axes' (dotted key, value)
    display: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return str(value)


def parse_axes(raw: Mapping[str, Any] | None, *, where: str, labels: Mapping[str, str]) -> list[Axis]:
    """The axes of one ``grid:`` or ``zip:`` mapping; errors name ``where`` and the key."""
    axes = []
    for key, spec in (raw or {}).items():
        root = str(key).split(".")[0]
        if root not in AXIS_ROOTS:
            raise StudyExpandError(f"key '{where}.{key}': an axis varies a config key under "
                                   f"{', '.join(AXIS_ROOTS)} (seeds are the study's, tracking the workflow's)")
        if isinstance(spec, Mapping):
            parts, values = tuple(str(p) for p in spec), tuple(spec.values())
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            label = labels.get(key, key.split(".")[-1])
            values = tuple(spec)
            parts = tuple(_format_value(v) if isinstance(v, str) else f"{label}{_format_value(v)}" for v in values)
        else:
            raise StudyExpandError(f"key '{where}.{key}': give a list of values or a mapping {{name part: value}}")
        if not values:
            raise StudyExpandError(f"key '{where}.{key}': no values")
        if len(set(parts)) != len(parts):
            raise StudyExpandError(f"key '{where}.{key}': two values give the same name part ({', '.join(parts)}); "
                                   f"name them with a mapping {{name part: value}}")
        axes.append(Axis(key, values, parts))
    return axes


def combinations(grid: list[Axis], zipped: list[Axis], *, where: str) -> list[list[tuple[Axis, int]]]:
    """Every (axis, value index) combination: the grid's product times the zip's positions."""
    lengths = {len(a.values) for a in zipped}
    if len(lengths) > 1:
        raise StudyExpandError(f"key '{where}.zip': its axes have different lengths "
                               f"({', '.join(f'{a.key}: {len(a.values)}' for a in zipped)})")
    zip_positions = [[(a, i) for a in zipped] for i in range(lengths.pop())] if zipped else [[]]
    grid_products = itertools.product(*[[(a, i) for i in range(len(a.values))] for a in grid])
    return [list(g) + z for g in grid_products for z in zip_positions]


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StudyExpandError(f"axis '{key}': '{part}' is set both as a value and as a section")
        node[leaf] = value
    return out


def _entry_name(entry_name: str, template: str | None, combo: list[tuple[Axis, int]], where: str) -> str:
    """The run name from the entry's axes: the ``name:`` template filled, else the entry name + parts."""
    parts = {axis.key: axis.parts[i] for axis, i in combo}
    if template is None:
        return "_".join([entry_name, *parts.values()])
    used = set(re.findall(r"{([^{}]+)}", template))
    unknown = sorted(used - set(parts))
    if unknown:
        raise StudyExpandError(f"key '{where}.name': {{{unknown[0]}}} is not an axis of this run "
                               f"(axes: {', '.join(parts) or 'none'})")
    name = re.sub(r"{([^{}]+)}", lambda m: parts[m.group(1)], template)
    return "_".join([name, *(p for k, p in parts.items() if k not in used)])


def display_name(overrides: Mapping[str, Any], settings: Sequence[tuple[str, Any]],
                 labels: Mapping[str, str]) -> str:
    """A legend-ready name: the method, then the varied keys (``FedSelect (p = 0.5, s = 2)``); a run
    without axes shows its own ``algo`` options instead. Layer selection shows its strategy."""
    algorithm = overrides.get("algorithm")
    algo = overrides.get("algo") or {}
    method = ALGORITHM_DISPLAY.get(algorithm or "", algorithm or "?")
    if algorithm == "layersel" and "strategy" in algo:
        method = STRATEGY_DISPLAY.get(str(algo["strategy"]), str(algo["strategy"]))
    shown = list(settings) or [(f"algo.{k}", v) for k, v in algo.items() if not isinstance(v, Mapping)]
    shown = [(k, v) for k, v in shown if k not in ("algorithm", "algo.strategy")]
    if not shown:
        return method
    return method + " (" + ", ".join(f"{labels.get(k, k.split('.')[-1])} = {_format_value(v)}"
                                     for k, v in shown) + ")"


def _fill_display(template: str, method: str, settings: Sequence[tuple[str, Any]]) -> str:
    """A ``display:`` template: ``{method}`` and the run's axis values by dotted key."""
    values = {"method": method, **{k: _format_value(v) for k, v in settings}}
    return re.sub(r"{([^{}]+)}", lambda m: values.get(m.group(1), m.group(0)), template)


def expand_entry(entry_name: str, entry: Mapping[str, Any], shared_combo: list[tuple[Axis, int]],
                 labels: Mapping[str, str]) -> list[ExpandedRun]:
    """The runs of one ``runs:`` entry at one combination of the study's axes: one per combination
    of its own axes."""
    where = f"runs.{entry_name}"
    own = combinations(parse_axes(entry.get("grid"), where=f"{where}.grid", labels=labels),
                       parse_axes(entry.get("zip"), where=f"{where}.zip", labels=labels), where=where)
    fixed = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    runs = []
    for own_combo in own:
        stem = _entry_name(entry_name, entry.get("name"), own_combo, where)
        settings = tuple((axis.key, axis.values[i]) for axis, i in own_combo + shared_combo)
        overrides = deep_merge(fixed, nested(dict(settings)))
        name = "_".join([stem, *(axis.parts[i] for axis, i in shared_combo)])
        if not RUN_NAME.match(name):
            raise StudyExpandError(f"key '{where}': run name {name!r} may only contain letters, digits, "
                                   f"'_', '.' and '-' (name the values with a mapping {{name part: value}})")
        if "algorithm" not in overrides:
            raise StudyExpandError(f"key '{where}': run {name!r} has no 'algorithm' (set it in the entry "
                                   f"or as an axis)")
        display = display_name(overrides, settings, labels)
        if entry.get("display"):
            display = _fill_display(entry["display"], display.split(" (")[0], settings)
        shared_settings = tuple((axis.key, axis.values[i]) for axis, i in shared_combo)
        runs.append(ExpandedRun(name=name, entry=entry_name, overrides=overrides, settings=settings,
                                stem=stem, shared=shared_settings, display=display, labels=dict(labels)))
    return runs


def expand_runs(raw: Mapping[str, Any]) -> dict[str, ExpandedRun]:
    """Every run of a (schema-valid) study mapping, by name, grouped by the study-wide axes' values
    (all runs at s = 2, then all at s = 4); names must come out unique."""
    labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
    shared = combinations(parse_axes(raw.get("grid"), where="grid", labels=labels),
                          parse_axes(raw.get("zip"), where="zip", labels=labels), where="<top>")
    runs: dict[str, ExpandedRun] = {}
    for shared_combo in shared:
        for entry_name, entry in raw["runs"].items():
            for run in expand_entry(str(entry_name), entry, shared_combo, labels):
                if run.name in runs:
                    raise StudyExpandError(f"key 'runs.{entry_name}': run name {run.name!r} is also made by "
                                           f"entry '{runs[run.name].entry}'; rename one")
                runs[run.name] = run
    _unique_displays(runs)
    return runs


def _unique_displays(runs: dict[str, ExpandedRun]) -> None:
    """Two runs showing the same display name: both show their run name instead (legends stay unambiguous)."""
    seen: dict[str, list[str]] = {}
    for run in runs.values():
        seen.setdefault(run.display, []).append(run.name)
    for names in seen.values():
        if len(names) > 1:
            for name in names:
                runs[name] = dataclasses.replace(runs[name], display=f"{runs[name].display} [{name}]")


def resolve_run_refs(refs: Sequence[str], runs: Mapping[str, ExpandedRun], *, key: str) -> list[list[str]]:
    """Run references of ``paired:``/``paper.runs``: a run name, or a stem that the study-wide axes
    expand (``[fedselect_p0.5, fedrep]`` is one pair per ``s``). Returns one list per expansion."""
    def matches(ref: str) -> dict[tuple, str]:
        if ref in runs:
            return {(): ref}
        found = {_hashable(r.shared): r.name for r in runs.values() if r.stem == ref}
        if not found:
            raise StudyExpandError(f"key '{key}': {ref!r} is not a run of the study (runs: {', '.join(runs)})")
        return found

    per_ref = [matches(ref) for ref in refs]
    suffixes = [s for s in per_ref if () not in s]
    if not suffixes:
        return [[m[()] for m in per_ref]]
    keys = list(suffixes[0])
    return [[m.get((), m.get(k)) for m in per_ref] for k in keys if all(() in m or k in m for m in per_ref)]


def _hashable(settings: tuple[tuple[str, Any], ...]) -> tuple:
    """Settings as a dict key (values may be lists or mappings)."""
    return tuple((k, repr(v)) for k, v in settings)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
