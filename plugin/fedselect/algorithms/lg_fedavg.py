"""LG-FedAvg (Liang et al. 2020): personal representation (body), shared head, joint local SGD.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act
Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523, Alg. 1.
Each client keeps its own local representation layers and only the top ("global") layers are
averaged: the mirror image of FedPer. On the mask mechanism: personal = every state entry
outside the shared layer groups (BatchNorm statistics included), local schedule = joint SGD
(:mod:`fedselect.algorithms.group_partition`).
"""

from __future__ import annotations

from fedselect.registry import register

from .base import FedAvgServer
from .group_options import LGFedAvgOptions
from .group_partition import GroupPartitionClient

__all__ = ["LGFedAvgClient", "LGFedAvgOptions"]


class LGFedAvgClient(GroupPartitionClient):
    """LG-FedAvg's client: the named groups are shared and averaged, the rest (the body) is personal."""

    Options = LGFedAvgOptions


register("lg_fedavg", client=LGFedAvgClient, server=FedAvgServer)
