"""FedAvg (McMahan et al. 2017): one global model, nothing personal, E epochs of local SGD."""

from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer

register("fedavg", client=FedAvgClient, server=FedAvgServer)
