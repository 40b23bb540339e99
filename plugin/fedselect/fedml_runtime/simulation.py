"""Single-process simulation flow driving our ClientTrainer/ServerAggregator pairs.

FedML's own single-process simulator never calls a custom ClientTrainer/ServerAggregator
(it picks a built-in algorithm by ``federated_optimizer`` and shares one trainer between all
clients; FedML issue #565). This flow is handed to ``FedMLRunner(..., algorithm_flow=flow)``
and runs the same hooks, in the same order, as FedML's cross-silo client and server managers
do, so an algorithm written once runs in both:

client: set_model_params(global) -> on_before_local_training -> train -> on_after_local_training
        -> upload
server: add each upload to the round's average -> on_after_aggregation -> set_model_params

Without a wire: a simulated client's upload is not encoded. As each client finishes, the server
adds its live state under its mask to a running average (``local_upload`` ->
``FedAvgServer.add_local_upload``), so the server never holds more than the sums of one model and
touches each tensor once; bytes are counted by the wire format's own size rule
(:func:`fedselect.algorithms.payload.upload_nbytes`, tested equal to the encoded payload's). The
cross-silo runtime sends the encoded upload and the server adds the decoded tensors to the same
running average (:func:`aggregate_round`), so both runtimes give the same global model bit for
bit. FedML's list-level ``on_before_aggregation`` (its differential-privacy, attack and defence
modules, which this project does not configure) runs in cross-silo only.

An algorithm may add a planning exchange before local training (layer selection: clients
report layer scores, the server solves which layers each trains): its server's
``needs_plan(round_idx)`` says when, ``plan_round(round_idx, reports) -> plans`` answers the
clients' ``plan_report()``, and each client gets ``receive_plan(plan)`` (hooks declared, with
FedAvg's no-op defaults, in :mod:`fedselect.algorithms.base`); reports and plans are JSON-safe
dicts, and their bytes are the JSON text's, as on the cross-silo wire.

Each client keeps its own trainer object (per-client persistent state); all trainers may
share one ``nn.Module``, since a trainer's state lives in its personal values and mask. With
``train.client_batching`` a round's clients instead run side by side in threads, each on a copy
of the module, and their training calls are batched (:mod:`fedselect.client_batching`).

Checkpoints: after ``on_round_end``, every ``checkpoint_every`` rounds and after the last round,
the flow calls ``checkpoint(round_idx)`` (the round just finished), when a state of the whole
federation is consistent; a resumed flow starts at ``start_round`` (see fedselect.runner.checkpoint).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedselect.algorithms.payload import upload_nbytes
from fedselect.client_batching import ModelReplicas, Rendezvous
from fedselect.engine import EvalResult

log = logging.getLogger(__name__)


def json_nbytes(message: Any) -> int:
    """Bytes of a JSON-safe planning message as sent (compact UTF-8 JSON)."""
    return len(json.dumps(message, separators=(",", ":")).encode())


def aggregate_round(server: Any, uploads: list[tuple[float, Any]]) -> tuple[list[tuple[int, str]], dict[str, float]]:
    """The server's end of a round, in FedML's hook order (both runtimes): the updates it dropped
    this round and its round metrics."""
    dropped_before = len(server.dropped_updates)
    accepted, _ = server.on_before_aggregation(uploads)
    aggregated = server.aggregate(accepted)
    server.set_model_params(server.on_after_aggregation(aggregated))
    return list(server.dropped_updates[dropped_before:]), server.round_metrics()


def sample_clients(num_clients: int, participation: float, seed: int, round_idx: int) -> list[int]:
    """Clients taking part in ``round_idx``: max(1, round(K * N)) drawn without replacement.

    Seeded by (seed, round) only, so every algorithm of a study samples the same clients.
    """
    count = max(1, round(participation * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_idx, 0x5A17])
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


@dataclass
class RoundResult:
    """What happened in one round; handed to the flow's callback (tracking, checkpoints)."""

    round_idx: int
    sampled: list[int]
    train_loss: float
    bytes_up: int
    bytes_down: int
    evaluation: dict[int, EvalResult] | None = None
    # each sampled client's own figures of its local update (ClientTrainer.round_metrics)
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    # the server's own figures of the round (layer selection: solve time, objective)
    server_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def client_accuracies(self) -> list[float]:
        return [self.evaluation[c].accuracy for c in sorted(self.evaluation)] if self.evaluation else []

    @property
    def mean_accuracy(self) -> float:
        accs = self.client_accuracies
        return float(np.mean(accs)) if accs else float("nan")


class SimulationFlow:
    """The federated round loop over per-client trainers and one server aggregator."""

    def __init__(self, *, args: Any, device: Any, clients: Sequence[Any], server: Any, rounds: int,
                 participation: float, seed: int, eval_every: int = 1, start_round: int = 0,
                 on_round_end: Callable[[RoundResult], None] | None = None, progress: bool = True,
                 checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0,
                 batch_clients: bool = False, batch_max_clients: int = 0) -> None:
        self.args = args
        self.device = device
        self.clients = list(clients)
        self.server = server
        self.rounds = rounds
        self.participation = participation
        self.seed = seed
        self.eval_every = eval_every
        self.start_round = start_round
        self.on_round_end = on_round_end
        self.progress = progress
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.results: list[RoundResult] = []
        # train.client_batching (None: off): a round's clients train side by side, each on its own model copy
        self.replicas = ModelReplicas(self.clients[0].model) if batch_clients else None
        self.batch_max_clients = batch_max_clients
        # with batch_clients: the clients' training calls trained in batches, and alone (an extra
        # loss term, or no other client making the same call), over the run (its record)
        self.batching = dict.fromkeys(("batched_calls", "calls_in_batches", "calls_alone"), 0)

    def run(self) -> list[RoundResult]:
        """Run rounds ``start_round .. rounds-1``; FedMLRunner.run() calls this."""
        bar = tqdm(range(self.start_round, self.rounds), desc="rounds", unit="round", disable=not self.progress,
                   initial=self.start_round, total=self.rounds)
        for round_idx in bar:
            result = self.run_round(round_idx)
            self.results.append(result)
            if result.evaluation is not None:
                bar.set_postfix({"mean acc": f"{result.mean_accuracy:.4f}", "train loss": f"{result.train_loss:.3f}"})
            if self.on_round_end is not None:
                self.on_round_end(result)
            if self.checkpoint_due(round_idx):
                self.checkpoint(round_idx)
        return self.results

    def checkpoint_due(self, round_idx: int) -> bool:
        """Every ``checkpoint_every`` rounds and after the last one (never when 0 or no callback)."""
        if self.checkpoint is None or self.checkpoint_every <= 0:
            return False
        return (round_idx + 1) % self.checkpoint_every == 0 or round_idx + 1 == self.rounds

    def run_round(self, round_idx: int) -> RoundResult:
        self.args.round_idx = round_idx
        sampled = sample_clients(len(self.clients), self.participation, self.seed, round_idx)
        global_params = self.server.get_model_params()
        bytes_up = bytes_down = 0
        losses = []
        client_metrics: dict[int, dict[str, float]] = {}
        for cid in sampled:
            bytes_down += self.clients[cid].download_nbytes(global_params)
        plan_up, plan_down = self.plan(round_idx, sampled, global_params)
        bytes_up += plan_up
        bytes_down += plan_down
        dropped_before = len(self.server.dropped_updates)
        self.server.begin_round()
        for cid, stats in self.local_rounds(round_idx, sampled, global_params):
            trainer = self.clients[cid]
            losses.append(stats.mean_loss)
            client_metrics[cid] = trainer.round_metrics()
            upload = trainer.local_upload()
            bytes_up += upload_nbytes(upload)
            self.server.add_local_upload(upload)
            trainer.release_unpacked_mask()  # the upload ends this client's round
        self.server.set_model_params(self.server.on_after_aggregation(self.server.end_round()))
        dropped = list(self.server.dropped_updates[dropped_before:])
        server_metrics = self.server.round_metrics()

        evaluation = None
        if (round_idx + 1) % self.eval_every == 0 or round_idx + 1 == self.rounds:
            evaluation = self.evaluate_all()
        finite = [x for x in losses if np.isfinite(x)]
        return RoundResult(round_idx=round_idx, sampled=sampled,
                           train_loss=float(np.mean(finite)) if finite else float("nan"),
                           bytes_up=bytes_up, bytes_down=bytes_down, evaluation=evaluation,
                           client_metrics=client_metrics, dropped=dropped, server_metrics=server_metrics)

    def local_rounds(self, round_idx: int, sampled: list[int], global_params: Any) -> Iterator[tuple[int, Any]]:
        """Each sampled client's local round (download, hooks, local update), in client order: one
        after the other on the shared module, each uploaded before the next starts; or, with
        ``batch_clients``, all at once in threads on their own model copies, their training calls
        batched (:mod:`fedselect.client_batching`), uploaded in client order afterwards."""
        if self.replicas is None:
            # clients done / sampled inside the round (a round of FedSelect can take a minute)
            for cid in tqdm(sampled, desc=f"round {round_idx + 1}: clients", unit="client", leave=False,
                            disable=not self.progress):
                yield cid, self.local_round(self.clients[cid], global_params)
            return
        with self.replicas.lent([self.clients[cid] for cid in sampled]):
            jobs = [(cid, functools.partial(self.local_round, self.clients[cid], global_params)) for cid in sampled]
            rendezvous = Rendezvous(max_clients=self.batch_max_clients)
            done = rendezvous.run(jobs, device=self.device)
            for key in self.batching:
                self.batching[key] += getattr(rendezvous, key)
            for cid in sampled:
                yield cid, done[cid]

    def local_round(self, trainer: Any, global_params: Any) -> Any:
        """FedML's client hooks around one local update, as its cross-silo client manager calls them."""
        trainer.set_model_params(global_params)
        trainer.on_before_local_training(None, self.device, self.args)
        stats = trainer.train(None, self.device, self.args)
        trainer.on_after_local_training(None, self.device, self.args)
        return stats

    def plan(self, round_idx: int, sampled: list[int], global_params: Any) -> tuple[int, int]:
        """The optional planning exchange of a two-phase algorithm; returns (bytes up, bytes down)."""
        if not self.server.needs_plan(round_idx):
            return 0, 0
        reports = {}
        for cid in sampled:
            trainer = self.clients[cid]
            trainer.set_model_params(global_params)
            # through JSON, as on the cross-silo wire: a non-JSON-safe report fails here too
            reports[cid] = json.loads(json.dumps(trainer.plan_report()))
        plans = self.server.plan_round(round_idx, reports)
        missing = sorted(set(sampled) - set(plans))
        if missing:
            raise RuntimeError(f"server.plan_round returned no plan for clients {missing}")
        for cid in sampled:
            self.clients[cid].receive_plan(json.loads(json.dumps(plans[cid])))
        return (sum(json_nbytes(r) for r in reports.values()),
                sum(json_nbytes(plans[c]) for c in sampled))

    def evaluate_all(self) -> dict[int, EvalResult]:
        """Every client (sampled or not) evaluates its personalized model on its own test split."""
        global_params = self.server.get_model_params()
        results = {}
        for cid, trainer in enumerate(self.clients):
            trainer.set_model_params(global_params)
            results[cid] = trainer.test(None, self.device, self.args)
        return results
