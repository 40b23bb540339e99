"""LG-FedAvg (Liang et al. 2020): personal representation (body), shared head, joint local SGD.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act
Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523, Alg. 1.
Each client keeps its own local representation layers and only the top ("global") layers are
averaged: the mirror image of FedPer. On the mask mechanism: personal = every state entry
outside the shared layer groups (BatchNorm statistics included), local schedule = joint SGD
(:mod:`fedselect.algorithms.group_partition`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedselect.registry import register

from .base import FedAvgServer
from .group_partition import GroupOptions, GroupPartitionClient, PartitionSetting

__all__ = ["LGFedAvgClient", "LGFedAvgOptions"]


@dataclass(frozen=True)
class LGFedAvgOptions(GroupOptions):
    """Which layer groups are global (shared); everything else is the local representation.

    ``shared_groups``: ("head",), the split of the FedSelect paper's baseline (arXiv:2306.13264,
    Sec. 5: "personal representation, shared head"); LG-FedAvg's own experiments keep the top
    layers global (Liang et al. 2020, Sec. 4), which for the models here is the head group.
    Names are the model's layer-group names (:func:`fedselect.models.layer_groups`).
    """

    # the named groups are shared, the rest personal; joint SGD
    partition: ClassVar[PartitionSetting] = PartitionSetting("shared_groups", groups_personal=False, localalt=False)

    shared_groups: tuple[str, ...] = ("head",)


class LGFedAvgClient(GroupPartitionClient):
    """LG-FedAvg's client: the named groups are shared and averaged, the rest (the body) is personal."""

    Options = LGFedAvgOptions


register("lg_fedavg", client=LGFedAvgClient, server=FedAvgServer,
         summary="personal representation (body), shared head; E epochs of joint SGD (Liang et al. 2020)")
