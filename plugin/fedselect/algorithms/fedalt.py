"""FedAlt (Pillutla et al. 2022): a fixed personal/shared partition trained by LocalAlt.

Pillutla, Malik, Mohamed, Rabbat, Sanjabi, Xiao, "Federated Learning with Partial Model
Personalization", ICML 2022, arXiv:2204.03809, Alg. 1 (FedAlt). The model is split into shared
u and personal v_k once, by layer; each local epoch is one full pass updating only v_k (u
fixed), then one full pass updating only u (v_k fixed). Only u is uploaded and averaged.
On the mask mechanism: personal = the configured layer groups, schedule =
:func:`fedselect.core.localalt.localalt_passes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fedselect.options import ConfigError
from fedselect.core.localalt import localalt_epochs
from fedselect.engine import ClientDataset, SplitEpoch, TrainStats

from .base import FedAvgClient, FedAvgServer, Mask, RunContext
from .fedper import entries_of_params, group_param_names
from .registry import register


@dataclass(frozen=True)
class FedAltOptions:
    """The fixed personal part, by layer-group name.

    ``personal_groups``: ("head",), the output-layer split of Pillutla et al. 2022 (Sec. 5 studies
    input-layer, output-layer and adapter splits; the FedSelect paper, arXiv:2306.13264, runs
    FedAlt with the classifier head personal). Any other fixed set of the model's layer groups
    (:func:`fedselect.models.layer_groups`, e.g. ["stem"] for the input-layer split) may be named.
    Local epochs are ``train.local_epochs`` (5 in the FedSelect paper for every method);
    ``localalt_epoch`` says how one epoch is spent (:data:`fedselect.core.localalt.EPOCH_MODES`):
    "split" (default, equal local work) trains v on the first half of the epoch's shuffled
    samples and u on the second half; "two_passes" is a full pass over v, then over u.
    """

    personal_groups: tuple[str, ...] = ("head",)
    localalt_epoch: Literal["split", "two_passes"] = "split"

    def __post_init__(self) -> None:
        if not self.personal_groups:
            raise ConfigError("config key 'algo.personal_groups' must name at least one layer group "
                              "(with nothing personal the run is 'fedavg')")
        if len(set(self.personal_groups)) != len(self.personal_groups):
            raise ConfigError(f"config key 'algo.personal_groups' names a group twice: "
                              f"{list(self.personal_groups)}")


class FedAltClient(FedAvgClient):
    """FedAlt's client: a fixed layer-wise mask and the LocalAlt schedule."""

    Options = FedAltOptions

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset,
                 ctx: RunContext) -> None:
        super().__init__(model, args, client_id=client_id, data=data, ctx=ctx)
        options = self.options
        # resolved now, so a bad group name fails before the first round
        personal = set(entries_of_params(model, group_param_names(model, options.personal_groups,
                                                                  "algo.personal_groups")))
        self.personal_entries = [name for name in model.state_dict() if name in personal]
        self.shared_entries = [name for name in model.state_dict() if name not in personal]
        if not self.shared_entries:
            raise ConfigError("config key 'algo.personal_groups' covers the whole model: nothing is shared "
                              "(that is 'local')")

    def initial_personal_mask(self) -> Mask:
        return self.full_mask(self.personal_entries)

    def local_update(self) -> TrainStats:
        """Pillutla et al. 2022, Alg. 1 (LocalAlt): per epoch, v_k with u fixed, then u with v_k fixed."""
        personal = set(self.personal_entries)
        mask = {name: torch.full_like(param, name in personal, dtype=torch.bool)
                for name, param in self.model.named_parameters()}
        return train_localalt(self, mask, self.options.localalt_epoch)


def train_localalt(client: FedAvgClient, personal: Mask, mode: str) -> TrainStats:
    """LocalAlt for ``train.local_epochs`` epochs on ``personal`` (a mask over every parameter).

    The one LocalAlt of FedAlt and FedSelect, which differ only in their masks. The phases share
    one optimizer whose momentum is masked per entry (:class:`fedselect.engine.MaskedSGD`), so the
    part held fixed neither moves nor gathers momentum; normalization layers whose parameters are
    all fixed in a phase keep their statistics (the base class's BatchNorm rule).
    """
    epochs = localalt_epochs(personal, client.ctx.config.train.local_epochs, mode=mode)
    return client.train_passes([SplitEpoch(phases) if len(phases) > 1 else phases[0] for phases in epochs])


register("fedalt", client=FedAltClient, server=FedAvgServer,
         summary="fixed layer-wise partition (head personal by default) trained by LocalAlt: per epoch a "
                 "personal pass then a shared pass (Pillutla et al. 2022)")
