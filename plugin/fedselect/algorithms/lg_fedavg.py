"""LG-FedAvg (Liang et al. 2020): personal representation (body), shared head, joint local SGD.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act
Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523, Alg. 1.
Each client keeps its own local representation layers and only the top ("global") layers are
averaged: the mirror image of FedPer. On the mask mechanism: personal = every state entry
outside the shared layer groups (BatchNorm statistics included), local schedule = joint SGD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fedselect.options import ConfigError
from fedselect.engine import ClientDataset

from .base import FedAvgClient, FedAvgServer, Mask, RunContext
from .fedper import entries_of_params, group_param_names
from .registry import register


@dataclass(frozen=True)
class LGFedAvgOptions:
    """Which layer groups are global (shared); everything else is the local representation.

    ``shared_groups``: ("head",), the split of the FedSelect paper's baseline (arXiv:2306.13264,
    Sec. 5: "personal representation, shared head"); LG-FedAvg's own experiments keep the top
    layers global (Liang et al. 2020, Sec. 4), which for the models here is the head group.
    Names are the model's layer-group names (:func:`fedselect.models.layer_groups`).
    """

    shared_groups: tuple[str, ...] = ("head",)

    def __post_init__(self) -> None:
        if not self.shared_groups:
            raise ConfigError("config key 'algo.shared_groups' must name at least one layer group "
                              "(with nothing shared the run is 'local')")
        if len(set(self.shared_groups)) != len(self.shared_groups):
            raise ConfigError(f"config key 'algo.shared_groups' names a group twice: {list(self.shared_groups)}")


class LGFedAvgClient(FedAvgClient):
    """LG-FedAvg's client: the body is personal, the shared groups are averaged."""

    Options = LGFedAvgOptions

    def __init__(self, model: nn.Module, args: Any, *, client_id: int, data: ClientDataset,
                 ctx: RunContext) -> None:
        super().__init__(model, args, client_id=client_id, data=data, ctx=ctx)
        options = self.options
        # resolved now, so a bad group name fails before the first round
        shared = set(entries_of_params(model, group_param_names(model, options.shared_groups,
                                                                "algo.shared_groups")))
        self.personal_entries = [name for name in model.state_dict() if name not in shared]
        if not self.personal_entries:
            raise ConfigError("config key 'algo.shared_groups' covers the whole model: nothing is personal "
                              "(that is FedAvg)")

    def initial_personal_mask(self) -> Mask:
        return self.full_mask(self.personal_entries)


register("lg_fedavg", client=LGFedAvgClient, server=FedAvgServer,
         summary="personal representation (body), shared head; E epochs of joint SGD (Liang et al. 2020)")
