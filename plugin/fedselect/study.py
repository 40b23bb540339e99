"""Studies: a base experiment config, run variants and seeds, as read by the Snakemake workflow.

A study file (``configs/<name>.yaml``) is validated against ``workflows/schemas/study.schema.json``.
Runs may change the algorithm, its options, the model and the training schedule, but never
the data section: every method of a study and seed sees the same partition. The optional
``paired:`` key lists [A, B] pairs of runs whose seed-by-seed differences the summary reports
(``analysis/paired.py``).
Kept free of torch/fedml imports so the Snakefile parses fast.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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

    def run_names(self) -> list[str]:
        return list(self.runs)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_study(path: str | Path, schema_path: str | Path = SCHEMA_PATH) -> Study:
    """Read and schema-validate a study file; errors name the file and the failing key."""
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
    return Study(name=raw["study"], description=raw.get("description", ""), seeds=list(raw["seeds"]),
                 base=raw.get("base", {}), runs=raw["runs"], path=path,
                 paired=check_paired(raw.get("paired", []), raw["runs"], path))


def check_paired(pairs: list[list[str]], runs: Mapping[str, Any], path: Path) -> list[tuple[str, str]]:
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
    """The experiment config mapping of one (run, seed) of the study."""
    if run not in study.runs:
        raise StudyError(f"study '{study.name}' has no run '{run}' (runs: {', '.join(study.runs)})")
    config = deep_merge(study.base, study.runs[run])
    config["seed"] = seed
    tracking = config.setdefault("tracking", {})
    tracking.setdefault("experiment", study.name)
    tracking.setdefault("results_dir", results_dir)
    tracking.setdefault("run_name", f"{run}-seed{seed}")
    tracking["tags"] = {**tracking.get("tags", {}), "study": study.name, "run": run}
    return config


def write_run_config(study: Study, run: str, seed: int, out: str | Path, *, results_dir: str = "results",
                     log: str | Path | None = None) -> None:
    """Write one run's merged config YAML to ``out``; with ``log``, a line saying so there."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(yaml.safe_dump(run_config(study, run, seed, results_dir=results_dir), sort_keys=False))
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"wrote {out}: run {run!r}, seed {seed}, study {study.name!r}\n")
