"""Ditto (Li et al. 2021): a whole personal model per client, pulled toward the global one.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021, arXiv:2012.04221, Alg. 1. Each sampled client k, given the global model w^t:

* global update: local SGD on w from w^t, exactly FedAvg's client update; w_k is uploaded and
  averaged as in FedAvg;
* personal update: SGD on its own model v_k for the objective
  F_k(v) + lambda/2 ||v - w^t||^2 (the proximal term is to the *received* w^t, Alg. 1 line 7).

The two updates are independent given w^t, so their order does not matter; here the personal
update runs first so that the module ends the round holding w_k, ready for the upload.
Evaluation uses v_k. On the mask mechanism nothing is personal (uploads and downloads are
FedAvg's, byte for byte); v_k is extra client state kept as one flat tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedselect.core.work import split_local_epochs
from fedselect.engine import ClientDataset, ExtraLoss, TrainStats, restore_state, snapshot_state
from fedselect.options import ConfigError
from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer, RunContext
from .ditto_options import DittoOptions

# generator stream of the personal update, independent of the global update's draws
PERSONAL_STREAM = 1


def flatten_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Floating-point entries of ``state`` as one 1-D tensor (state order)."""
    floats = [v.detach().reshape(-1) for v in state.values() if v.is_floating_point()]
    if not floats:
        return torch.zeros(0)
    dtype = floats[0].dtype
    return torch.cat([v.to(dtype) for v in floats])


def load_flat_state(model: nn.Module, flat: torch.Tensor) -> None:
    """Inverse of :func:`flatten_state` on ``model``'s state (integer buffers untouched)."""
    offset = 0
    with torch.no_grad():
        for value in model.state_dict(keep_vars=True).values():
            if not value.is_floating_point():
                continue
            n = value.numel()
            value.copy_(flat[offset:offset + n].view_as(value))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat state has {flat.numel()} values, the model has {offset}")


def proximal_term(model: nn.Module, reference: dict[str, torch.Tensor], lam: float) -> ExtraLoss:
    """lam/2 * ||v - w||^2 over the parameters: the regularizer of Ditto's personal objective (Eq. 2)."""
    pairs = [(param, reference[name]) for name, param in model.named_parameters()]

    def loss(_: nn.Module) -> torch.Tensor:
        return 0.5 * lam * sum(((p - w) ** 2).sum() for p, w in pairs)

    return loss


class DittoClient(FedAvgClient):
    """Ditto's client: FedAvg's global update plus a proximally regularized personal model v_k."""

    Options = DittoOptions

    checkpoint_attributes = ("personal_flat", "personal_counters")

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset,
                 ctx: RunContext) -> None:
        super().__init__(model, args, client_id=client_id, data=data, ctx=ctx)
        # v_k: float state entries, flat; integer counters (BatchNorm's) are kept apart
        self.personal_flat: torch.Tensor | None = None
        self.personal_counters: dict[str, torch.Tensor] = {}
        options = self.options
        epochs = ctx.config.train.local_epochs
        both_unset = options.global_epochs is None and options.personal_epochs is None
        try:
            # resolved now, so a split that does not fit train.local_epochs fails before round 1
            self.global_epochs, self.personal_epochs = split_local_epochs(
                epochs, math.ceil(epochs / 2) if both_unset else options.global_epochs, options.personal_epochs)
        except ValueError as exc:
            raise ConfigError(f"config keys 'algo.global_epochs'/'algo.personal_epochs': {exc}") from None

    def load_personal_model(self) -> None:
        """Put v_k into the module (no-op before this client's first local update)."""
        if self.personal_flat is None:
            return
        load_flat_state(self.model, self.personal_flat)
        restore_state(self.model, self.personal_counters)

    def save_personal_model(self) -> None:
        state = self.state_entries()
        self.personal_flat = flatten_state(state).clone()
        self.personal_counters = {n: v.clone() for n, v in state.items() if not v.is_floating_point()}

    def local_update(self) -> TrainStats:
        """Ditto, Alg. 1 lines 5-9: the personal update of v_k toward w^t, then FedAvg's update of w.

        v_k starts from the first global model this client trains on (w^0 under full
        participation; Alg. 1 initializes v_k = w^0 for every client).
        """
        options = self.options
        received = snapshot_state(self.model)

        self.load_personal_model()
        prox = proximal_term(self.model, received, options.lam) if options.lam > 0 else None
        self.train_epochs(self.personal_epochs, extra_loss=prox, stream=PERSONAL_STREAM)
        self.save_personal_model()

        restore_state(self.model, received)
        # the round's reported loss is the global model's, as for every other method
        return self.train_epochs(self.global_epochs)

    def prepare_for_evaluation(self) -> None:
        """Evaluate v_k (the global model for a client that never trained); the base restores the state."""
        if self.personal_flat is not None:
            self.load_personal_model()


register("ditto", client=DittoClient, server=FedAvgServer)
