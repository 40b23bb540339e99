"""MLflow runs grouped into run variants and reduced to table rows: ``fedselect compare``.

Everything is read from MLflow (the run's tags, params and metrics; metric histories where a
latest value is not enough), so any set of runs can be tabulated: a study's (through its run
records), an experiment, runs carrying given tags, or a list of run ids.

Per variant (group of runs, one per seed): final-round and best-round mean client accuracy as
mean +- std over seeds (population std, ddof = 0), the spread over clients (std over clients of
the final accuracy, averaged over seeds), bytes up/down per client per round (total bytes /
(clients x rounds)), wall time, and, where runs log it, backward compute per client per round
(the mean over rounds of ``compute_backward_mean``, estimated backward GFLOPs), and local work
in training sample passes: per sampled client per round (mean over rounds of
``train_sample_passes_mean``) and, for methods that adapt the model before evaluating it,
per client per evaluation (mean over evaluated rounds of ``eval_sample_passes_mean``).

The Markdown and CSV text of the rows: :mod:`fedselect.tracking.tables`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedselect.tracking import metric_names as names
from fedselect.tracking.queries import load_runs, metric_history
from fedselect.tracking.tables import csv_text, markdown_table

log = logging.getLogger(__name__)

# tags naming a run's variant, tried in order (study.py tags every study run with `run`)
VARIANT_TAGS: tuple[str, ...] = ("run_variant", "run")
COMPUTE_METRIC = "compute_backward_mean"
# training sample passes (one forward + backward of one sample) per sampled client in a round,
# search and scoring included; and per client spent adapting before an evaluation (FedBABU)
TRAIN_PASSES_METRIC = "train_sample_passes_mean"
EVAL_PASSES_METRIC = "eval_sample_passes_mean"
# "the last few evaluated rounds": one round's mean accuracy is noisy (a round whose aggregation
# happened to hurt, or to help), so tables also average the last LAST_EVALS evaluations
LAST_EVALS = 3
# each client's accuracy at an evaluated round; the latest value is the final evaluation's


class CompareError(ValueError):
    """No runs match, a run lacks what a table needs, or a selection is malformed."""


@dataclass
class RunStats:
    """One MLflow run reduced to the figures of the tables."""

    run_id: str
    run_name: str
    group: str
    algorithm: str
    seed: str
    status: str
    final_acc: float
    best_acc: float
    client_spread: float
    bytes_up_per_client_round: float
    bytes_down_per_client_round: float
    wall_seconds: float
    compute_backward: float | None
    tracking_uri: str
    start_time: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    train_passes: float | None = None  # mean over rounds of train_sample_passes_mean; None: not logged
    eval_passes: float | None = None  # mean over evaluated rounds of eval_sample_passes_mean; None: not logged
    client_acc: dict[int, float] = field(default_factory=dict)  # client id -> final accuracy (acc_client_<id>)
    last_acc: float | None = None  # mean of acc/mean over the last LAST_EVALS evaluated rounds (fewer if fewer)
    last_evals: int = 0  # how many evaluations last_acc averages

    @property
    def algo_options(self) -> dict[str, str]:
        """The run's raw ``algo.*`` params, as logged (strings).

        Runs logged since resolved options are recorded hold every option of their algorithm,
        defaults filled in; older runs hold only the options their config set, so an option
        missing here is not recorded (unknown), not "the default".
        """
        return {k[len("algo."):]: v for k, v in self.params.items() if k.startswith("algo.")}


# ---------------------------------------------------------------------------------- selection


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}``; a malformed item is an error naming it."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CompareError(f"--tag {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def select_runs(tracking_uri: str, *, experiment: str | None = None, tags: Mapping[str, str] | None = None,
                run_ids: Sequence[str] | None = None, statuses: Sequence[str] | None = ("FINISHED",)) -> list[dict]:
    """Runs of the store matching every given filter (see :func:`fedselect.tracking.queries.load_runs`).

    Only runs whose status is in ``statuses`` are kept (None: all); the others are logged. No
    match at all is a :class:`CompareError` that says what was asked for.
    """
    from mlflow.exceptions import MlflowException

    try:
        runs = load_runs(tracking_uri, experiment=experiment, run_ids=list(run_ids) if run_ids else None,
                         tags=dict(tags or {}))
    except MlflowException as exc:
        raise CompareError(f"{tracking_uri}: {exc.message}") from None
    if statuses is not None:
        skipped = [r for r in runs if r["status"] not in statuses]
        for run in skipped:
            log.warning("skipping run %s (%s): status %s", run["run_id"], run["run_name"], run["status"])
        runs = [r for r in runs if r["status"] in statuses]
    if not runs:
        asked = ", ".join(f"{k}={v}" for k, v in (("experiment", experiment), ("tags", dict(tags or {}) or None),
                                                   ("run ids", list(run_ids or []) or None)) if v) or "all runs"
        status = f" with status {'/'.join(statuses)}" if statuses is not None else ""
        raise CompareError(f"no MLflow runs{status} match {asked} in {tracking_uri}")
    return runs


# ---------------------------------------------------------------------------------- reduction


def group_label(run: Mapping[str, Any], group_by: Sequence[str] | None, *, with_study: bool = False) -> str:
    """The variant a run belongs to.

    ``group_by`` None: the first of the tags ``run_variant``, ``run``, else the algorithm
    (prefixed with the ``study`` tag or the experiment id when ``with_study``). Otherwise each
    key is looked up in the tags, then the params (``-`` where a run has neither: grouping by
    ``algo.p`` leaves FedAvg's runs together), and the values are joined with ``/``.
    """
    tags, params = run["tags"], run["params"]
    if group_by:
        return "/".join(tags.get(key, params.get(key, "-")) for key in group_by)
    variant = next((tags[t] for t in VARIANT_TAGS if t in tags), None) or _algorithm(run)
    if with_study:
        return f"{tags.get('study', run['experiment_id'])}/{variant}"
    return variant


def _algorithm(run: Mapping[str, Any]) -> str:
    algorithm = run["tags"].get("algorithm") or run["params"].get("algorithm")
    if not algorithm:
        raise CompareError(f"run {run['run_id']} ({run['run_name']}) has no 'algorithm' tag or param: not a "
                           "fedselect training run")
    return algorithm


def _int_param(run: Mapping[str, Any], key: str) -> int:
    try:
        return int(run["params"][key])
    except KeyError:
        raise CompareError(f"run {run['run_id']} ({run['run_name']}) has no param {key!r}") from None
    except ValueError:
        raise CompareError(f"run {run['run_id']} ({run['run_name']}): param {key!r} = "
                           f"{run['params'][key]!r} is not an integer") from None


def run_stats(run: Mapping[str, Any], tracking_uri: str, group: str) -> RunStats:
    """Reduce one run (a :func:`load_runs` dict); metric histories are read only where needed."""
    metrics = run["metrics"]
    name = f"run {run['run_id']} ({run['run_name']})"
    mean_acc = names.lookup(metrics, names.MEAN_ACC)
    if mean_acc is None:
        raise CompareError(f"{name} logged no {names.MEAN_ACC!r}: no evaluation was run or it is not a training run")
    for key in (names.STD_ACC, "bytes_up", "bytes_down"):
        if names.lookup(metrics, key) is None:
            raise CompareError(f"{name} logged no {key!r}: not a fedselect training run")
    final = names.lookup(metrics, names.FINAL_MEAN_ACC)
    final = mean_acc if final is None else final
    # the evaluated rounds' mean accuracies, in round order: read once, for the last-evaluations mean and
    # for an unfinished run's best round so far
    history = [v for _, v in sorted(mean_acc_history(tracking_uri, run["run_id"]))]
    best = names.lookup(metrics, names.BEST_MEAN_ACC)
    if best is None:  # an unfinished run: the best evaluated round so far
        best = max(history)
    clients = _int_param(run, "data.partition.num_clients")
    rounds = _int_param(run, "train.rounds")
    per_client_round = 1.0 / (clients * rounds)
    wall = metrics.get("wall_seconds")
    if wall is None:
        wall = ((run["end_time"] or run["start_time"]) - run["start_time"]) / 1000.0
    client_acc = {c: float(v) for k, v in metrics.items() if (c := names.client_of(k)) is not None}
    last = history[-LAST_EVALS:] or [mean_acc]
    return RunStats(
        run_id=run["run_id"], run_name=run["run_name"], group=group, algorithm=_algorithm(run),
        seed=run["tags"].get("seed", run["params"].get("seed", "?")), status=run["status"],
        final_acc=float(final), best_acc=float(best), client_spread=float(names.lookup(metrics, names.STD_ACC)),
        bytes_up_per_client_round=metrics["bytes_up"] * per_client_round,
        bytes_down_per_client_round=metrics["bytes_down"] * per_client_round,
        wall_seconds=float(wall), compute_backward=_history_mean(run, tracking_uri, COMPUTE_METRIC),
        tracking_uri=tracking_uri, start_time=run["start_time"] or 0, tags=dict(run["tags"]),
        params=dict(run["params"]), train_passes=_history_mean(run, tracking_uri, TRAIN_PASSES_METRIC),
        eval_passes=_history_mean(run, tracking_uri, EVAL_PASSES_METRIC), client_acc=dict(sorted(client_acc.items())),
        last_acc=float(np.mean(last)), last_evals=len(last))


def _history_mean(run: Mapping[str, Any], tracking_uri: str, key: str) -> float | None:
    """The mean over the run's logged steps of metric ``key``; None when the run never logged it."""
    if key not in run["metrics"]:
        return None
    return float(np.mean([v for _, v in metric_history(tracking_uri, run["run_id"], key)]))


def collect_stats(runs: Sequence[Mapping[str, Any]], tracking_uri: str | Mapping[str, str],
                  group_by: Sequence[str] | None = None) -> tuple[list[RunStats], list[str]]:
    """Reduce runs and drop repeats, keeping the latest started run of each.

    A repeat is a run of the same experiment with exactly the same params (the same config,
    seed included): a re-run of a study job would otherwise count twice in its variant.
    ``tracking_uri``: one URI for all runs, or a mapping run id -> URI. Returns the stats and
    one note per dropped repeat.
    """
    for key in group_by or ():
        # a key no run has is a typo, not a grouping
        if not any(key in r["tags"] or key in r["params"] for r in runs):
            raise CompareError(f"--group-by {key!r}: none of the {len(runs)} runs has a tag or param {key!r}")
    with_study = group_by is None and len({r["experiment_id"] for r in runs}) > 1
    stats = []
    for run in runs:
        uri = tracking_uri if isinstance(tracking_uri, str) else tracking_uri[run["run_id"]]
        stats.append(run_stats(run, uri, group_label(run, group_by, with_study=with_study)))
    experiment_of = {r["run_id"]: r["experiment_id"] for r in runs}
    latest: dict[tuple, RunStats] = {}
    notes = []
    for s in sorted(stats, key=lambda s: (s.start_time, s.run_id)):
        key = (experiment_of[s.run_id], tuple(sorted(s.params.items())))
        if key in latest:
            notes.append(f"{s.group} seed {s.seed}: runs {latest[key].run_id} and {s.run_id} have the same config; "
                         f"kept the later, {s.run_id}")
        latest[key] = s
    kept = set(id(s) for s in latest.values())
    return [s for s in stats if id(s) in kept], notes


def group_stats(stats: Sequence[RunStats]) -> dict[str, list[RunStats]]:
    groups: dict[str, list[RunStats]] = defaultdict(list)
    for s in stats:
        groups[s.group].append(s)
    return dict(groups)


def table_rows(groups: Mapping[str, Sequence[RunStats]]) -> list[dict[str, Any]]:
    """One row per variant: means and population stds over its runs (seeds); best final first."""
    rows = []
    for name, members in groups.items():
        final = np.array([s.final_acc for s in members])
        best = np.array([s.best_acc for s in members])
        rows.append({
            "run": name,
            "algorithm": "+".join(sorted({s.algorithm for s in members})),
            "seeds": len(members),
            "final_acc_mean": float(final.mean()),
            "final_acc_std": float(final.std()),
            "best_acc_mean": float(best.mean()),
            "best_acc_std": float(best.std()),
            **_last_acc(members),
            "client_spread": float(np.mean([s.client_spread for s in members])),
            "bytes_up_per_client_round": float(np.mean([s.bytes_up_per_client_round for s in members])),
            "bytes_down_per_client_round": float(np.mean([s.bytes_down_per_client_round for s in members])),
            "wall_seconds": float(np.mean([s.wall_seconds for s in members])),
            "compute_backward_per_client_round": _variant_mean(name, members, "compute_backward", COMPUTE_METRIC),
            "train_passes_per_client_round": _variant_mean(name, members, "train_passes", TRAIN_PASSES_METRIC),
            "eval_passes_per_client_eval": _variant_mean(name, members, "eval_passes", EVAL_PASSES_METRIC),
        })
    return sorted(rows, key=lambda row: (-row["final_acc_mean"], row["run"]))


def _last_acc(members: Sequence[RunStats]) -> dict[str, Any]:
    """Mean and std over seeds of the last-evaluations mean; empty when a run lacks it (built by hand)."""
    values = np.array([s.last_acc for s in members if s.last_acc is not None])
    if len(values) != len(members):
        return {}
    return {"last_acc_mean": float(values.mean()), "last_acc_std": float(values.std()),
            "last_evals": min(s.last_evals for s in members)}


def _variant_mean(name: str, members: Sequence[RunStats], attr: str, metric: str) -> float | None:
    """Mean over a variant's runs of an optional figure: all runs log its metric, or none does."""
    values = [getattr(s, attr) for s in members if getattr(s, attr) is not None]
    if values and len(values) != len(members):
        raise CompareError(f"variant {name}: only {len(values)} of {len(members)} runs log {metric}")
    return float(np.mean(values)) if values else None



def compare(tracking_uri: str, *, experiment: str | None = None, tags: Mapping[str, str] | None = None,
            run_ids: Sequence[str] | None = None, group_by: Sequence[str] | None = None,
            fmt: str = "markdown", title: str | None = None, any_status: bool = False) -> str:
    """The table text for the selected runs (what ``fedselect compare`` prints)."""
    runs = select_runs(tracking_uri, experiment=experiment, tags=tags, run_ids=run_ids,
                       statuses=None if any_status else ("FINISHED",))
    stats, notes = collect_stats(runs, tracking_uri, group_by)
    rows = table_rows(group_stats(stats))
    if fmt == "csv":
        return csv_text(rows)
    return markdown_table(rows, title=title, notes=notes)


def mean_acc_history(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    """The run's mean accuracy per evaluated round (``acc/mean``, or ``mean_acc`` in a store written
    before the rename)."""
    return (metric_history(tracking_uri, run_id, names.MEAN_ACC)
            or metric_history(tracking_uri, run_id, names.LEGACY[names.MEAN_ACC]))
