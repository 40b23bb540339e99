"""Local: every client trains alone on its own data; nothing is communicated.

The reviewers' baseline for personalized FL. On the mask mechanism it is "everything
personal" (parameters and BatchNorm statistics), so uploads are empty and nothing is
downloaded after the common initialization.
"""

from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer, Mask


class LocalClient(FedAvgClient):
    def initial_personal_mask(self) -> Mask:
        return self.full_mask()


register("local", client=LocalClient, server=FedAvgServer)
