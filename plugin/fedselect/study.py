"""Studies: a base experiment config, run variants and seeds, as read by the Snakemake workflow.

A study file (``configs/<name>.yaml``) is validated against ``workflows/schemas/study.schema.json``.
``base:`` is an experiment config (a mapping, or the path of a config file relative to the study
file); each entry of ``runs:`` is merged over it, and ``grid:``/``zip:`` axes, per entry or for
the whole study, expand entries into several runs (:mod:`fedselect.study_expand`). Runs may vary
any key but the seed, data included: runs with the same ``data`` section share one partition per
seed (:func:`data_key`), so every method of a data setting and seed sees the same clients. The
optional ``paired:`` key lists [A, B] pairs of runs whose seed-by-seed differences the summary
reports (``analysis/paired.py``); a pair of run stems is expanded over the study-wide axes.
Overrides for the whole study (``snakemake ... --config set=train.rounds=2``) apply to every run
last. :func:`validate_study` checks every run's config when the workflow's DAG is built.
Kept free of torch/fedml imports so the Snakefile parses fast.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedselect.study_expand import ExpandedRun, StudyExpandError, deep_merge, expand_runs, resolve_run_refs

__all__ = ["Study", "StudyError", "data_key", "deep_merge", "load_study", "run_config", "split_overrides",
           "validate_study", "write_run_config"]

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflows" / "schemas" / "study.schema.json"


class StudyError(ValueError):
    """A study file is missing or does not match the schema."""


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    seeds: list[int]
    base: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    path: Path
    paired: list[tuple[str, str]] = field(default_factory=list)  # [A, B] runs compared seed by seed
    expanded: dict[str, ExpandedRun] = field(default_factory=dict)
    paper: dict[str, Any] | None = None    # the ``paper:`` key, column templates resolved per run
    overrides: tuple[str, ...] = ()        # ``key=value`` for every run (the workflow's ``set``)

    def run_names(self) -> list[str]:
        return list(self.runs)

    def display(self, run: str) -> str:
        """The run's legend name (``FedSelect (p = 0.5)``); the run name for a run the study lacks."""
        expanded = self.expanded.get(run)
        return expanded.display if expanded is not None else run


def load_study(path: str | Path, schema_path: str | Path = SCHEMA_PATH, *, overrides: Sequence[str] = ()) -> Study:
    """Read, schema-validate and expand a study file; errors name the file and the failing key."""
    import jsonschema

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path} (studies live in configs/<name>.yaml)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    schema = json.loads(Path(schema_path).read_text(encoding="utf-8"))
    try:
        jsonschema.validate(raw, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "<top>"
        raise StudyError(f"{path}: key '{where}': {exc.message}") from None
    try:
        expanded = expand_runs(raw)
        paired = [tuple(pair) for i, (a, b) in enumerate(raw.get("paired", []))
                  for pair in resolve_run_refs([a, b], expanded, key=f"paired.{i}")]
        paper = resolve_paper(raw.get("paper"), expanded, _base(raw.get("base"), path))
    except StudyExpandError as exc:
        raise StudyError(f"{path}: {exc}") from None
    runs = {name: run.overrides for name, run in expanded.items()}
    return Study(name=raw["study"], description=raw.get("description", ""), seeds=list(raw["seeds"]),
                 base=_base(raw.get("base"), path), runs=runs, path=path,
                 paired=check_paired(paired, runs, path), expanded=expanded, paper=paper,
                 overrides=tuple(overrides))


def _base(base: Mapping[str, Any] | str | None, study_path: Path) -> dict[str, Any]:
    """``base:``: a mapping, or an experiment config file named relative to the study file."""
    if base is None or isinstance(base, Mapping):
        return dict(base or {})
    file = study_path.parent / base
    if not file.is_file():
        raise StudyError(f"{study_path}: key 'base': config file {file} not found (relative to the study file)")
    loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, Mapping):
        raise StudyError(f"{study_path}: key 'base': {file} is not a mapping of config keys")
    return dict(loaded)


def resolve_paper(raw: Mapping[str, Any] | None, runs: Mapping[str, ExpandedRun],
                  base: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``paper:`` key with a ``column`` template (``s{data.partition.classes_per_client}``) filled
    per run from its config, and ``paper.runs`` stems expanded over the study-wide axes."""
    if raw is None:
        return None
    paper = {k: v for k, v in raw.items() if k != "runs"}
    entries: dict[str, Any] = {}
    for ref, entry in (raw.get("runs") or {}).items():
        for (name,) in resolve_run_refs([ref], runs, key=f"paper.runs.{ref}"):
            entries[name] = entry
    column = raw.get("column")
    if isinstance(column, str) and "{" in column:
        del paper["column"]
        for name, run in runs.items():
            entry = entries.get(name, "")
            if entry is None or (isinstance(entry, Mapping) and "column" in entry):
                continue
            filled = _fill(column, deep_merge(base, run.overrides), key="paper.column")
            entries[name] = {**({"method": entry} if isinstance(entry, str) and entry else
                                dict(entry) if isinstance(entry, Mapping) else {}), "column": filled}
    if entries:
        paper["runs"] = entries
    return paper


def _fill(template: str, config: Mapping[str, Any], *, key: str) -> str:
    """``template`` with each ``{dotted.key}`` replaced by that key's value in ``config``."""
    def value(match: re.Match) -> str:
        node: Any = config
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise StudyExpandError(f"key '{key}': {{{match.group(1)}}} is not set in every run's config")
            node = node[part]
        return str(node)

    return re.sub(r"{([^{}]+)}", value, template)


def check_paired(pairs: Sequence[Sequence[str]], runs: Mapping[str, Any], path: Path) -> list[tuple[str, str]]:
    """The ``paired:`` key's [A, B] pairs: two different runs of the study each (shape checked by the schema)."""
    out = []
    for i, (a, b) in enumerate(pairs):
        unknown = [name for name in (a, b) if name not in runs]
        if unknown:
            raise StudyError(f"{path}: key 'paired.{i}': {unknown[0]!r} is not a run of the study "
                             f"(runs: {', '.join(runs)})")
        if a == b:
            raise StudyError(f"{path}: key 'paired.{i}': compares run {a!r} with itself; give two different runs")
        out.append((a, b))
    return out


def run_config(study: Study, run: str, seed: int, *, results_dir: str = "results") -> dict[str, Any]:
    """The experiment config mapping of one (run, seed) of the study, whole-study overrides applied last."""
    from fedselect.config import apply_overrides  # light (yaml and dataclasses); keeps import order simple

    if run not in study.runs:
        raise StudyError(f"study '{study.name}' has no run '{run}' (runs: {', '.join(study.runs)})")
    config = deep_merge(study.base, study.runs[run])
    try:
        config = apply_overrides(config, study.overrides)
    except ValueError as exc:
        raise StudyError(f"{study.path}: --config set: {exc}") from None
    config["seed"] = seed
    tracking = config.setdefault("tracking", {})
    tracking["experiment"] = study.name
    tracking.setdefault("results_dir", results_dir)
    tracking["run_name"] = f"{study.display(run)}, seed {seed}"
    tracking["tags"] = {**tracking.get("tags", {}), "study": study.name, "run": run, "display": study.display(run)}
    if study.description:
        tracking["description"] = study.description
    return config


def data_key(study: Study, run: str) -> str:
    """The run's data setting (its resolved ``data`` section) as a short stable key: runs that share
    it share the partition of each seed (``partitions/<key>/seed<N>.json``)."""
    data = run_config(study, run, study.seeds[0]).get("data", {})
    data = {k: v for k, v in data.items() if k != "partition_file"}
    return "data-" + hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def split_overrides(text: str) -> list[str]:
    """``"train.rounds=2,algo.p=0.5"`` as ``["train.rounds=2", "algo.p=0.5"]``: split at a comma that
    starts the next ``key=`` (so a value may hold commas: ``data.x=[1, 2]``)."""
    text = text.strip()
    return [part.strip() for part in re.split(r",\s*(?=[A-Za-z_][A-Za-z0-9_.]*=)", text)] if text else []


def validate_study(study: Study, *, results_dir: str = "results") -> None:
    """Every run's config through the typed experiment config (as ``fedselect check-config`` does), so a
    typo fails when the workflow's DAG is built, naming the run and the key."""
    from fedselect.config import ConfigError, load_config_dict

    for run in study.runs:
        try:
            load_config_dict(run_config(study, run, study.seeds[0], results_dir=results_dir))
        except ConfigError as exc:
            raise StudyError(f"{study.path}: run {run!r}: {exc}") from None


def write_run_config(study: Study, run: str, seed: int, out: str | Path, *, results_dir: str = "results",
                     log: str | Path | None = None) -> None:
    """Write one run's merged config YAML to ``out``; with ``log``, a line saying so there."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(yaml.safe_dump(run_config(study, run, seed, results_dir=results_dir), sort_keys=False))
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"wrote {out}: run {run!r}, seed {seed}, study {study.name!r}\n")
