"""FedML cross-silo deployment: ``fedselect serve`` (rank 0) and ``fedselect join --rank k``.

* ``serve`` holds no client data: it waits for the clients to join with a descriptor of their
  data (:mod:`fedselect.runner.silo`), builds the model and the algorithm's server, runs the
  rounds (:mod:`fedselect.fedml_runtime.cross_silo`), and records the run as the simulation
  does (:class:`~fedselect.runner.record.RunRecorder`), plus the wire traffic.
* ``join --rank k`` (client id k-1) loads only its own data, trains and evaluates its
  personalized model on its own test split.

Addresses, ports, timeouts and the failure policy are the config's ``deploy`` section;
docs/DEPLOYMENT.md explains them and what the channel does not protect.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from fedml import FedMLRunner
from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter

from fedselect.config import ExperimentConfig
from fedselect.engine import resolve_device
from fedselect.fedml_runtime.cross_silo import FedSelectServerManager
from fedselect.fedml_runtime.cross_silo_client import FedSelectClientManager
from fedselect.fedml_runtime.grpc_channel import Endpoint, write_ipconfig
from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_home, fedml_sections
from fedselect.fedml_runtime.transport import transport_for
from fedselect.options import ConfigError
from fedselect.tracking import prepare_store, run_tracking_uri

from .federation import initial_model_and_context, partition_spec, resolve_algorithm, text_model_and_context
from .federation_checkpoint import ClientSnapshots, FederationCheckpointer
from .preflight import as_config_error, preflight
from .record import RunRecorder
from .silo import check_descriptors, load_silo_data, training_fingerprint
from .simulate import run_tags

log = logging.getLogger(__name__)


def endpoints(config: ExperimentConfig) -> list[Endpoint]:
    """Rank 0 at ``server_host:server_port``; client rank k at its host, port ``server_port + k``."""
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
    if config.train.client_batching:  # a silo trains its one client: nothing to batch
        raise ConfigError("config key 'train.client_batching' is true, but it batches the clients of a "
                          "simulated round; a cross-silo party trains one client (set it to false)")
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


def model_for(config: ExperimentConfig, options: Any, device: torch.device,
              descriptor: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The seeded initial model and run context for data described by ``descriptor``."""
    if descriptor.get("modality") == "text":
        return text_model_and_context(config, options, device, num_classes=len(descriptor["classes"]))
    return initial_model_and_context(config, options, device, num_classes=len(descriptor["classes"]),
                                     in_channels=descriptor["in_channels"], image_size=descriptor["image_shape"][0],
                                     mean=descriptor["mean"], std=descriptor["std"])


def join(config: ExperimentConfig, rank: int) -> None:
    """Run client rank ``rank`` (client id rank-1) until the server ends the federation."""
    n = config.data.partition.num_clients
    if not 1 <= rank <= n:
        raise ConfigError(f"--rank {rank}: client ranks are 1..{n} (data.partition.num_clients)")
    cid = rank - 1
    transport = transport_for(config.deploy, rank, n)  # TLS files checked before anything else
    preflight(config, model=False)  # the model-time checks are the server's, before it listens
    spec, options = resolve_algorithm(config)
    device = resolve_device(config.device)
    data, descriptor = load_silo_data(config, cid, device)
    args = cross_silo_args(config, rank)
    # the server's initial model is what counts; same seed, same shapes
    model, ctx = model_for(config, options, device, descriptor)
    trainer = spec.client_cls(model, args, client_id=cid, data=data, ctx=ctx)
    sizes = {cid: data.num_train}
    adapter = TrainerDistAdapter(args, device, rank, model, data.num_train, sizes, {cid: None}, {cid: None}, trainer)
    snapshots = ClientSnapshots(config, run_name=run_name_of(config), rank=rank, device=device)
    manager = FedSelectClientManager(args, adapter, client_id=cid, num_clients=n, deploy=config.deploy,
                                     descriptor=descriptor, transport=transport, snapshots=snapshots)
    dataset = [data.num_train, data.num_test, None, None, sizes, {cid: None}, {cid: None}, len(descriptor["classes"])]
    print(f"client rank {rank}: {data.num_train} train / {data.num_test} test samples; joining the server at "
          f"{config.deploy.server_host}:{config.deploy.server_port} ({transport.describe()})", flush=True)
    try:
        FedMLRunner(args, device, dataset, model, algorithm_flow=SimpleNamespace(run=manager.run_federation)).run()
    finally:
        Path(args.grpc_ipconfig_path).unlink(missing_ok=True)
    log.info("client %d done: trained %d rounds", cid, manager.rounds_trained)


def run_name_of(config: ExperimentConfig) -> str:
    """The MLflow run name of a federation (its checkpoints are named after it too)."""
    return config.tracking.run_name or f"{config.algorithm}-{config.data.dataset}-seed{config.seed}-cross-silo"


class ServerSession:
    """The server's side of one federation: built when every client has joined, recorded each round,
    checkpointed every ``train.checkpoint_every`` rounds (:class:`FederationCheckpointer`)."""

    def __init__(self, config: ExperimentConfig, args: Any, *, progress: bool, started: float) -> None:
        self.config, self.args, self.progress, self.started = config, args, progress, started
        self.spec, self.options = resolve_algorithm(config)
        self.device = resolve_device(config.device)
        # read before anything listens: a checkpoint that cannot be used is a config error (exit 2)
        self.checkpointer = FederationCheckpointer(config, run_name=run_name_of(config), device=self.device)
        self.manager: FedSelectServerManager | None = None
        self.recorder: RunRecorder | None = None
        self.descriptors: dict[int, dict[str, Any]] = {}
        self.common: dict[str, Any] = {}
        self.wire: list[dict[str, float]] = list(self.checkpointer.wire)
        self.dropped: list[list[Any]] = list(self.checkpointer.dropped)

    def on_joined(self, descriptors: dict[int, dict[str, Any]]) -> Any:
        """All clients are in: check them, build the server, open the MLflow run."""
        config = self.config
        self.common = check_descriptors(descriptors, training_fingerprint(config))
        self.descriptors = descriptors
        model, ctx = model_for(config, self.options, self.device, self.common)  # the simulation's initial model
        try:
            server = self.spec.server_cls(model, self.args, ctx=ctx)
        except ValueError as exc:  # its checks against the model (layer selection's budgets): the config's
            raise as_config_error(exc, f"{config.model.name} for the clients' data") from None
        checkpointer, uri = self.checkpointer, run_tracking_uri(config.tracking)
        self.recorder = RunRecorder(config, self.options, run_name_of(config),
                                    run_tags(config, self.common["partition_key"], mode="cross_silo"), uri,
                                    num_clients=len(descriptors), totaled=self.spec.client_cls.totaled_metrics,
                                    run_id=checkpointer.mlflow_run_id(uri), defer=checkpointer.enabled, deployed=True)
        self.recorder.__enter__()
        if not checkpointer.resuming:  # a resumed federation logged these when it began
            self.recorder.log_start({"client_data.json": {str(c): d for c, d in descriptors.items()}})
        start = checkpointer.start_federation(model=model, server=server, logger=self.recorder.logger,
                                              run_id=self.recorder.tracker.run_id, tracking_uri=uri,
                                              started=self.started, descriptors=descriptors)
        if start:
            self.recorder.tracker.set_tags({"resumed_at_rounds": ",".join(map(str, checkpointer.resumed_at))})
            if self.progress:
                print(f"resuming the federation at round {start + 1}/{config.train.rounds} from "
                      f"{checkpointer.path}", flush=True)
        return server

    def on_round_end(self, result: Any, wire: dict[str, float]) -> None:
        assert self.recorder is not None and self.manager is not None
        # the wire figures go with the round's metrics: held, like them, until a checkpoint covers the round
        result.server_metrics = {**result.server_metrics, **wire}
        self.recorder.logger(result)
        self.wire.append(wire)
        self.dropped.extend([result.round_idx, int(c), str(r)] for c, r in result.dropped)
        m = self.manager
        if self.checkpointer.write(result.round_idx, live=m.live, failed=m.failed, trained=m.trained, wire=self.wire,
                                   dropped=self.dropped) and self.progress:
            print(f"checkpoint after round {result.round_idx + 1}: {self.checkpointer.path}", flush=True)
        if self.progress:
            acc = f", mean acc {result.mean_accuracy:.4f}" if result.evaluation else ""
            print(f"round {result.round_idx + 1}/{self.config.train.rounds}: loss {result.train_loss:.4f}{acc}, "
                  f"clients {result.sampled}, up {result.bytes_up:,} B (wire {wire['wire_bytes_up_round']:,}), "
                  f"{wire['round_seconds']:.1f} s", flush=True)

    def finish(self, manager: FedSelectServerManager, *, record_path: Any) -> dict[str, Any]:
        assert self.recorder is not None
        recorder = self.recorder
        final = recorder.logger.last_eval
        extra = {
            "mode": "cross_silo", "classes": list(self.common["classes"]),
            "evaluated_clients": sorted(final.evaluation or {}) if final else [],
            "wire_bytes_up_per_round": [w["wire_bytes_up_round"] for w in self.wire],
            "wire_bytes_down_per_round": [w["wire_bytes_down_round"] for w in self.wire],
            "round_seconds": [w["round_seconds"] for w in self.wire], "updates_dropped": self.dropped,
            "clients_failed": {str(c): r for c, r in sorted(manager.failed.items())},
            # rounds after which a restarted server resumed (the wall seconds add up all attempts)
            "resumed_at_rounds": self.checkpointer.resumed_at,
        }
        sizes = {c: SimpleNamespace(num_train=d["num_train"], num_test=d["num_test"])
                 for c, d in self.descriptors.items()}
        record = recorder.finish(partition=partition_spec(self.config), partition_key=self.common["partition_key"],
                                 device=self.device, clients=sizes, wall_seconds=self.checkpointer.elapsed_seconds(),
                                 extra=extra, artifacts=[manager.server.run_artifacts(recorder.plots_dir)],
                                 record_path=record_path)
        self.checkpointer.remove()  # finished and recorded: the same command again is a new federation
        return record

    def __enter__(self) -> ServerSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(*exc)


def serve(config: ExperimentConfig, *, record_path: str | os.PathLike | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run the server until the federation ends; log to MLflow and return (and write) the run record."""
    started = time.time()
    # TLS files checked before anything listens or a client can join
    transport = transport_for(config.deploy, 0, config.data.partition.num_clients)
    # config- and model-time checks before anything listens: a config error never lets a client join
    preflight(config, deployed=True)
    Path(config.tracking.results_dir).mkdir(parents=True, exist_ok=True)
    args = cross_silo_args(config, 0)
    prepare_store(run_tracking_uri(config.tracking))
    try:
        with ServerSession(config, args, progress=progress, started=started) as session:
            # listening from here on: clients that start sooner wait for this port (deploy.join_timeout_s)
            manager = session.manager = FedSelectServerManager(
                args, config=config, on_joined=session.on_joined, on_round_end=session.on_round_end,
                transport=transport, checkpoints=session.checkpointer)
            if progress:
                print(f"serving {config.algorithm} on {config.deploy.server_host}:{config.deploy.server_port} "
                      f"({transport.describe()}), waiting for {config.data.partition.num_clients} clients", flush=True)
            FedMLRunner(args, session.device, None, None,
                        algorithm_flow=SimpleNamespace(run=manager.run_federation)).run()
            return session.finish(manager, record_path=record_path)
    finally:
        Path(args.grpc_ipconfig_path).unlink(missing_ok=True)
