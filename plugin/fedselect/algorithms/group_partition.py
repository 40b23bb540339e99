"""A fixed personal/shared partition of the model by layer groups: FedAlt and LG-FedAvg.

Both baselines split the model once, by layer group, into a personal part v_k that never leaves
the client and a shared part u that is averaged; they differ in two settings
(:class:`PartitionSetting`): whether the configured groups are the personal or the shared part,
and whether the local schedule is LocalAlt (FedAlt, Pillutla et al. 2022, Alg. 1) or FedAvg's
joint SGD (LG-FedAvg, Liang et al. 2020, Alg. 1). :class:`GroupPartitionClient` implements both;
:mod:`fedselect.algorithms.fedalt` and :mod:`fedselect.algorithms.lg_fedavg` register the client;
their options (a :class:`GroupOptions` dataclass carrying its setting) are in
:mod:`fedselect.algorithms.group_options`, which imports no torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedselect.engine import ClientDataset, TrainStats

from .base import FedAvgClient, Mask, RunContext
from .group_options import GroupOptions, PartitionSetting
from .parts import entries_of_params, group_param_names, train_localalt

__all__ = ["GroupOptions", "GroupPartitionClient", "PartitionSetting"]


class GroupPartitionClient(FedAvgClient):
    """A fixed layer-wise mask from the options' layer groups, trained by LocalAlt or joint SGD.

    Subclasses set ``Options`` (a :class:`GroupOptions` dataclass); the partition is resolved in
    ``__init__``, so a bad group name fails before the first round.
    """

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset,
                 ctx: RunContext) -> None:
        super().__init__(model, args, client_id=client_id, data=data, ctx=ctx)
        setting: PartitionSetting = self.options.partition
        groups = getattr(self.options, setting.groups_key)
        named = set(entries_of_params(model, group_param_names(model, groups, setting.key)))
        state = list(model.state_dict())
        personal = named if setting.groups_personal else set(state) - named
        self.personal_entries = [name for name in state if name in personal]
        self.shared_entries = [name for name in state if name not in personal]
        setting.check_coverage(named, set(state))

    def initial_personal_mask(self) -> Mask:
        return self.full_mask(self.personal_entries)

    def local_update(self) -> TrainStats:
        """FedAlt: Pillutla et al. 2022, Alg. 1 (LocalAlt), per epoch v_k with u fixed, then u with
        v_k fixed. LG-FedAvg: Liang et al. 2020, Alg. 1, E epochs of joint SGD (FedAvg's update)."""
        if not self.options.partition.localalt:
            return super().local_update()
        personal = set(self.personal_entries)
        mask = {name: torch.full_like(param, name in personal, dtype=torch.bool)
                for name, param in self.model.named_parameters()}
        return train_localalt(self, mask, self.options.localalt_epoch)
