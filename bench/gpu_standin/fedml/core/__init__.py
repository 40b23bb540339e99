"""STAND-IN ``fedml.core``: the ClientTrainer / ServerAggregator interfaces with their default hooks.

Their defaults are FedML 0.9.6's with differential privacy, attacks, defences and FHE off; a
config that turns one of those on is refused (:func:`refuse_unsupported_switches`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

from . import mlops

__all__ = ["ClientTrainer", "ServerAggregator", "mlops", "refuse_unsupported_switches"]

# the args switches that make FedML's default hooks do something; the stand-in provides none
_SWITCHES = ("enable_dp", "enable_attack", "enable_defense", "enable_fhe", "enable_contribution")


def refuse_unsupported_switches(args: Any) -> None:
    on = [name for name in _SWITCHES if getattr(args, name, False)]
    if on:
        raise NotImplementedError(f"fedml stand-in: {', '.join(on)} not provided (install FedML)")


class ClientTrainer(ABC):
    """A client's trainer; subclasses implement the abstract methods."""

    def __init__(self, model: Any, args: Any) -> None:
        refuse_unsupported_switches(args)
        self.model = model
        self.id = 0
        self.args = args
        self.local_train_dataset = None
        self.local_test_dataset = None
        self.local_sample_number = 0
        self.rid = 0
        self.template_model_params = None
        self.enc_model_params = None

    def set_id(self, trainer_id: int) -> None:
        self.id = trainer_id

    def is_main_process(self) -> bool:
        return True

    def update_dataset(self, local_train_dataset: Any, local_test_dataset: Any, local_sample_number: int) -> None:
        self.local_train_dataset = local_train_dataset
        self.local_test_dataset = local_test_dataset
        self.local_sample_number = local_sample_number

    @abstractmethod
    def get_model_params(self) -> Any: ...

    @abstractmethod
    def set_model_params(self, model_parameters: Any) -> None: ...

    def get_enc_model_params(self) -> Any:
        return self.enc_model_params

    def set_enc_model_params(self, enc_model_parameters: Any) -> None:
        self.enc_model_params = enc_model_parameters

    def on_before_local_training(self, train_data: Any, device: Any, args: Any) -> None:
        """FedML: FHE decryption when enabled; otherwise nothing."""
        return None

    @abstractmethod
    def train(self, train_data: Any, device: Any, args: Any) -> Any: ...

    def on_after_local_training(self, train_data: Any, device: Any, args: Any) -> None:
        """FedML: FHE encryption or local DP noise when enabled; otherwise nothing."""
        return None

    def test(self, test_data: Any, device: Any, args: Any) -> Any:
        return None


class ServerAggregator(ABC):
    """The server's aggregator; subclasses implement the abstract methods."""

    def __init__(self, model: Any, args: Any) -> None:
        refuse_unsupported_switches(args)
        self.model = model
        self.id = 0
        self.args = args
        self.contribution_assessor_mgr = None  # FedML builds one that does nothing unless enabled
        self.final_contribution_assigment_dict: dict = {}
        self.eval_data = None

    def is_main_process(self) -> bool:
        return True

    def set_id(self, aggregator_id: int) -> None:
        self.id = aggregator_id

    @abstractmethod
    def get_model_params(self) -> Any: ...

    @abstractmethod
    def set_model_params(self, model_parameters: Any) -> None: ...

    def on_before_aggregation(self, raw_client_model_or_grad_list: list[tuple[float, Any]]
                              ) -> tuple[list[tuple[float, Any]], list[int]]:
        """FedML: DP clipping, attacks and defences when enabled; otherwise the list and all indices."""
        return raw_client_model_or_grad_list, list(range(len(raw_client_model_or_grad_list)))

    def aggregate(self, raw_client_model_or_grad_list: list[tuple[float, Any]]) -> OrderedDict:
        """FedML's FedAvg: every entry the sample-weighted mean of the clients' (num_samples, state) pairs."""
        if getattr(self.args, "federated_optimizer", "FedAvg") != "FedAvg":
            raise NotImplementedError("fedml stand-in: only FedAvg aggregation is provided")
        total = sum(n for n, _ in raw_client_model_or_grad_list)
        out: OrderedDict = OrderedDict()
        for key in raw_client_model_or_grad_list[0][1]:
            out[key] = sum(params[key] * (n / total) for n, params in raw_client_model_or_grad_list)
        return out

    def on_after_aggregation(self, aggregated_model_or_grad: Any) -> Any:
        """FedML: central DP noise or a defence when enabled; otherwise unchanged."""
        return aggregated_model_or_grad

    def assess_contribution(self) -> None:
        return None

    @abstractmethod
    def test(self, test_data: Any, device: Any, args: Any) -> Any: ...

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> Any:
        return None
