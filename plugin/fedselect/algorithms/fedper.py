"""FedPer (Arivazhagan et al. 2019): a personal classifier head, joint local SGD.

Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization Layers",
arXiv:1912.00818. The base layers are federated as in FedAvg; the last ("personalization")
layers never leave the client. On the mask mechanism: personal = the head's state entries
(:func:`fedselect.algorithms.parts.head_entries`), local schedule = FedAvg's E epochs of joint
SGD over the whole model.
"""

from __future__ import annotations

from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer, Mask
from .parts import head_entries

__all__ = ["FedPerClient"]


class FedPerClient(FedAvgClient):
    """FedPer's client (Arivazhagan et al. 2019, Sec. 3): the head is personal, SGD is joint.

    The paper keeps the top ("personalization") layers local; the FedSelect paper
    (arXiv:2306.13264, Table 1) runs FedPer with the classifier head as the personal part, which
    is what :func:`fedselect.models.head_param_names` names for every registered model.
    """

    def initial_personal_mask(self) -> Mask:
        return self.full_mask(head_entries(self.model))


register("fedper", client=FedPerClient, server=FedAvgServer)
