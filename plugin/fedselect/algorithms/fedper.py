"""FedPer (Arivazhagan et al. 2019): a personal classifier head, joint local SGD.

Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
arXiv:1912.00818. The base layers are federated as in FedAvg; the last ("personalization")
layers never leave the client. On the mask mechanism: personal = the head's state entries,
local schedule = FedAvg's E epochs of joint SGD over the whole model.

This module also holds the helpers that the other fixed-partition baselines (FedRep, LG-FedAvg,
FedBABU, FedAlt) share: which state entries form a part of the model, training one part with
everything else bit-identical, and reading an algorithm's options from the run context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn

from fedselect.options import ConfigError
from fedselect.engine import ExtraLoss, TrainStats
from fedselect.models import head_param_names, layer_groups

from .base import FedAvgClient, FedAvgServer, Mask
from .registry import register

__all__ = [
    "FedPerClient",
    "entries_of_params",
    "group_param_names",
    "head_entries",
    "snapshot_state",
    "restore_state",
    "train_part",
]

OptionsT = TypeVar("OptionsT")


def entries_of_params(model: nn.Module, param_names: Iterable[str]) -> list[str]:
    """State entries of a part of the model: the given parameters plus the buffers of their modules.

    BatchNorm's running statistics describe the features their layer sees, so they belong to the
    same part as that layer's affine parameters (a personal BN layer keeps personal statistics).
    """
    wanted = set(param_names)
    all_params = {name for name, _ in model.named_parameters()}
    unknown = wanted - all_params
    if unknown:
        raise KeyError(f"model has no parameter '{sorted(unknown)[0]}'")
    owners = {name.rpartition(".")[0] for name in wanted}
    return [name for name in model.state_dict()
            if name in wanted or (name not in all_params and name.rpartition(".")[0] in owners)]


def head_entries(model: nn.Module) -> list[str]:
    """State entries of the model's classifier head (its registered ``head`` layer group)."""
    return entries_of_params(model, head_param_names(model))


def group_param_names(model: nn.Module, groups: Sequence[str], key: str) -> list[str]:
    """Parameter names of the named layer groups; an unknown name is a ConfigError naming ``key``."""
    by_name = {g.name: g for g in layer_groups(model)}
    names: list[str] = []
    for group in groups:
        if group not in by_name:
            raise ConfigError(f"config key '{key}' names unknown layer group {group!r} "
                              f"(the model's groups: {', '.join(by_name)})")
        names.extend(by_name[group].param_names)
    return names


def snapshot_state(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the named state entries (default: all of them)."""
    state = model.state_dict()
    keys = state.keys() if names is None else names
    return {name: state[name].detach().clone() for name in keys}


def restore_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write a :func:`snapshot_state` back in place, bit for bit."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in saved.items():
            state[name].copy_(value)


def train_part(client: FedAvgClient, epochs: int, entries: Iterable[str], *, stream: int = 0,
               extra_loss: ExtraLoss | None = None) -> TrainStats:
    """``epochs`` of SGD on the parameters among ``entries``; every other entry stays bit-identical.

    The engine freezes parameters outside the trainable spec, but forward passes in train mode
    still move the running statistics of frozen BatchNorm layers. A phase that trains one part
    (FedRep's head epochs, a LocalAlt pass) must leave the other part untouched, so the buffers
    outside ``entries`` are restored after training.
    """
    model = client.model
    part = set(entries)
    spec = {name: None for name, _ in model.named_parameters() if name in part}
    frozen = snapshot_state(model, [name for name, _ in model.named_buffers() if name not in part])
    stats = client.train_epochs(epochs, spec, stream=stream, extra_loss=extra_loss)
    restore_state(model, frozen)
    return stats


class FedPerClient(FedAvgClient):
    """FedPer's client (Arivazhagan et al. 2019, Sec. 3): the head is personal, SGD is joint.

    The paper keeps the top ("personalization") layers local; the FedSelect paper
    (arXiv:2306.13264, Table 1) runs FedPer with the classifier head as the personal part, which
    is what :func:`fedselect.models.head_param_names` names for every registered model.
    """

    def initial_personal_mask(self) -> Mask:
        return self.full_mask(head_entries(self.model))


register("fedper", client=FedPerClient, server=FedAvgServer,
         summary="personal classifier head, shared body; E epochs of joint SGD (Arivazhagan et al. 2019)")
