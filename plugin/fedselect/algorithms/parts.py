"""Parts of a model that the fixed-partition algorithms share, and how to train one part.

A *part* is a set of state entries: parameters plus the buffers of their modules (BatchNorm's
running statistics belong to the part of their layer's affine parameters). The helpers here name
parts (the classifier head, named layer groups) and train one part while every other entry
stays bit-identical (snapshots of state entries: ``engine.snapshot_state``/``restore_state``):
the toolbox of FedPer, FedRep, LG-FedAvg, FedBABU, FedAlt, Ditto, FedSelect and layer selection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from torch import nn

from fedselect.core.localalt import localalt_epochs
from fedselect.core.masks import Mask
from fedselect.engine import ExtraLoss, SplitEpoch, TrainStats, restore_state, snapshot_state
from fedselect.models import head_param_names, layer_groups
from fedselect.options import ConfigError

if TYPE_CHECKING:
    from .base import FedAvgClient

__all__ = [
    "entries_of_params",
    "group_param_names",
    "head_entries",
    "train_localalt",
    "train_part",
]


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


def train_localalt(client: FedAvgClient, personal: Mask, mode: str) -> TrainStats:
    """LocalAlt (Pillutla et al. 2022, Alg. 1) for ``train.local_epochs`` epochs on ``personal``
    (a mask over every parameter): per epoch, v_k with u fixed, then u with v_k fixed.

    The one LocalAlt of FedAlt and FedSelect, which differ only in their masks; ``mode`` is
    :data:`fedselect.core.localalt.EPOCH_MODES`. The phases share one optimizer whose momentum is
    masked per entry (:class:`fedselect.engine.MaskedSGD`), so the part held fixed neither moves
    nor gathers momentum; normalization layers whose parameters are all fixed in a phase keep
    their statistics (the base class's BatchNorm rule).
    """
    epochs = localalt_epochs(personal, client.ctx.config.train.local_epochs, mode=mode)
    return client.train_passes([SplitEpoch(phases) if len(phases) > 1 else phases[0] for phases in epochs])
