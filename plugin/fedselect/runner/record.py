"""The record of one run, the same for every runtime: its MLflow run, its rounds, its run record.

:class:`RunRecorder` opens the MLflow run (tags; params: the config with every resolved option of
the algorithm, defaults filled in, under ``algo.*``), turns each round into metrics
(:class:`RoundLogger`), and at the end writes the run record: the fields every runtime shares,
the runtime's own (``extra``), the algorithm's (its :class:`~fedselect.algorithms.base.RunArtifacts`)
and the totals of the metrics the algorithm declares (``totaled_metrics``).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedselect import __version__
from fedselect.algorithms.context import Checkpointable, RunArtifacts
from fedselect.config import ExperimentConfig, dump_config
from fedselect.fedml_runtime.simulation import RoundResult
from fedselect.options import resolved_dict
from fedselect.tracking import RunTracker, prepare_store, write_run_record
from fedselect.tracking import metric_names as names


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class RoundLogger(Checkpointable):
    """Turns each RoundResult into MLflow metrics and keeps the running totals for the record.

    ``defer``: hold each round's metrics until :meth:`flush` (the run's checkpoints flush right
    after each save, so MLflow never holds a round that a restart would run again; see
    fedselect.runner.checkpoint).
    """

    # the record is built from these; `pending` are rounds not yet confirmed logged
    checkpoint_attributes = ("bytes_up", "bytes_down", "best_mean_acc", "best_round", "last_eval", "history",
                             "client_sums", "pending")

    tracker: RunTracker
    num_clients: int
    defer: bool = False
    # client metrics whose sums over clients and rounds go into the record (``<name>_total``)
    totaled: Sequence[str] = ("train_sample_passes",)
    bytes_up: int = 0
    bytes_down: int = 0
    best_mean_acc: float = float("-inf")
    best_round: int = -1
    last_eval: RoundResult | None = None

    def __post_init__(self) -> None:
        self.history: list[dict[str, float]] = []
        # each client metric summed over clients and rounds (layer selection's compute)
        self.client_sums: dict[str, float] = {}
        # (round, timestamp ms, metrics) not yet logged; the timestamp makes a repeated log a no-op
        self.pending: list[tuple[int, int, dict[str, float]]] = []

    def __call__(self, result: RoundResult) -> None:
        self.bytes_up += result.bytes_up
        self.bytes_down += result.bytes_down
        metrics: dict[str, float] = {
            "train_loss": result.train_loss,
            "bytes_up": float(self.bytes_up),
            "bytes_down": float(self.bytes_down),
            "bytes_up_round": float(result.bytes_up),
            "bytes_down_round": float(result.bytes_down),
            "clients_sampled": float(len(result.sampled)),
            "updates_dropped": float(len(result.dropped)),
        }
        keys = sorted({k for m in result.client_metrics.values() for k in m})
        for key in keys:
            values = {c: m[key] for c, m in result.client_metrics.items() if key in m}
            metrics[f"{key}_mean"] = float(np.mean(list(values.values())))
            metrics.update({f"{key}_client_{c}": v for c, v in values.items()})
            self.client_sums[key] = self.client_sums.get(key, 0.0) + float(sum(values.values()))
        metrics.update(result.server_metrics)
        if result.evaluation is not None:
            accs = result.client_accuracies
            evals = [result.evaluation[c] for c in sorted(result.evaluation)]
            metrics.update({
                names.MEAN_ACC: float(np.mean(accs)),
                names.STD_ACC: float(np.std(accs)),
                names.MIN_ACC: float(np.min(accs)),
                names.MAX_ACC: float(np.max(accs)),
                names.POOLED_ACC: sum(e.correct for e in evals) / max(1, sum(e.total for e in evals)),
                "test_loss": sum(e.loss_sum for e in evals) / max(1, sum(e.total for e in evals)),
            })
            metrics.update({names.client_acc(c, self.num_clients): result.evaluation[c].accuracy
                            for c in sorted(result.evaluation)})
            adapt = [e.adapt_sample_passes for e in evals]
            if any(adapt):
                # work spent adapting the model just before evaluation (FedBABU's fine-tuning)
                metrics["eval_sample_passes_mean"] = float(np.mean(adapt))
            if metrics[names.MEAN_ACC] > self.best_mean_acc:
                self.best_mean_acc, self.best_round = metrics[names.MEAN_ACC], result.round_idx
            self.last_eval = result
        self.history.append({"round": result.round_idx, **metrics})
        self.pending.append((result.round_idx, int(time.time() * 1000), metrics))
        if not self.defer:
            self.flush()

    def work_totals(self) -> dict[str, float]:
        """The run record's totals over all clients and rounds of the metrics the algorithm declares:
        training sample passes always (docs/ALGORITHMS.md, "Local work"), estimated backward GFLOPs
        where the algorithm counts them (layer selection)."""
        return {f"{name}_total": self.client_sums.get(name, 0.0) for name in self.totaled}

    def flush(self) -> None:
        """Log the held rounds' metrics to MLflow."""
        for step, timestamp, metrics in self.pending:
            self.tracker.log_metrics(metrics, step=step, timestamp=timestamp)
        self.pending = []


def per_client_csv(result: RoundResult, clients: Mapping[int, Any] | Sequence[Any]) -> str:
    """Each evaluated client's sizes, correct count, accuracy and loss (``clients[cid]`` has
    ``num_train`` and ``num_test``)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["client", "num_train", "num_test", "correct", "accuracy", "test_loss"])
    for cid in sorted(result.evaluation or {}):
        e = result.evaluation[cid]
        writer.writerow([cid, clients[cid].num_train, clients[cid].num_test, e.correct, f"{e.accuracy:.6f}",
                         f"{e.mean_loss:.6f}"])
    return buf.getvalue()


def run_params(config: ExperimentConfig, options: Any, *, deployed: bool = False) -> dict[str, Any]:
    """What a run logs as MLflow params: its config, with ``algo`` holding every resolved option.

    Unset keys (None) outside ``algo``, an empty ``algo`` and, for a simulated run, the ``deploy``
    section (unused by ``run``) are left out, so the run page and the compare view show what shaped
    the run; the whole config, unset keys included, is the run's ``config.yaml`` artifact.
    """
    params = _without_none(config.to_dict())
    # every resolved option, unset ones too: the record of what the algorithm ran with; an algorithm
    # without options logs none (an `algo={}` param would be the compare view's first axis)
    params.pop("algo", None)
    if resolved_dict(options):
        params["algo"] = resolved_dict(options)
    params.get("tracking", {}).pop("description", None)  # the experiment's description, not the run's
    if not deployed:
        params.pop("deploy", None)
    return params


def _without_none(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None}


@dataclass
class RunRecorder:
    """One run's MLflow run, round log and run record (use as a context manager)."""

    config: ExperimentConfig
    options: Any
    run_name: str
    tags: dict[str, str]
    tracking_uri: str
    num_clients: int
    totaled: Sequence[str] = ("train_sample_passes",)
    run_id: str | None = None  # continue this MLflow run (a resumed run)
    defer: bool = False  # hold round metrics until flushed (checkpointed runs)
    deployed: bool = False  # a cross-silo run (its deploy section is logged too)
    tracker: RunTracker = field(init=False)
    logger: RoundLogger = field(init=False)

    def __enter__(self) -> RunRecorder:
        results_dir = Path(self.config.tracking.results_dir)
        prepare_store(self.tracking_uri)
        self.tracker = RunTracker(tracking_uri=self.tracking_uri, experiment=self.config.tracking.experiment,
                                  run_name=self.run_name, tags=self.tags, artifact_root=results_dir / "mlartifacts",
                                  run_id=self.run_id, description=self.config.tracking.description).__enter__()
        self.logger = RoundLogger(self.tracker, self.num_clients, defer=self.defer, totaled=self.totaled)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracker.__exit__(*exc)

    @property
    def plots_dir(self) -> Path:
        """Where this run's figures and algorithm artifacts are written."""
        return Path(self.config.tracking.results_dir) / "plots" / self.config.tracking.experiment / self.run_name

    def log_start(self, files: Mapping[str, Any]) -> None:
        """Params (resolved options included), the config as YAML and the given JSON files."""
        self.tracker.log_params(run_params(self.config, self.options, deployed=self.deployed))
        self.tracker.log_text(dump_config(self.config), "config.yaml")
        for name, content in files.items():
            self.tracker.log_dict(content, name)

    def finish(self, *, partition: Mapping[str, Any], partition_key: str | None, device: Any,
               clients: Mapping[int, Any] | Sequence[Any], wall_seconds: float, extra: Mapping[str, Any],
               artifacts: Sequence[RunArtifacts], record_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Log the final results and artifacts, and return (and write) the run record."""
        logger, config = self.logger, self.config
        final = logger.last_eval
        if final is None:
            raise RuntimeError("no evaluation was run")
        self.tracker.log_text(per_client_csv(final, clients), "per_client_results.csv")
        record: dict[str, Any] = {
            "algorithm": config.algorithm, "dataset": config.data.dataset, "partition": dict(partition),
            "partition_key": partition_key, "model": config.model.name, "seed": config.seed,
            "device": str(device), "rounds": config.train.rounds, "algo_options": resolved_dict(self.options),
            "final_mean_acc": final.mean_accuracy, "final_round": final.round_idx,
            "best_mean_acc": logger.best_mean_acc, "best_round": logger.best_round,
            "per_client_acc": final.client_accuracies, "final_std_acc": float(np.std(final.client_accuracies)),
            "bytes_up": logger.bytes_up, "bytes_down": logger.bytes_down,
            "bytes_up_per_round": [h["bytes_up_round"] for h in logger.history],
            "bytes_down_per_round": [h["bytes_down_round"] for h in logger.history],
            "mean_acc_per_round": [h.get(names.MEAN_ACC) for h in logger.history],
            "wall_seconds": wall_seconds, **extra,
            "mlflow_run_id": self.tracker.run_id, "mlflow_experiment": config.tracking.experiment,
            "tracking_uri": self.tracking_uri, "fedselect_version": __version__, "git_commit": git_commit(),
        }
        for artifact in artifacts:
            for path in artifact.files:
                self.tracker.log_artifact(path, artifact_path=path.parent.relative_to(self.plots_dir).as_posix())
            record.update(artifact.record)
        record.update(logger.work_totals())
        self.tracker.log_metrics({names.FINAL_MEAN_ACC: record["final_mean_acc"],
                                  names.BEST_MEAN_ACC: record["best_mean_acc"],
                                  "wall_seconds": record["wall_seconds"]}, step=config.train.rounds)
        self.tracker.log_dict(record, "run_record.json")
        if record_path is not None:
            write_run_record(record_path, record)
        return record
