"""FedAlt (Pillutla et al. 2022): a fixed personal/shared partition trained by LocalAlt.

Pillutla, Malik, Mohamed, Rabbat, Sanjabi, Xiao, "Federated Learning with Partial Model
Personalization", ICML 2022, arXiv:2204.03809, Alg. 1 (FedAlt). The model is split into shared
u and personal v_k once, by layer; each local epoch is one full pass updating only v_k (u
fixed), then one full pass updating only u (v_k fixed). Only u is uploaded and averaged.
On the mask mechanism: personal = the configured layer groups, schedule =
:func:`fedselect.algorithms.parts.train_localalt` (:mod:`fedselect.algorithms.group_partition`).
"""

from __future__ import annotations

from fedselect.registry import register

from .base import FedAvgServer
from .group_options import FedAltOptions
from .group_partition import GroupPartitionClient

__all__ = ["FedAltClient", "FedAltOptions"]


class FedAltClient(GroupPartitionClient):
    """FedAlt's client: a fixed layer-wise mask (the named groups personal) and the LocalAlt schedule."""

    Options = FedAltOptions


register("fedalt", client=FedAltClient, server=FedAvgServer)
