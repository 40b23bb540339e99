"""One training run in FedML single-process simulation: config -> federation -> FedMLRunner -> record."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fedselect import __version__
from fedselect.config import ExperimentConfig
from fedselect.data import partition_summary, plot_partition
from fedselect.engine import resolve_device
from fedselect.fedml_bridge import import_fedml
from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_dataset_tuple, fedml_home, fedml_sections
from fedselect.fedml_runtime.simulation import SimulationFlow
from fedselect.tracking import run_tracking_uri

from .checkpoint import RunCheckpointer
from .federation import Federation, build_federation, load_data, partition_spec, resolve_algorithm
from .record import RunRecorder, git_commit


def run_tags(config: ExperimentConfig, partition_key: str | None, **extra: str) -> dict[str, str]:
    """The MLflow tags a run is found by (both runtimes), with MLflow's own source tags (the UI's
    Source and Git Commit fields: which code produced the run)."""
    source = {"mlflow.source.name": "fedselect", "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        source["mlflow.source.git.commit"] = commit
    return {"algorithm": config.algorithm, "dataset": config.data.dataset, "seed": str(config.seed),
            "partition": str(partition_key), "fedselect_version": __version__, **source, **extra,
            **config.tracking.tags}


def run_experiment(config: ExperimentConfig, *, record_path: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train one configured run in FedML single-process simulation and return its run record."""
    started = time.time()
    algorithm = resolve_algorithm(config)  # once, and a bad option fails before anything is loaded
    device = resolve_device(config.device)
    results_dir = Path(config.tracking.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    run_name = config.tracking.run_name or f"{config.algorithm}-{config.data.dataset}-seed{config.seed}"
    # read first: a checkpoint that cannot be used fails before any data is loaded
    checkpointer = RunCheckpointer(config, run_name=run_name, device=device)
    args = build_fedml_args(fedml_sections(config), home=fedml_home(results_dir))
    fed = build_federation(config, device, args, data=load_data(config), algorithm=algorithm)
    tracking_uri = run_tracking_uri(config.tracking)
    summary = partition_summary(fed.partition, fed.data.train_y.numpy(), fed.data.test_y.numpy(), fed.data.classes)
    with RunRecorder(config, fed.options, run_name, run_tags(config, fed.partition_key), tracking_uri,
                     num_clients=len(fed.clients), totaled=fed.spec.client_cls.totaled_metrics,
                     run_id=checkpointer.mlflow_run_id(tracking_uri), defer=checkpointer.enabled) as recorder:
        if not checkpointer.resuming:  # a resumed run logged these when it began
            recorder.log_start({"partition_summary.json": summary})
        flow = train(fed, args, recorder, checkpointer, started=started, progress=progress)
        plot_path = results_dir / "plots" / f"partition-{fed.partition_key}.png"
        if not plot_path.exists():
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot_partition(summary, plot_path)
        recorder.tracker.log_artifact(plot_path)
        artifacts = [fed.spec.client_cls.federation_artifacts(fed.clients, recorder.plots_dir),
                     fed.server.run_artifacts(recorder.plots_dir)]
        record = recorder.finish(
            partition=partition_spec(config), partition_key=fed.partition_key, device=device,
            clients=fed.client_data, wall_seconds=checkpointer.elapsed_seconds(),
            # over all attempts of a resumed run; rounds redone after a kill count once
            extra={"resumed_at_rounds": checkpointer.resumed_at, "classes": list(fed.data.classes),
                   "cuda_graphs": fed.ctx.cuda_graphs,  # train.cuda_graphs as resolved (auto)
                   # how the clients' training calls ran with train.client_batching (this attempt's rounds)
                   "client_batching": flow.batching if config.train.client_batching else None},
            artifacts=artifacts, record_path=record_path)
    # finished and recorded: the same command again is a new run, not this one resumed
    checkpointer.remove()
    return record


def train(fed: Federation, args: Any, recorder: RunRecorder, checkpointer: RunCheckpointer, *, started: float,
          progress: bool) -> SimulationFlow:
    """The rounds, through FedMLRunner with our simulation flow; checkpointed, resumable. Returns the flow."""
    config = fed.config
    # last before the flow: resuming loads every object's state and the global random states
    start_round = checkpointer.start(model=fed.model, clients=fed.clients, server=fed.server,
                                     logger=recorder.logger, run_id=recorder.tracker.run_id,
                                     tracking_uri=recorder.tracking_uri, started=started)
    if checkpointer.resumed_at:
        recorder.tracker.set_tags({"resumed_at_rounds": ",".join(map(str, checkpointer.resumed_at))})
    flow = SimulationFlow(args=args, device=fed.device, clients=fed.clients, server=fed.server,
                          rounds=config.train.rounds, participation=config.train.participation, seed=config.seed,
                          eval_every=config.train.eval_every, on_round_end=recorder.logger, progress=progress,
                          start_round=start_round, checkpoint=checkpointer.save,
                          checkpoint_every=config.train.checkpoint_every,
                          batch_clients=config.train.client_batching,
                          batch_max_clients=config.train.client_batch_max)
    import_fedml().FedMLRunner(args, fed.device, fedml_dataset_tuple(fed.client_data, fed.data.num_classes),
                               fed.model, algorithm_flow=flow).run()
    return flow
