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
from typing import Any

import torch
from torch import nn

from fedselect.config import ConfigError
from fedselect.core.localalt import localalt_passes
from fedselect.engine import ClientDataset, TrainStats

from .base import FedAvgClient, FedAvgServer, Mask, RunContext
from .fedper import entries_of_params, group_param_names, options_of
from .registry import register


@dataclass(frozen=True)
class FedAltOptions:
    """The fixed personal part, by layer-group name.

    ``personal_groups``: ("head",), the output-layer split of Pillutla et al. 2022 (Sec. 5 studies
    input-layer, output-layer and adapter splits; the FedSelect paper, arXiv:2306.13264, runs
    FedAlt with the classifier head personal). Any other fixed set of the model's layer groups
    (:func:`fedselect.models.layer_groups`, e.g. ["stem"] for the input-layer split) may be named.
    Local epochs are ``train.local_epochs`` (5 in the FedSelect paper for every method), each one
    personal pass plus one shared pass.
    """

    personal_groups: tuple[str, ...] = ("head",)

    def __post_init__(self) -> None:
        if not self.personal_groups:
            raise ConfigError("config key 'algo.personal_groups' must name at least one layer group "
                              "(with nothing personal the run is 'fedavg')")
        if len(set(self.personal_groups)) != len(self.personal_groups):
            raise ConfigError(f"config key 'algo.personal_groups' names a group twice: "
                              f"{list(self.personal_groups)}")


class FedAltClient(FedAvgClient):
    """FedAlt's client: a fixed layer-wise mask and the LocalAlt schedule."""

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset,
                 ctx: RunContext) -> None:
        super().__init__(model, args, client_id=client_id, data=data, ctx=ctx)
        options = options_of(ctx, FedAltOptions)
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
        """Pillutla et al. 2022, Alg. 1 (LocalAlt): per epoch, a pass on v_k, then a pass on u.

        The passes share one optimizer, as FedSelect's LocalAlt does, so that FedAlt and FedSelect
        differ only in their masks. As there, BatchNorm statistics of the frozen part still move
        during a pass (the engine runs every pass in train mode).
        """
        personal = set(self.personal_entries)
        # the partition is whole tensors, so the schedule runs on one 0-d flag per parameter
        flags = {name: torch.tensor(name in personal) for name, _ in self.model.named_parameters()}
        passes = [{name: None for name, on in trainable.items() if bool(on)}
                  for trainable in localalt_passes(flags, self.ctx.config.train.local_epochs)]
        return self.train_passes(passes)


register("fedalt", client=FedAltClient, server=FedAvgServer, options=FedAltOptions,
         summary="fixed layer-wise partition (head personal by default) trained by LocalAlt: per epoch a "
                 "personal pass then a shared pass (Pillutla et al. 2022)")
