"""FedAlt (Pillutla et al. 2022): a fixed personal/shared partition trained by LocalAlt.

Pillutla, Malik, Mohamed, Rabbat, Sanjabi, Xiao, "Federated Learning with Partial Model
Personalization", ICML 2022, arXiv:2204.03809, Alg. 1 (FedAlt). The model is split into shared
u and personal v_k once, by layer; each local epoch is one full pass updating only v_k (u
fixed), then one full pass updating only u (v_k fixed). Only u is uploaded and averaged.
On the mask mechanism: personal = the configured layer groups, schedule =
:func:`fedselect.algorithms.parts.train_localalt` (:mod:`fedselect.algorithms.group_partition`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from fedselect.registry import register

from .base import FedAvgServer
from .group_partition import GroupOptions, GroupPartitionClient, PartitionSetting

__all__ = ["FedAltClient", "FedAltOptions"]


@dataclass(frozen=True)
class FedAltOptions(GroupOptions):
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

    # the named groups are personal; LocalAlt
    partition: ClassVar[PartitionSetting] = PartitionSetting("personal_groups", groups_personal=True, localalt=True)

    personal_groups: tuple[str, ...] = ("head",)
    localalt_epoch: Literal["split", "two_passes"] = "split"


class FedAltClient(GroupPartitionClient):
    """FedAlt's client: a fixed layer-wise mask (the named groups personal) and the LocalAlt schedule."""

    Options = FedAltOptions


register("fedalt", client=FedAltClient, server=FedAvgServer,
         summary="fixed layer-wise partition (head personal by default) trained by LocalAlt: per epoch a "
                 "personal pass then a shared pass (Pillutla et al. 2022)")
