"""FedML cross-silo deployment: ``fedselect serve``, ``fedselect join`` and ``fedselect launch-local``.

* ``serve`` (rank 0) holds no client data: it waits for the clients to join with a descriptor
  of their data (sizes, classes, normalization), builds the model and our ServerAggregator,
  runs the rounds (:mod:`fedselect.fedml_runtime.cross_silo`), logs each round to MLflow as
  ``fedselect run`` does, and writes the run record.
* ``join --rank k`` (client id k-1) loads only its own data: its entry of the configured
  partition, or its own ImageFolder tree (``deploy.client_data: folder``); it trains and
  evaluates its personalized model on its own test split.
* ``launch-local`` starts a server and N clients as separate processes on 127.0.0.1
  (:mod:`fedselect.launch`).

Addresses, ports, timeouts and the failure policy are the config's ``deploy`` section;
docs/DEPLOYMENT.md explains them and what the channel does not protect.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fedselect import __version__
from fedselect.config import ConfigError, ExperimentConfig, dump_config

log = logging.getLogger(__name__)

# descriptor keys every client of one federation must agree on
SHARED_DATA_KEYS = ("dataset", "partition_key", "classes", "in_channels", "image_shape", "mean", "std")


def training_fingerprint(config: ExperimentConfig) -> str:
    """What server and clients must share beyond the data: algorithm, options, model, schedule, seed."""
    d = config.to_dict()
    keys = ("algorithm", "seed", "algo", "model", "train")
    return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def load_plugins(modules: list[str]) -> None:
    """Import modules that register extra algorithms (``--plugin``), before the config is read."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"--plugin {name}: cannot import it ({exc})") from exc


def endpoints(config: ExperimentConfig) -> list[Any]:
    """Rank 0 at ``server_host:server_port``; client rank k at its host, port ``server_port + k``."""
    from fedselect.fedml_runtime.grpc_channel import Endpoint

    d, n = config.deploy, config.data.partition.num_clients
    if d.client_hosts and len(d.client_hosts) != n:
        raise ConfigError(f"config key 'deploy.client_hosts' lists {len(d.client_hosts)} hosts for "
                          f"{n} clients (data.partition.num_clients)")
    if d.server_port + n > 65535:
        raise ConfigError(f"config key 'deploy.server_port' {d.server_port} leaves no room for ports "
                          f"server_port+1..server_port+{n} of the clients")
    hosts = [d.server_host, *(d.client_hosts or [d.server_host] * n)]
    return [Endpoint(rank, host, d.server_port + rank, d.bind_host) for rank, host in enumerate(hosts)]


def cross_silo_args(config: ExperimentConfig, rank: int) -> Any:
    """FedML ``args`` of one cross-silo process, with its ipconfig CSV written from the config."""
    from fedselect.fedml_runtime.grpc_channel import write_ipconfig
    from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_home, fedml_sections

    results_dir = Path(config.tracking.results_dir)
    n = config.data.partition.num_clients
    ipconfig = write_ipconfig(results_dir / "deploy" / f"grpc_ipconfig.{os.getpid()}.csv", endpoints(config))
    # every client trains in cross-silo (FedML re-samples silos otherwise); our server samples itself
    client_ids = list(range(1, n + 1)) if rank == 0 else [rank]
    extra = {"comm_args": {"grpc_ipconfig_path": str(ipconfig), "worker_num": n},
             "train_args": {"client_id_list": str(client_ids), "client_num_per_round": n}}
    sections = fedml_sections(config, training_type="cross_silo", backend="GRPC", rank=rank,
                              role="server" if rank == 0 else "client", extra=extra)
    return build_fedml_args(sections, home=fedml_home(results_dir))


# ---------------------------------------------------------------------------------- client data

def load_silo_data(config: ExperimentConfig, client_id: int, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """This client's own data (ClientDataset on ``device``) and its descriptor for the server."""
    from fedselect.engine import ClientDataset

    d = config.deploy
    if d.client_data == "folder":
        x_tr, y_tr, x_te, y_te, data = _folder_data(config, client_id)
        mean, std, classes, key = list(d.norm_mean), list(d.norm_std), list(d.classes), None
        if len(mean) != data.in_channels:
            raise ConfigError(f"config key 'deploy.norm_mean' has {len(mean)} values, the images in "
                              f"{d.client_data_dir} have {data.in_channels} channels")
    else:
        from fedselect.data import partition_key
        from fedselect.run import get_partition, load_data, partition_spec

        data = load_data(config)
        partition = get_partition(config, data)
        if partition.num_clients != config.data.partition.num_clients:
            raise ConfigError(f"the partition has {partition.num_clients} clients, the config "
                              f"{config.data.partition.num_clients}")
        tr = torch.as_tensor(np.asarray(partition.train_indices[client_id]), dtype=torch.long)
        te = torch.as_tensor(np.asarray(partition.test_indices[client_id]), dtype=torch.long)
        x_tr, y_tr, x_te, y_te = data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te]
        mean, std, classes = list(data.mean), list(data.std), list(data.classes)
        key = partition_key(data.name, partition_spec(config))
    descriptor = {
        "training": training_fingerprint(config),
        "dataset": config.data.dataset, "partition_key": key, "classes": classes,
        "in_channels": int(x_tr.shape[1]), "image_shape": [int(x_tr.shape[2]), int(x_tr.shape[3])],
        "mean": mean, "std": std, "num_train": int(len(y_tr)), "num_test": int(len(y_te)),
        "train_class_counts": np.bincount(y_tr.numpy(), minlength=len(classes)).tolist(),
        "test_class_counts": np.bincount(y_te.numpy(), minlength=len(classes)).tolist(),
    }
    # only this client's rows are kept; the rest of a shared dataset is dropped here
    return ClientDataset(x_tr.clone(), y_tr.clone(), x_te.clone(), y_te.clone()).to(device), descriptor


def _folder_data(config: ExperimentConfig, client_id: int) -> tuple[Any, ...]:
    from fedselect.data import load_image_dataset

    d = config.deploy
    folder = str(d.client_data_dir).format(rank=client_id + 1, client=client_id)
    data = load_image_dataset(f"imagefolder:{folder}", cache_dir=config.data.cache_dir)
    label = {name: i for i, name in enumerate(d.classes)}
    unknown = sorted(set(data.classes) - set(label))
    if unknown:
        raise ConfigError(f"{folder} has class folders {unknown} not in config key 'deploy.classes'")
    # labels are indices into deploy.classes, whatever subset of classes this silo holds
    remap = torch.tensor([label[name] for name in data.classes], dtype=torch.long)
    return data.train_x, remap[data.train_y], data.test_x, remap[data.test_y], data


def check_descriptors(descriptors: dict[int, dict[str, Any]], training: str | None = None) -> dict[str, Any]:
    """What all clients agree on (else an error naming the first client that differs); each must also
    train what the server's config says (``training``: :func:`training_fingerprint`)."""
    from fedselect.fedml_runtime.cross_silo import FederationError

    for cid, d in sorted(descriptors.items()):
        if training is not None and d.get("training") != training:
            raise FederationError(f"client {cid} (rank {cid + 1}) runs another training config than the server "
                                  "(algorithm, seed, algo, model or train differ): use the same config file")
    first, *rest = sorted(descriptors)
    common = {k: descriptors[first][k] for k in SHARED_DATA_KEYS}
    for cid in rest:
        for key in SHARED_DATA_KEYS:
            if descriptors[cid][key] != common[key]:
                raise FederationError(f"client {cid}'s data differ from client {first}'s in '{key}': "
                                      f"{descriptors[cid][key]!r} vs {common[key]!r}")
    return common


def model_and_context(config: ExperimentConfig, options: Any, device: Any,
                      descriptor: dict[str, Any]) -> tuple[Any, Any]:
    """The seeded initial model and the run context for data described by ``descriptor`` (as the
    simulation builds them from the data itself)."""
    from fedselect.algorithms.base import RunContext
    from fedselect.models import build_model
    from fedselect.run import image_transform

    torch.manual_seed(config.seed)
    model = build_model(config.model.name, len(descriptor["classes"]), in_channels=descriptor["in_channels"],
                        image_size=config.data.image_size or descriptor["image_shape"][0],
                        weights=config.model.weights).to(device)
    ctx = RunContext(config=config, options=options, device=device,
                     transform=image_transform(config, descriptor["mean"], descriptor["std"]))
    return model, ctx


# ------------------------------------------------------------------------------------ the client

def join(config: ExperimentConfig, rank: int) -> None:
    """Run client rank ``rank`` (client id rank-1) until the server ends the federation."""
    from fedml import FedMLRunner
    from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter

    from fedselect.algorithms.registry import get_algorithm, validate_algorithm_options
    from fedselect.engine import resolve_device
    from fedselect.fedml_runtime.cross_silo_client import FedSelectClientManager

    n = config.data.partition.num_clients
    if not 1 <= rank <= n:
        raise ConfigError(f"--rank {rank}: client ranks are 1..{n} (data.partition.num_clients)")
    cid = rank - 1
    spec = get_algorithm(config.algorithm)
    options = validate_algorithm_options(config.algorithm, config.algo)
    device = resolve_device(config.device)
    data, descriptor = load_silo_data(config, cid, device)
    args = cross_silo_args(config, rank)
    # the server's initial model is what counts; same seed, same shapes
    model, ctx = model_and_context(config, options, device, descriptor)
    trainer = spec.client_cls(model, args, client_id=cid, data=data, ctx=ctx)
    sizes = {cid: data.num_train}
    adapter = TrainerDistAdapter(args, device, rank, model, data.num_train, sizes, {cid: None}, {cid: None}, trainer)
    manager = FedSelectClientManager(args, adapter, client_id=cid, num_clients=n, deploy=config.deploy,
                                     descriptor=descriptor)
    dataset = [data.num_train, data.num_test, None, None, sizes, {cid: None}, {cid: None}, len(descriptor["classes"])]
    print(f"client rank {rank}: {data.num_train} train / {data.num_test} test samples; joining the server at "
          f"{config.deploy.server_host}:{config.deploy.server_port}", flush=True)
    try:
        FedMLRunner(args, device, dataset, model, algorithm_flow=SimpleNamespace(run=manager.run_federation)).run()
    finally:
        Path(args.grpc_ipconfig_path).unlink(missing_ok=True)
    log.info("client %d done: trained %d rounds", cid, manager.rounds_trained)


# ------------------------------------------------------------------------------------ the server

def serve(config: ExperimentConfig, *, record_path: str | os.PathLike | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run the server until the federation ends; log to MLflow and return (and write) the run record."""
    from fedml import FedMLRunner

    from fedselect.algorithms.registry import get_algorithm, validate_algorithm_options
    from fedselect.engine import resolve_device
    from fedselect.fedml_runtime.cross_silo import FedSelectServerManager
    from fedselect.run import RoundLogger, git_commit, partition_spec, per_client_csv
    from fedselect.tracking import RunTracker, default_tracking_uri, prepare_store, write_run_record

    started = time.time()
    spec = get_algorithm(config.algorithm)
    options = validate_algorithm_options(config.algorithm, config.algo)
    device = resolve_device(config.device)
    results_dir = Path(config.tracking.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    args = cross_silo_args(config, 0)
    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(results_dir)
    run_name = config.tracking.run_name or f"{config.algorithm}-{config.data.dataset}-seed{config.seed}-cross-silo"
    state: dict[str, Any] = {"wire": [], "dropped": []}

    with ExitStack() as stack:
        def on_joined(descriptors: dict[int, dict[str, Any]]) -> Any:
            common = check_descriptors(descriptors, training_fingerprint(config))
            model, ctx = model_and_context(config, options, device, common)  # the simulation's initial model
            tags = {"algorithm": config.algorithm, "dataset": config.data.dataset, "seed": str(config.seed),
                    "partition": str(common["partition_key"]), "fedselect_version": __version__,
                    "mode": "cross_silo", **config.tracking.tags}
            tracker = stack.enter_context(RunTracker(tracking_uri=tracking_uri, experiment=config.tracking.experiment,
                                                     run_name=run_name, tags=tags,
                                                     artifact_root=results_dir / "mlartifacts"))
            tracker.log_params(config.to_dict())
            tracker.log_text(dump_config(config), "config.yaml")
            tracker.log_dict({str(c): d for c, d in descriptors.items()}, "client_data.json")
            state.update(tracker=tracker, logger=RoundLogger(tracker, len(descriptors)), descriptors=descriptors,
                         partition_key=common["partition_key"])
            return spec.server_cls(model, args, ctx=ctx)

        def on_round_end(result: Any, wire: dict[str, float]) -> None:
            state["logger"](result)
            state["tracker"].log_metrics(dict(wire), step=result.round_idx)
            state["wire"].append(wire)
            state["dropped"].extend([result.round_idx, int(c), str(r)] for c, r in result.dropped)
            if progress:
                acc = f", mean acc {result.mean_accuracy:.4f}" if result.evaluation else ""
                print(f"round {result.round_idx + 1}/{config.train.rounds}: loss {result.train_loss:.4f}{acc}, "
                      f"clients {result.sampled}, up {result.bytes_up:,} B (wire {wire['wire_bytes_up_round']:,}), "
                      f"{wire['round_seconds']:.1f} s", flush=True)

        # listening from here on: clients that start sooner wait for this port (deploy.join_timeout_s)
        manager = FedSelectServerManager(args, config=config, on_joined=on_joined, on_round_end=on_round_end)
        prepare_store(tracking_uri)
        if progress:
            print(f"serving {config.algorithm} on {config.deploy.server_host}:{config.deploy.server_port}, "
                  f"waiting for {config.data.partition.num_clients} clients", flush=True)
        try:
            FedMLRunner(args, device, None, None, algorithm_flow=SimpleNamespace(run=manager.run_federation)).run()
        finally:
            Path(args.grpc_ipconfig_path).unlink(missing_ok=True)

        tracker, logger = state["tracker"], state["logger"]
        final = logger.last_eval
        if final is None:
            raise RuntimeError("no evaluation was run")
        by_id = {c: SimpleNamespace(num_train=d["num_train"], num_test=d["num_test"])
                 for c, d in state["descriptors"].items()}
        tracker.log_text(per_client_csv(final, by_id), "per_client_results.csv")
        record = {
            "algorithm": config.algorithm, "dataset": config.data.dataset, "partition": partition_spec(config),
            "partition_key": state["partition_key"], "model": config.model.name, "seed": config.seed,
            "device": str(device), "rounds": config.train.rounds, "mode": "cross_silo",
            "final_mean_acc": final.mean_accuracy, "final_round": final.round_idx,
            "best_mean_acc": logger.best_mean_acc, "best_round": logger.best_round,
            "per_client_acc": final.client_accuracies, "evaluated_clients": sorted(final.evaluation or {}),
            "final_std_acc": float(np.std(final.client_accuracies)),
            "bytes_up": logger.bytes_up, "bytes_down": logger.bytes_down,
            "bytes_up_per_round": [h["bytes_up_round"] for h in logger.history],
            "bytes_down_per_round": [h["bytes_down_round"] for h in logger.history],
            "wire_bytes_up_per_round": [w["wire_bytes_up_round"] for w in state["wire"]],
            "wire_bytes_down_per_round": [w["wire_bytes_down_round"] for w in state["wire"]],
            "round_seconds": [w["round_seconds"] for w in state["wire"]],
            "mean_acc_per_round": [h.get("mean_acc") for h in logger.history],
            "updates_dropped": state["dropped"],
            "clients_failed": {str(c): r for c, r in sorted(manager.failed.items())},
            "wall_seconds": time.time() - started, "mlflow_run_id": tracker.run_id,
            "mlflow_experiment": config.tracking.experiment, "tracking_uri": tracking_uri,
            "fedselect_version": __version__, "git_commit": git_commit(),
        }
        server = manager.server
        if hasattr(server, "write_artifacts"):
            plots = results_dir / "plots" / config.tracking.experiment / run_name
            for path in server.write_artifacts(plots / "selection"):
                tracker.log_artifact(path, artifact_path="selection")
        record.update(logger.work_totals())
        tracker.log_metrics({"final_mean_acc": record["final_mean_acc"], "best_mean_acc": record["best_mean_acc"],
                             "wall_seconds": record["wall_seconds"]}, step=config.train.rounds)
        tracker.log_dict(record, "run_record.json")
    if record_path is not None:
        write_run_record(record_path, record)
    return record
