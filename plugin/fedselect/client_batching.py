"""Clients of a simulated round trained side by side, their training calls batched (``train.client_batching``).

The simulation runs each sampled client's local round (download, hooks, local update) in its own
thread, on its own copy of the model (:class:`ModelReplicas`). Whenever a client's algorithm asks
for training (:meth:`fedselect.algorithms.base.FedAvgClient.train_passes`), its thread hands the
call to the round's :class:`Rendezvous` and waits. Once every client still working is waiting,
the main thread trains the waiting calls, those of one :func:`batch_signature` as one batch
(:func:`fedselect.batched_training.train_together`), each other call alone, in client order,
and lets the threads go on. So an algorithm's own code (GradLTN's selections between its
training runs, LocalAlt's two parts, FedRep's head and body) runs unchanged, and clients that do
the same thing train together: every FedSelect client of a round runs GradLTN's L training
calls and LocalAlt in the same order.

Only one thread works on the GPU at a time between meetings; the GIL does not matter because
the work between meetings is small against the batched training. The server adds the clients'
uploads in client order after the threads end, so a round's result does not depend on which
thread finished first. Dropout's draws come from the global generator: a batched call seeds it
from its clients (client threads do not touch it), so a run is repeatable but not the same as
sequential training (nor is a batched call bit for bit: see :mod:`fedselect.batched_training`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedselect.batched_training import TrainRequest, batch_signature, train_together
from fedselect.engine import TrainStats

_local = threading.local()


def active_rendezvous() -> Rendezvous | None:
    """The rendezvous of the client thread calling this; None outside a batched round."""
    return getattr(_local, "rendezvous", None)


def train(request: TrainRequest) -> TrainStats:
    """A client's training call: through the round's rendezvous in a batched round, else directly."""
    rendezvous = active_rendezvous()
    return request.run_alone() if rendezvous is None else rendezvous.submit(request)


class Rendezvous:
    """Where a round's client threads meet to have their training calls run together."""

    def __init__(self, group: Callable[[list[TrainRequest]], list[TrainStats]] = train_together, *,
                 max_clients: int = 0) -> None:
        self._group = group
        # at most this many calls per batch (0: all of a signature), bounding the stacks' memory
        self.max_clients = max_clients
        self._cond = threading.Condition()
        self._live = 0
        self._pending: dict[int, TrainRequest] = {}
        self._results: dict[int, TrainStats | BaseException] = {}
        # how the round's training calls were trained (the run record's client_batching figures)
        self.meetings = 0
        self.batched_calls = 0
        self.calls_in_batches = 0
        self.calls_alone = 0

    def run(self, jobs: Sequence[tuple[int, Callable[[], Any]]], device: torch.device | str = "cpu") -> dict[int, Any]:
        """Run each (client id, job) in its own thread; train their calls here; each job's result.

        ``device``: the run's device, made each thread's current CUDA device. A job's exception is
        raised here (the lowest client id's first) once every thread ended.
        """
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        self._live = len(jobs)
        device = torch.device(device)
        threads = [threading.Thread(target=self._worker, args=(cid, job, results, errors, device), daemon=True,
                                    name=f"fedselect-client-{cid}") for cid, job in jobs]
        for thread in threads:
            thread.start()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._pending) == self._live)
                if self._live == 0:
                    break
                waiting = sorted(self._pending.items())
                self._pending.clear()
            outcome = self._train(waiting)
            with self._cond:
                self._results.update(outcome)
                self._cond.notify_all()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[min(errors)]
        return results

    def submit(self, request: TrainRequest) -> TrainStats:
        """Called from a client thread: wait until the main thread has trained this call."""
        cid = _local.client_id
        with self._cond:
            self._pending[cid] = request
            self._cond.notify_all()
            self._cond.wait_for(lambda: cid in self._results)
            outcome = self._results.pop(cid)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _worker(self, cid: int, job: Callable[[], Any], results: dict[int, Any],
                errors: dict[int, BaseException], device: torch.device) -> None:
        _local.rendezvous, _local.client_id = self, cid
        try:
            if device.type == "cuda" and device.index is not None:  # a new thread's current device is cuda:0
                torch.cuda.set_device(device)
            results[cid] = job()
        except BaseException as exc:  # handed to the main thread, raised there
            errors[cid] = exc
        finally:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()

    def _train(self, waiting: list[tuple[int, TrainRequest]]) -> dict[int, TrainStats | BaseException]:
        """The waiting calls: those of one signature together (``max_clients`` at a time), the rest
        alone, in client order."""
        self.meetings += 1
        groups: dict[Any, list[tuple[int, TrainRequest]]] = {}
        outcome: dict[int, TrainStats | BaseException] = {}
        for cid, request in waiting:
            try:
                key = batch_signature(request)
            except Exception as exc:  # noqa: BLE001 - a bad call fails its own client, in its thread
                outcome[cid] = exc
                continue
            groups.setdefault(("alone", cid) if key is None else key, []).append((cid, request))
        size = self.max_clients or len(waiting)
        batches = [members[i:i + size] for members in groups.values() for i in range(0, len(members), size)]
        for members in batches:
            try:
                stats = self._group([r for _, r in members])
            except Exception as exc:  # noqa: BLE001 - raised in each member's thread
                outcome.update({cid: exc for cid, _ in members})
                continue
            if len(members) > 1:
                self.batched_calls += 1
                self.calls_in_batches += len(members)
            else:
                self.calls_alone += 1
            outcome.update({cid: s for (cid, _), s in zip(members, stats, strict=True)})
        return outcome


class ModelReplicas:
    """One copy of the run's model per client trained in a round (the simulation shares one module)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.copies: list[nn.Module] = []

    @contextmanager
    def lent(self, trainers: Sequence[Any]) -> Iterator[None]:
        """Each trainer works on its own copy inside the block, on the shared module again after it.

        A trainer keeps its state in its mask and personal values, not in the module, and
        ``set_model_params`` writes every entry, so a copy's stale content is never read.
        """
        while len(self.copies) < len(trainers):
            self.copies.append(copy.deepcopy(self.model))
        for trainer, replica in zip(trainers, self.copies, strict=False):
            trainer.model = replica
        try:
            yield
        finally:
            for trainer in trainers:
                trainer.model = self.model
