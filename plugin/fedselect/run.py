"""One training run end to end: config -> data -> partition -> model -> FedML runner -> MLflow -> record."""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedselect import __version__
from fedselect.algorithms.base import Checkpointable, RunContext
from fedselect.algorithms.registry import get_algorithm, validate_algorithm_options
from fedselect.checkpoint import RunCheckpointer
from fedselect.config import ConfigError, ExperimentConfig, dump_config
from fedselect.core.masks import iou_matrix, personal_fraction
from fedselect.data import (
    ImageData,
    Partition,
    TextData,
    TokenTransform,
    canonical_text_name,
    load_dataset,
    make_partition,
    partition_key,
    partition_summary,
    plot_partition,
)
from fedselect.engine import ClientDataset, ImageTransform, resolve_device
from fedselect.fedml_runtime.runtime import (
    build_fedml_args,
    fedml_dataset_tuple,
    fedml_home,
    fedml_sections,
    import_fedml,
)
from fedselect.fedml_runtime.simulation import RoundResult, SimulationFlow
from fedselect.models import build_model, head_param_names, pretrained_input_stats
from fedselect.plots import plot_iou_heatmap
from fedselect.tracking import RunTracker, default_tracking_uri, prepare_store, write_run_record

log = logging.getLogger(__name__)


def partition_spec(config: ExperimentConfig) -> dict[str, Any]:
    """What identifies a partition: every method of a study with the same spec shares it."""
    p = config.data.partition
    return {"kind": p.kind, "seed": config.seed, **p.partition_params()}


def default_partition_path(config: ExperimentConfig) -> Path:
    key = partition_key(config.data.dataset, partition_spec(config))
    return Path(config.tracking.results_dir) / "partitions" / f"{config.data.dataset}-{key}.json"


def load_data(config: ExperimentConfig) -> ImageData | TextData:
    """The configured dataset: images (decoded tensors) or text (token ids)."""
    text = {"max_length": config.data.max_length} if canonical_text_name(config.data.dataset) else {}
    return load_dataset(config.data.dataset, config.data.root, download=config.data.download,
                        cache_dir=config.data.cache_dir, **text)


def data_transform(config: ExperimentConfig, data: ImageData | TextData) -> Callable[..., torch.Tensor]:
    """What turns a stored batch into model input: normalization (+ augmentation, resize) or nothing for tokens.

    Images are normalized with the statistics pretrained weights were trained with, if the model
    declares them, else with the dataset's own.
    """
    if isinstance(data, TextData):
        return TokenTransform()
    return image_transform(config, data.mean, data.std)


def image_transform(config: ExperimentConfig, data_mean: Sequence[float], data_std: Sequence[float]) -> ImageTransform:
    """The config's image transform; the data's (mean, std) count only where the weights declare none."""
    mean, std = pretrained_input_stats(config.model.name, config.model.weights) or (data_mean, data_std)
    return ImageTransform(tuple(mean), tuple(std), augment=config.train.augment, resize=config.data.image_size)


def build_run_model(config: ExperimentConfig, data: ImageData | TextData) -> torch.nn.Module:
    """The configured model for ``data`` (random init seeded by the caller, or loaded weights)."""
    shape = {} if isinstance(data, TextData) else {"in_channels": data.in_channels,
                                                   "image_size": config.data.image_size or data.image_size}
    return build_model(config.model.name, data.num_classes, weights=config.model.weights, **shape)


def compute_partition(config: ExperimentConfig, data: ImageData | TextData) -> Partition:
    """A new partition of ``data`` for the config's spec and seed (deterministic).

    A ``domain`` partition splits by the samples' domains (one product category per client for
    the Amazon reviews), every other kind by their labels.
    """
    kind = config.data.partition.kind
    if kind == "domain":
        if not hasattr(data, "train_domains"):
            raise ConfigError(f"config key 'data.partition.kind': 'domain' needs a dataset with domains "
                              f"(amazon_reviews); {config.data.dataset!r} has none")
        train, test = data.train_domains.numpy(), data.test_domains.numpy()
    else:
        train, test = data.train_y.numpy(), data.test_y.numpy()
    return make_partition(data.name, kind, train, test, seed=config.seed,
                          **config.data.partition.partition_params())


def get_partition(config: ExperimentConfig, data: ImageData) -> Partition:
    """The configured partition file, else the cached one for this spec, else a new one (saved)."""
    if config.data.partition_file:
        partition = Partition.load(config.data.partition_file)
        spec = partition_spec(config)
        if partition.dataset != data.name or any(partition.spec.get(k) != v for k, v in spec.items()):
            raise ValueError(f"partition file {config.data.partition_file} was made for {partition.dataset} "
                             f"{partition.spec}, the config asks for {data.name} {spec}")
        return partition
    path = default_partition_path(config)
    if path.exists():
        return Partition.load(path)
    partition = compute_partition(config, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    partition.save(path)
    return partition


def client_datasets(data: ImageData, partition: Partition, device: torch.device) -> list[ClientDataset]:
    out = []
    for train_idx, test_idx in zip(partition.train_indices, partition.test_indices, strict=True):
        tr, te = torch.as_tensor(np.asarray(train_idx), dtype=torch.long), torch.as_tensor(np.asarray(test_idx),
                                                                                          dtype=torch.long)
        out.append(ClientDataset(data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te]).to(device))
    return out


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
    fedselect.checkpoint).
    """

    # the record is built from these; `pending` are rounds not yet confirmed logged
    checkpoint_attributes = ("bytes_up", "bytes_down", "best_mean_acc", "best_round", "last_eval", "history",
                             "client_sums", "pending")

    tracker: RunTracker
    num_clients: int
    defer: bool = False
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
                "mean_acc": float(np.mean(accs)),
                "std_acc": float(np.std(accs)),
                "min_acc": float(np.min(accs)),
                "max_acc": float(np.max(accs)),
                "pooled_acc": sum(e.correct for e in evals) / max(1, sum(e.total for e in evals)),
                "test_loss": sum(e.loss_sum for e in evals) / max(1, sum(e.total for e in evals)),
            })
            metrics.update({f"acc_client_{c}": result.evaluation[c].accuracy for c in sorted(result.evaluation)})
            adapt = [e.adapt_sample_passes for e in evals]
            if any(adapt):
                # work spent adapting the model just before evaluation (FedBABU's fine-tuning)
                metrics["eval_sample_passes_mean"] = float(np.mean(adapt))
            if metrics["mean_acc"] > self.best_mean_acc:
                self.best_mean_acc, self.best_round = metrics["mean_acc"], result.round_idx
            self.last_eval = result
        self.history.append({"round": result.round_idx, **metrics})
        self.pending.append((result.round_idx, int(time.time() * 1000), metrics))
        if not self.defer:
            self.flush()

    def work_totals(self) -> dict[str, float]:
        """The run record's totals of all clients' local work over the run.

        Training sample passes (docs/ALGORITHMS.md, "Local work") always; estimated backward
        GFLOPs (core.compute) where the algorithm logs them.
        """
        totals = {"train_sample_passes_total": self.client_sums.get("train_sample_passes", 0.0)}
        if "compute_backward" in self.client_sums:
            totals["compute_backward_total"] = self.client_sums["compute_backward"]
        return totals

    def flush(self) -> None:
        """Log the held rounds' metrics to MLflow."""
        for step, timestamp, metrics in self.pending:
            self.tracker.log_metrics(metrics, step=step, timestamp=timestamp)
        self.pending = []


def per_client_csv(result: RoundResult, clients: list[ClientDataset]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["client", "num_train", "num_test", "correct", "accuracy", "test_loss"])
    for cid in sorted(result.evaluation or {}):
        e = result.evaluation[cid]
        writer.writerow([cid, clients[cid].num_train, clients[cid].num_test, e.correct, f"{e.accuracy:.6f}",
                         f"{e.mean_loss:.6f}"])
    return buf.getvalue()


def log_mask_artifacts(tracker: RunTracker, trainers: list[Any], out_dir: Path) -> dict[str, Any]:
    """Clients' personal-mask IoU (whole model and final linear layer) as CSV + heatmap artifacts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = [t.parameter_mask() for t in trainers]
    head_weights = [n for n in head_param_names(trainers[0].model) if n.endswith("weight")]
    figures = {}
    for label, keys in (("model", None), ("head", head_weights)):
        matrix = iou_matrix(masks, keys=keys)
        np.savetxt(out_dir / f"mask_iou_{label}.csv", matrix, delimiter=",", fmt="%.6f")
        title = "mask IoU, whole model" if keys is None else "mask IoU, final linear layer"
        plot_iou_heatmap(matrix, out_dir / f"mask_iou_{label}.png", title=title)
        for suffix in ("csv", "png"):
            tracker.log_artifact(out_dir / f"mask_iou_{label}.{suffix}", artifact_path="masks")
        off_diagonal = matrix[~np.eye(len(masks), dtype=bool)]
        figures[f"mask_iou_{label}_mean"] = float(off_diagonal.mean()) if off_diagonal.size else 1.0
    figures["personal_fraction"] = [personal_fraction(m) for m in masks]
    return figures


def run_experiment(config: ExperimentConfig, *, record_path: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train one configured run in FedML single-process simulation and return its run record."""
    started = time.time()
    spec = get_algorithm(config.algorithm)
    options = validate_algorithm_options(config.algorithm, config.algo)
    device = resolve_device(config.device)
    results_dir = Path(config.tracking.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    run_name = config.tracking.run_name or f"{config.algorithm}-{config.data.dataset}-seed{config.seed}"
    # read first: a checkpoint that cannot be used fails before any data is loaded
    checkpointer = RunCheckpointer(config, run_name=run_name, device=device)

    data = load_data(config)
    partition = get_partition(config, data)
    clients = client_datasets(data, partition, device)

    args = build_fedml_args(fedml_sections(config), home=fedml_home(results_dir))
    torch.manual_seed(config.seed)
    model = build_run_model(config, data).to(device)
    ctx = RunContext(config=config, options=options, device=device, transform=data_transform(config, data))
    trainers = [spec.client_cls(model, args, client_id=cid, data=d, ctx=ctx) for cid, d in enumerate(clients)]
    server = spec.server_cls(model, args, ctx=ctx)

    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(results_dir)
    prepare_store(tracking_uri)
    tags = {"algorithm": config.algorithm, "dataset": config.data.dataset, "seed": str(config.seed),
            "partition": partition_key(data.name, partition_spec(config)), "fedselect_version": __version__,
            **config.tracking.tags}
    with RunTracker(tracking_uri=tracking_uri, experiment=config.tracking.experiment, run_name=run_name, tags=tags,
                    artifact_root=results_dir / "mlartifacts",
                    run_id=checkpointer.mlflow_run_id(tracking_uri)) as tracker:
        summary = partition_summary(partition, data.train_y.numpy(), data.test_y.numpy(), data.classes)
        if not checkpointer.resuming:  # a resumed run logged these when it began
            tracker.log_params(config.to_dict())
            tracker.log_text(dump_config(config), "config.yaml")
            tracker.log_dict(summary, "partition_summary.json")
        logger = RoundLogger(tracker, len(clients), defer=checkpointer.enabled)
        # last before the flow: resuming loads every object's state and the global random states
        start_round = checkpointer.start(model=model, clients=trainers, server=server, logger=logger,
                                         run_id=tracker.run_id, tracking_uri=tracking_uri, started=started)
        if checkpointer.resumed_at:
            tracker.set_tags({"resumed_at_rounds": ",".join(map(str, checkpointer.resumed_at))})
        flow = SimulationFlow(args=args, device=device, clients=trainers, server=server, rounds=config.train.rounds,
                              participation=config.train.participation, seed=config.seed,
                              eval_every=config.train.eval_every, on_round_end=logger, progress=progress,
                              start_round=start_round, checkpoint=checkpointer.save,
                              checkpoint_every=config.train.checkpoint_every)
        import_fedml().FedMLRunner(args, device, fedml_dataset_tuple(clients, data.num_classes), model,
                          algorithm_flow=flow).run()
        final = logger.last_eval
        if final is None:
            raise RuntimeError("no evaluation was run")
        tracker.log_text(per_client_csv(final, clients), "per_client_results.csv")
        plot_dir = results_dir / "plots"
        plot_dir.mkdir(exist_ok=True)
        plot_path = plot_dir / f"partition-{tags['partition']}.png"
        if not plot_path.exists():
            plot_partition(summary, plot_path)
        tracker.log_artifact(plot_path)
        record = {
            "algorithm": config.algorithm,
            "dataset": config.data.dataset,
            "partition": partition_spec(config),
            "partition_key": tags["partition"],
            "model": config.model.name,
            "seed": config.seed,
            "device": str(device),
            "rounds": config.train.rounds,
            "final_mean_acc": final.mean_accuracy,
            "final_round": final.round_idx,
            "best_mean_acc": logger.best_mean_acc,
            "best_round": logger.best_round,
            "per_client_acc": final.client_accuracies,
            "final_std_acc": float(np.std(final.client_accuracies)),
            "bytes_up": logger.bytes_up,
            "bytes_down": logger.bytes_down,
            "bytes_up_per_round": [h["bytes_up_round"] for h in logger.history],
            "bytes_down_per_round": [h["bytes_down_round"] for h in logger.history],
            "mean_acc_per_round": [h.get("mean_acc") for h in logger.history],
            # over all attempts of a resumed run; rounds redone after a kill count once
            "wall_seconds": checkpointer.elapsed_seconds(),
            "resumed_at_rounds": checkpointer.resumed_at,
            "mlflow_run_id": tracker.run_id,
            "mlflow_experiment": config.tracking.experiment,
            "tracking_uri": tracking_uri,
            "fedselect_version": __version__,
            "git_commit": git_commit(),
        }
        plots = results_dir / "plots" / config.tracking.experiment / run_name
        if getattr(spec.client_cls, "learns_mask", False):
            record.update(log_mask_artifacts(tracker, trainers, plots))
        if hasattr(server, "write_artifacts"):
            for path in server.write_artifacts(plots / "selection"):
                tracker.log_artifact(path, artifact_path="selection")
        record.update(logger.work_totals())
        tracker.log_metrics({"final_mean_acc": record["final_mean_acc"], "best_mean_acc": record["best_mean_acc"],
                             "wall_seconds": record["wall_seconds"]}, step=config.train.rounds)
        tracker.log_dict(record, "run_record.json")
    if record_path is not None:
        write_run_record(record_path, record)
    # finished and recorded: the same command again is a new run, not this one resumed
    checkpointer.remove()
    return record
