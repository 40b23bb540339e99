"""Run records: one JSON file per training run and seed, naming its MLflow run and holding its results.

A run record is what a study's workflow waits for (its existence marks a finished run) and what
the analysis starts from (it names the MLflow run and store). It is written atomically
(:func:`fedselect.files.atomic_write_text`), so a reader never sees half a file. Records
written since resolved options are recorded also hold ``algo_options`` (every option of the
algorithm, defaults filled in); older records lack the key, and readers must not assume it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from fedselect.files import atomic_write_text
from fedselect.tracking.params import json_default

RUN_RECORD_KEYS: tuple[str, ...] = (
    "algorithm", "dataset", "seed", "rounds", "final_mean_acc", "best_mean_acc", "per_client_acc",
    "bytes_up", "bytes_down", "wall_seconds", "mlflow_run_id", "tracking_uri",
)
# every resolved option of the run's algorithm (not required: records from before it lack it)
ALGO_OPTIONS_KEY = "algo_options"


def _missing(record: Mapping) -> str:
    return ", ".join(key for key in RUN_RECORD_KEYS if key not in record)


def write_run_record(path: str | os.PathLike, record: Mapping) -> None:
    """Write a run record as JSON (indent 2, sorted keys) atomically: readers never see half a file."""
    missing = _missing(record)
    if missing:
        raise ValueError(f"run record for {path} lacks required key(s): {missing}")
    if not isinstance(record.get(ALGO_OPTIONS_KEY, {}), Mapping):
        raise ValueError(f"run record for {path}: {ALGO_OPTIONS_KEY!r} must be a mapping of option -> value")
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=json_default) + "\n")


def read_run_record(path: str | os.PathLike) -> dict:
    """Read a run record written by :func:`write_run_record`; errors name the file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"run record not found: {source}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"run record {source} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"run record {source} must hold a JSON object, found {type(record).__name__}")
    missing = _missing(record)
    if missing:
        raise ValueError(f"run record {source} lacks required key(s): {missing}")
    return record
