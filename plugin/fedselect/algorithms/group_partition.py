"""A fixed personal/shared partition of the model by layer groups: FedAlt and LG-FedAvg.

Both baselines split the model once, by layer group, into a personal part v_k that never leaves
the client and a shared part u that is averaged; they differ in two settings
(:class:`PartitionSetting`): whether the configured groups are the personal or the shared part,
and whether the local schedule is LocalAlt (FedAlt, Pillutla et al. 2022, Alg. 1) or FedAvg's
joint SGD (LG-FedAvg, Liang et al. 2020, Alg. 1). :class:`GroupPartitionClient` implements both;
:mod:`fedselect.algorithms.fedalt` and :mod:`fedselect.algorithms.lg_fedavg` declare their
options (a :class:`GroupOptions` dataclass carrying its setting) and register the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fedselect.engine import ClientDataset, TrainStats
from fedselect.options import ConfigError

from .base import FedAvgClient, Mask, RunContext
from .parts import entries_of_params, group_param_names, train_localalt

__all__ = ["GroupOptions", "GroupPartitionClient", "PartitionSetting"]


@dataclass(frozen=True)
class PartitionSetting:
    """How an algorithm reads its layer-group option and trains.

    ``groups_key``: the option (under ``algo:``) naming the layer groups.
    ``groups_personal``: True, the named groups are personal and the rest shared (FedAlt);
    False, the named groups are shared and the rest, BatchNorm statistics included, personal
    (LG-FedAvg).
    ``localalt``: True, LocalAlt with the option ``localalt_epoch``; False, joint SGD.
    """

    groups_key: str
    groups_personal: bool
    localalt: bool

    @property
    def key(self) -> str:
        return f"algo.{self.groups_key}"

    def check_names(self, groups: Sequence[str]) -> None:
        """At least one layer group, none twice (a ConfigError naming the key)."""
        if not groups:
            # FedAlt with nothing personal is FedAvg; LG-FedAvg with nothing shared is 'local'
            empty = "personal the run is 'fedavg'" if self.groups_personal else "shared the run is 'local'"
            raise ConfigError(f"config key '{self.key}' must name at least one layer group (with nothing {empty})")
        if len(set(groups)) != len(groups):
            raise ConfigError(f"config key '{self.key}' names a group twice: {list(groups)}")

    def check_coverage(self, named: set[str], state: set[str]) -> None:
        """The named groups' entries must leave the other part non-empty."""
        if not state - named:
            # FedAlt with nothing shared is 'local'; LG-FedAvg with nothing personal is FedAvg
            rest = "shared (that is 'local')" if self.groups_personal else "personal (that is FedAvg)"
            raise ConfigError(f"config key '{self.key}' covers the whole model: nothing is {rest}")


class GroupOptions:
    """Base of a group-partition algorithm's options dataclass: its ``partition`` setting, and
    the check of the layer groups it names (when the config is validated)."""

    partition: ClassVar[PartitionSetting]

    def __post_init__(self) -> None:
        self.partition.check_names(getattr(self, self.partition.groups_key))


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
