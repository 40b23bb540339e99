"""Which MLflow runs an analysis reads: a study's run records (each names its MLflow run and
store) or any MLflow selection (experiment, tags, run ids), reduced by :mod:`fedselect.tracking.compare`."""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.paper import PaperSpec, add_paper_columns, read_study_paper
from fedselect.study import Study, load_study
from fedselect.tracking import default_tracking_uri, load_runs, read_run_record
from fedselect.tracking.compare import (
    CompareError,
    RunStats,
    collect_stats,
    group_stats,
    parse_tags,
    select_runs,
    table_rows,
)


@dataclass
class Selection:
    """The runs of an analysis, reduced: per-run stats, their variants and the table rows."""

    stats: list[RunStats]
    groups: dict[str, list[RunStats]]
    rows: list[dict[str, Any]]
    notes: list[str]
    study: Study | None
    paper: PaperSpec | None


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    """Arguments choosing the runs: run records (positional) or an MLflow selection."""
    parser.add_argument("records", nargs="*", type=Path,
                        help="run record JSON files (results/<study>/runs/*.json); each names its MLflow run")
    parser.add_argument("--study", type=Path, help="the study YAML: its runs' setting and its optional 'paper:' key")
    parser.add_argument("--tracking-uri", help="read every run from this MLflow store instead of the one its record "
                                               "names (default for --experiment/--tag/--run-id: "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")
    parser.add_argument("--experiment", help="without records: the runs of this MLflow experiment")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="without records: runs whose tag KEY equals VALUE; repeatable")
    parser.add_argument("--run-id", action="append", default=[], metavar="ID",
                        help="without records: this MLflow run; repeatable")
    parser.add_argument("--group-by", help="comma-separated tags or params defining a variant (default: the "
                                           "run_variant tag, else the run tag, else the algorithm)")


def runs_from_records(paths: Sequence[Path], tracking_uri: str | None = None) -> tuple[list[dict], dict[str, str]]:
    """The MLflow runs the records point at, and each run id's tracking URI."""
    if not paths:
        raise CompareError("no run records given")
    by_uri: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path in paths:
        record = read_run_record(path)
        by_uri[tracking_uri or record["tracking_uri"]].append((record["mlflow_run_id"], path))
    runs, uris = [], {}
    for uri, entries in by_uri.items():
        found = {r["run_id"]: r for r in load_runs(uri, run_ids=[run_id for run_id, _ in entries])}
        for run_id, path in entries:
            if run_id not in found:
                raise CompareError(f"run record {path}: MLflow run {run_id} is deleted in {uri}")
            runs.append(found[run_id])
            uris[run_id] = uri
    return runs, uris


def variant_options(groups: Mapping[str, Sequence[RunStats]]) -> dict[str, tuple[str, dict[str, str]]]:
    """Per variant: (algorithm, raw algo options its runs share), or ("mixed", {}) when they disagree.

    Options come from the runs' params only (see :mod:`analysis.paper`). An option recorded by
    some runs of the variant but not by others (runs logged before and after resolved options
    were recorded) is left out, i.e. unknown for the variant; two runs recording different
    values, or different algorithms, make the variant "mixed".
    """
    out = {}
    for name, members in groups.items():
        algorithms = {s.algorithm for s in members}
        values: dict[str, set[str]] = defaultdict(set)
        for s in members:
            for key, value in s.algo_options.items():
                values[key].add(value)
        if len(algorithms) > 1 or any(len(v) > 1 for v in values.values()):
            out[name] = ("mixed", {})
            continue
        shared = {key: next(iter(v)) for key, v in values.items() if all(key in s.algo_options for s in members)}
        out[name] = (members[0].algorithm, shared)
    return out


def load_selection(ns: argparse.Namespace) -> Selection:
    """Read and reduce the runs chosen by :func:`add_selection_args`' arguments."""
    group_by = [k.strip() for k in ns.group_by.split(",") if k.strip()] if ns.group_by else None
    if ns.records:
        if ns.experiment or ns.tag or ns.run_id:
            raise CompareError("give run records or --experiment/--tag/--run-id, not both")
        runs, uris = runs_from_records(ns.records, ns.tracking_uri)
        stats, notes = collect_stats(runs, uris, group_by)
    else:
        if not (ns.experiment or ns.tag or ns.run_id):
            raise CompareError("no runs chosen: give run record files or --experiment/--tag/--run-id")
        uri = ns.tracking_uri or default_tracking_uri("results")
        runs = select_runs(uri, experiment=ns.experiment, tags=parse_tags(ns.tag), run_ids=ns.run_id)
        stats, notes = collect_stats(runs, uri, group_by)
    groups = group_stats(stats)
    rows = table_rows(groups)
    study = paper = None
    if ns.study is not None:
        study = load_study(ns.study)
        paper = read_study_paper(study)
        if paper is not None:
            add_paper_columns(rows, paper, variant_options(groups))
    return Selection(stats=stats, groups=groups, rows=rows, notes=notes, study=study, paper=paper)
