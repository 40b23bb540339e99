"""LotteryFL (Li et al. 2021): personal sparse subnetworks found by iterative magnitude pruning.

Li, Sun, Wang, Duan, Li, Chen, Li, "LotteryFL: Personalized and Communication-Efficient Federated
Learning with Lottery Ticket Hypothesis on Non-IID Datasets", arXiv:2008.03371 (published as
"LotteryFL: Empower Edge Intelligence with Personalized and Communication-Efficient Federated
Learning", IEEE/ACM SEC 2021), Alg. 1. A sampled client k:

1. applies its mask to the received global model: theta_k = theta_g * m_k;
2. evaluates theta_k locally; if the accuracy reaches ``acc_threshold`` and its sparsity is
   below ``target_sparsity``, prunes a fraction ``prune_rate`` of its remaining weights of
   smallest magnitude and resets the remaining ones to the initial values theta_0 * m_k (the
   lottery-ticket rewind);
3. trains theta_k for E epochs with pruned entries frozen at zero (masked SGD);
4. uploads only its unpruned entries; the server averages each entry over the clients that kept it.

On the mask mechanism: the personal mask is the set of pruned entries (True = pruned). Pruned
entries are therefore never uploaded, never averaged and never overwritten by the broadcast;
their stored "personal value" is zero, so the personalized model is exactly theta_g * m_k. The
upload is base's partial-tensor payload: unpruned values plus the bit-packed mask.

Differences from the released code, on purpose: pruning is an exact top-k per tensor that stops
exactly at ``target_sparsity`` (the released percentile rule overshoots it, as its README notes);
the accuracy that gates pruning is measured on the local *training* split, because this
framework's clients hold no validation split and the released code's use of local test batches
would leak test data into training decisions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedselect.core.masks import target_count
from fedselect.core.topk import topk_mask
from fedselect.engine import ClientDataset, TrainStats
from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer, Mask, RunContext, State
from .lotteryfl_options import LotteryFLOptions


def prunable_names(model: nn.Module) -> list[str]:
    """Weight tensors of convolutions and linear layers (at least 2-D); biases and norms are kept.

    The lottery-ticket procedure LotteryFL builds on prunes layer weights only (its released
    code skips biases); normalization scales are 1-D and kept for the same reason.
    """
    return [name for name, param in model.named_parameters() if param.dim() >= 2]


class LotteryFLClient(FedAvgClient):
    """LotteryFL's client: a growing pruning mask, masked SGD, sparse uploads.

    theta_0 (``initial_params``) is taken from the module when the client is built, before any
    training, so it is the common initialization. It is not checkpointed: a resumed run rebuilds
    the common initialization from the seed before it builds its clients.
    """

    Options = LotteryFLOptions

    checkpoint_attributes = ("prune_steps", "sparsity_history")

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset,
                 ctx: RunContext) -> None:
        super().__init__(model, args, client_id=client_id, data=data, ctx=ctx)
        # theta_0, the rewind target: one read-only copy per run, shared by its clients
        if "lotteryfl.theta_0" not in ctx.shared:
            ctx.shared["lotteryfl.theta_0"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.initial_params: State = ctx.shared["lotteryfl.theta_0"]
        self.prunable = prunable_names(model)
        self.prune_steps = 0
        self.sparsity_history: list[float] = []

    def initial_personal_mask(self) -> Mask:
        # nothing is pruned before the first pruning step
        return {}

    def pruned_counts(self, mask: Mask | None = None) -> dict[str, int]:
        """Pruned entries per prunable tensor."""
        mask = self.personal_mask if mask is None else mask
        return {name: int(mask[name].sum()) if name in mask else 0 for name in self.prunable}

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable weights that this client has pruned."""
        params = dict(self.model.named_parameters())
        total = sum(params[name].numel() for name in self.prunable)
        return sum(self.pruned_counts().values()) / total if total else 0.0

    def below_target(self, options: LotteryFLOptions) -> bool:
        params = dict(self.model.named_parameters())
        return any(count < target_count(params[name].numel(), options.target_sparsity)
                   for name, count in self.pruned_counts().items())

    def prune(self, options: LotteryFLOptions) -> None:
        """One magnitude-pruning step per tensor (Li et al. 2021, Alg. 1): ``prune_rate`` of the
        unpruned weights with the smallest |value|, never past ``target_sparsity``."""
        mask = self.personal_mask
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in self.prunable:
                weight = state[name]
                pruned = mask.get(name, torch.zeros_like(weight, dtype=torch.bool))
                have = int(pruned.sum())
                room = target_count(weight.numel(), options.target_sparsity) - have
                # at least one entry per step, so small tensors reach the target too
                k = min(room, max(1, target_count(weight.numel() - have, options.prune_rate)))
                if k <= 0:
                    continue
                new = topk_mask(-weight.detach().abs(), k, within=~pruned)
                mask[name] = pruned | new
                weight.masked_fill_(new, 0.0)
        self.personal_mask = mask
        self.prune_steps += 1

    def rewind(self) -> None:
        """Every parameter back to theta_0, pruned entries at zero: the lottery-ticket reset.

        Biases and normalization scales are rewound too, as the released code does; BatchNorm
        running statistics are not parameters and keep their received values.
        """
        initial = self.initial_params
        mask = self.personal_mask
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                value = initial[name].to(param.device)
                if name in mask:
                    value = value.masked_fill(mask[name], 0.0)
                param.copy_(value)

    def local_update(self) -> TrainStats:
        """Li et al. 2021, Alg. 1 (client): maybe prune and rewind, then E epochs of masked SGD."""
        options = self.options
        if self.below_target(options):
            accuracy = self.evaluate(self.data.train_x, self.data.train_y).accuracy
            if accuracy >= options.acc_threshold:
                self.prune(options)
                if options.reset_to_init:
                    self.rewind()
        mask = self.personal_mask
        trainable = {name: (~mask[name] if name in mask else None) for name, _ in self.model.named_parameters()}
        stats = self.train_epochs(self.ctx.config.train.local_epochs, trainable)
        self.sparsity_history.append(self.sparsity)
        return stats

    def algorithm_metrics(self) -> dict[str, float]:
        return {"sparsity": self.sparsity, "prune_steps": float(self.prune_steps)}


register("lotteryfl", client=LotteryFLClient, server=FedAvgServer)
