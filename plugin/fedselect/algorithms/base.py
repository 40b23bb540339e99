"""The one abstraction: partial personalization by a parameter mask, on FedML's interfaces.

Every client splits its model state into shared entries u (sent to and overwritten by the
server) and personal entries v (kept, and fine-tuned, at home) by a boolean mask per
tensor, True = personal (Pillutla et al. 2022, "Federated learning with partial model
personalization"). FedAvg is the case "nothing personal, joint SGD"; an algorithm is its
difference from FedAvg: which mask (:meth:`FedAvgClient.initial_personal_mask`, or a mask it
learns), which local schedule (:meth:`FedAvgClient.local_update`), and what happens before
evaluation (:meth:`FedAvgClient.prepare_for_evaluation`).

The client keeps only its personal values (a 1-D tensor per masked tensor) and its mask
between rounds, not a model copy: in simulation all clients share one ``nn.Module``.
The server (:class:`FedAvgServer`, :mod:`.server`) averages each entry over the clients that share it and
never reads or overwrites personal entries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedselect import client_batching
from fedselect.batched_training import TrainRequest
from fedselect.core.masks import PackedTensor, gather_masked, pack_mask, scatter_masked, true_counts, unpack_mask
from fedselect.engine import (
    ClientDataset,
    EvalResult,
    ExtraLoss,
    Pass,
    TrainableSpec,
    TrainStats,
    client_generator,
    client_global_rng,
    evaluate,
    norm_buffers,
    restore_state,
    snapshot_state,
)
from fedselect.fedml_bridge import fedml_interfaces
from fedselect.options import NoOptions

from .context import Checkpointable, Mask, RunArtifacts, RunContext, State, resolve_options
from .payload import LocalUpload, encode_upload

# the FedAvg pair, importable together (algorithms name both)
from .server import BadUpdateError, FedAvgServer

__all__ = ["BadUpdateError", "Checkpointable", "FedAvgClient", "FedAvgServer", "Mask", "RunArtifacts", "RunContext",
           "State", "resolve_options"]

ClientTrainer, _ = fedml_interfaces()

log = logging.getLogger(__name__)


class FedAvgClient(Checkpointable, ClientTrainer):
    """FedAvg's client (McMahan et al. 2017): nothing personal, E epochs of joint SGD.

    Subclasses change the hooks, never the FedML interface methods below them. Every hook
    an algorithm may override is declared here with FedAvg's behaviour, so runners call them
    unconditionally (docs/ARCHITECTURE.md, "Hooks").
    """

    # the algorithm's options dataclass (config key ``algo``), resolved once into ``self.options``
    Options: ClassVar[type] = NoOptions
    # per-client metrics (from round_metrics) summed over clients and rounds into the run
    # record as ``<name>_total``: local work always (docs/ALGORITHMS.md, "Local work")
    totaled_metrics: ClassVar[tuple[str, ...]] = ("train_sample_passes",)

    # the BatchNorm rule of every method (docs/ALGORITHMS.md, "BatchNorm statistics"): a
    # normalization layer's running statistics move only in a pass that trains one of its
    # parameters, so a part held fixed stays fixed, statistics included
    freeze_frozen_norms = True
    # round_idx seeds the next local update's random draws; the mask and personal values are v_k
    checkpoint_attributes = ("round_idx", "packed_mask", "personal_values", "mask_initialized", "last_train_stats")

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset, ctx: RunContext) -> None:
        super().__init__(model, args)
        self.id = client_id
        self.data = data
        self.ctx = ctx
        self.options = resolve_options(ctx, type(self).Options)
        self.local_sample_number = data.num_train
        self.round_idx = 0
        # between rounds a client holds only its bit-packed mask and 1-D personal values
        self.packed_mask: dict[str, PackedTensor] = {}
        self._unpacked_mask: Mask | None = None
        self._personal_counts: dict[str, int] | None = None
        self.personal_values: State = {}
        self.mask_initialized = False
        self.last_train_stats = TrainStats()
        # training sample passes (forward + backward) since the last round_metrics(): local
        # training, mask search and layer scoring alike (docs/ALGORITHMS.md, "Local work")
        self.sample_passes = 0

    @property
    def personal_mask(self) -> Mask:
        """This client's mask (True = personal), unpacked on the training device.

        Unpacked once per activity (a round's download/train/upload, or an evaluation) and
        dropped afterwards (:meth:`release_unpacked_mask`), so idle clients hold only bits.
        """
        if self._unpacked_mask is None:
            self._unpacked_mask = unpack_mask(self.packed_mask, device=self.ctx.device) if self.packed_mask else {}
        return self._unpacked_mask

    @personal_mask.setter
    def personal_mask(self, mask: Mask) -> None:
        counts = true_counts(mask)
        self.packed_mask = pack_mask({n: m for n, m in mask.items() if counts[n]})
        self._personal_counts = {n: c for n, c in counts.items() if c}
        self._unpacked_mask = None

    @property
    def personal_counts(self) -> dict[str, int]:
        """Personal entries per masked tensor (derived from the mask, counted once per mask)."""
        if self._personal_counts is None:
            self._personal_counts = true_counts(self.personal_mask)
        return self._personal_counts

    def release_unpacked_mask(self) -> None:
        self._unpacked_mask = None

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        super().load_checkpoint_state(state)
        # derived from packed_mask, rebuilt on next use
        self.release_unpacked_mask()
        self._personal_counts = None

    def round_metrics(self) -> dict[str, float]:
        """Per-client figures of this round to log: its local work, then the algorithm's own.

        Reading them ends the round's work count. Algorithms add figures through
        :meth:`algorithm_metrics`, never by overriding this.
        """
        metrics = {"train_sample_passes": float(self.sample_passes), **self.algorithm_metrics()}
        self.sample_passes = 0
        return metrics

    def algorithm_metrics(self) -> dict[str, float]:
        """The algorithm's per-client figures of the last local update (FedSelect: personal fractions)."""
        return {}

    def add_sample_passes(self, count: int) -> None:
        """Count forward + backward passes of ``count`` samples done outside :meth:`train_passes`."""
        self.sample_passes += int(count)

    # ---- hooks an algorithm overrides -------------------------------------------------
    def initial_personal_mask(self) -> Mask:
        """Which state entries stay on this client (True = personal). FedAvg: none."""
        return {}

    def local_update(self) -> TrainStats:
        """The local schedule run on the current (global + personal) model. FedAvg: joint SGD."""
        return self.train_epochs(self.ctx.config.train.local_epochs)

    def prepare_for_evaluation(self) -> None:
        """Adjust the model just before it is evaluated (FedBABU fine-tunes its head here)."""

    def plan_report(self) -> dict[str, Any]:
        """Phase 1 of a round with a planning exchange (the server's :meth:`FedAvgServer.needs_plan`):
        a JSON-safe report on the current global model (layer selection: layer scores)."""
        return {}

    def receive_plan(self, plan: dict[str, Any]) -> None:
        """Phase 2: the server's JSON-safe plan for this client's local update."""

    def upload_entries(self) -> Collection[str] | None:
        """State entries this round's upload covers (None: all; layer selection: the layers it trained).
        Personal entries are left out of whatever is named here."""
        return None

    @classmethod
    def federation_artifacts(cls, clients: Sequence[FedAvgClient], out_dir: Path) -> RunArtifacts:
        """Files and record fields made from all clients at the end of a simulated run (FedSelect:
        the clients' mask overlap); cross-silo servers hold no clients and skip this."""
        return RunArtifacts()

    # ---- helpers for algorithms ---------------------------------------------------------
    def train_epochs(self, epochs: int, trainable: TrainableSpec | None = None, *,
                     extra_loss: ExtraLoss | None = None, stream: int = 0) -> TrainStats:
        """``epochs`` passes over this client's training split, updating only ``trainable``."""
        return self.train_passes([trainable] * max(0, epochs), extra_loss=extra_loss, stream=stream)

    def train_passes(self, passes: list[Pass], *, extra_loss: ExtraLoss | None = None,
                     stream: int = 0) -> TrainStats:
        """One epoch per pass, each with its own trainable spec, one optimizer for all.

        ``stream`` separates the random draws of several calls within one round. Every sample
        trained counts towards this client's local work.
        """
        seed = self.ctx.config.seed
        request = TrainRequest(self.model, self.data.train_x, self.data.train_y, passes, optim=self.ctx.optim,
                               transform=self.ctx.transform, generator=client_generator(seed, self.id, self.round_idx,
                                                                                        stream),
                               extra_loss=extra_loss, freeze_frozen_norms=self.freeze_frozen_norms,
                               freeze_norm_stats=self.ctx.config.train.norm_stats == "frozen",
                               precision=self.ctx.config.train.precision, cuda_graphs=self.ctx.cuda_graphs,
                               identity=(seed, self.id, self.round_idx, stream))
        # in a batched round (train.client_batching) the call meets the other clients' calls
        stats = client_batching.train(request)
        self.sample_passes += stats.samples
        return stats

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> EvalResult:
        """The current model's per-sample accuracy and loss on (x, y), in the run's precision."""
        return evaluate(self.model, x, y, transform=self.ctx.transform, precision=self.ctx.config.train.precision)

    def state_entries(self) -> State:
        """Parameters and buffers by name: the entries a mask may cover."""
        return dict(self.model.state_dict(keep_vars=False))

    def full_mask(self, names: list[str] | None = None) -> Mask:
        """All entries of the named tensors (default: all state) personal."""
        state = self.state_entries()
        return {n: torch.ones_like(state[n], dtype=torch.bool) for n in (names if names is not None else state)}

    # ---- FedML ClientTrainer interface ----------------------------------------------------
    def set_model_params(self, model_parameters: Mapping[str, torch.Tensor]) -> None:
        """Take the global values on shared entries; keep personal entries as they were.

        The module may be shared by all simulated clients, so nothing of its current content
        is trusted: global values first, then this client's stored personal values on top. A
        personal entry without a stored value yet (before the first local update) starts from
        the global value, i.e. the common initialization.
        """
        self.ensure_personal_mask()
        with torch.no_grad():
            state = self.model.state_dict(keep_vars=True)
            for name, value in model_parameters.items():
                if name not in state:
                    raise KeyError(f"global model has tensor '{name}' the client model lacks")
                if name not in self.personal_values:
                    state[name].copy_(value)
            mask = self.personal_mask
            for name, values in self.personal_values.items():
                # the global values (if sent) with this client's personal ones on top: state[name][mask] = values
                scatter_masked(state[name], mask[name], values, base=model_parameters.get(name))

    def ensure_personal_mask(self) -> None:
        if not self.mask_initialized:
            mask = {n: m.to(self.ctx.device) for n, m in self.initial_personal_mask().items()}
            if self.ctx.config.train.norm_buffers == "personal":
                # FedBN (Li et al. 2021) and the FedSelect release: statistics never leave the client
                mask.update({n: torch.ones_like(b, dtype=torch.bool, device=self.ctx.device)
                             for n, b in norm_buffers(self.model).items()})
            self.personal_mask = mask
            self.mask_initialized = True

    def get_model_params(self) -> dict[str, Any]:
        """The upload on the wire (cross-silo): this client's shared entries (and its mask where it is
        element-wise), encoded."""
        local = self.local_upload()
        upload = encode_upload(local.state, local.personal_mask, client_id=self.id,
                               num_samples=self.local_sample_number)
        self.release_unpacked_mask()  # the upload ends this client's round
        return upload

    def local_upload(self) -> LocalUpload:
        """The upload in simulation: live references to the state entries this round's upload covers,
        and the mask; the server adds it to its average before the next client touches the module.
        The caller ends the round with :meth:`release_unpacked_mask`."""
        state = self.state_entries()
        names = self.upload_entries()
        if names is not None:
            state = {n: state[n] for n in names}
        return LocalUpload(client_id=self.id, num_samples=self.local_sample_number, state=state,
                           personal_mask=self.personal_mask, personal_counts=self.personal_counts)

    def train(self, train_data: Any, device: Any, args: Any) -> TrainStats:
        self.ensure_personal_mask()
        # a batched round's client threads leave the process-wide generator alone: its batched
        # calls seed it themselves (fedselect.client_batching)
        rng = (nullcontext() if client_batching.active_rendezvous() is not None
               else client_global_rng(self.ctx.config.seed, self.id, self.round_idx, self.ctx.device))
        with rng:
            self.last_train_stats = self.local_update()
        self.save_personal_values()
        self.round_idx += 1
        return self.last_train_stats

    def save_personal_values(self) -> None:
        """Keep only the personal entries of the trained model (1-D per tensor)."""
        state = self.state_entries()
        counts = self.personal_counts
        self.personal_values = {name: gather_masked(state[name].detach(), mask, counts[name])
                                for name, mask in self.personal_mask.items()}

    def personal_state_nbytes(self) -> int:
        """Bytes this client keeps between rounds: personal values plus packed mask bits."""
        return (sum(v.numel() * v.element_size() for v in self.personal_values.values())
                + sum(p.bits.numel() for p in self.packed_mask.values()))

    def test(self, test_data: Any, device: Any, args: Any) -> EvalResult:
        """Per-sample accuracy of this client's personalized model on its own test split.

        An algorithm that changes the model before evaluation (``prepare_for_evaluation``:
        FedBABU's fine-tuning, Ditto's personal model) changes a module every simulated client
        shares, so its whole state is saved first and written back, bit for bit, afterwards.
        """
        self.release_unpacked_mask()
        if type(self).prepare_for_evaluation is FedAvgClient.prepare_for_evaluation:
            return self.evaluate(self.data.test_x, self.data.test_y)
        saved = snapshot_state(self.model)
        round_passes = self.sample_passes
        try:
            with client_global_rng(self.ctx.config.seed, self.id, self.round_idx, self.ctx.device, stream=1):
                self.prepare_for_evaluation()
            result = self.evaluate(self.data.test_x, self.data.test_y)
            # evaluation-time adaptation (FedBABU's fine-tuning) is reported with the evaluation,
            # not as training work of the round
            return dataclasses.replace(result, adapt_sample_passes=self.sample_passes - round_passes)
        finally:
            self.sample_passes = round_passes
            restore_state(self.model, saved)

    def download_nbytes(self, global_state: Mapping[str, torch.Tensor]) -> int:
        """Bytes of the global values this client needs: its shared entries, plus, before its
        first local update, the initial values of its personal entries."""
        self.ensure_personal_mask()
        counts = self.personal_counts
        total = 0
        for name, value in global_state.items():
            needs_init = name not in self.personal_values
            shared = value.numel() - (0 if needs_init else counts.get(name, 0))
            total += shared * value.element_size()
        return total
