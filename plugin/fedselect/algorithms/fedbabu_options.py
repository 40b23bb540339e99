"""Options of FedBABU (Oh et al. 2022), ``algorithm: fedbabu``; imports neither torch nor FedML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedselect.options import ConfigError

__all__ = ["FedBABUOptions"]


@dataclass(frozen=True)
class FedBABUOptions:
    """FedBABU's personalization step.

    ``finetune_epochs``: 5, the fine-tuning epochs of FedBABU's reported personalized accuracy
    (Oh et al. 2022, Sec. 4.2; the released code's ``--ft_ep`` default is 5).
    ``finetune_part``: "full", as the paper fine-tunes the whole model, body and head (Sec. 4.2;
    its ablation finds full fine-tuning better than head-only); "head" fine-tunes only the head.
    The fine-tuning optimizer is the training one (``train.lr``, momentum, batch size), as in
    the released code.
    """

    # epochs each client fine-tunes the received global model on its training split before every
    # evaluation (extra work, logged as eval_sample_passes_mean; the federated state is restored)
    finetune_epochs: int = 5
    # what that fine-tuning updates: the whole model (full, the paper) or the head only
    finetune_part: Literal["full", "head"] = "full"

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0:
            raise ConfigError(f"config key 'algo.finetune_epochs' must be >= 0, got {self.finetune_epochs}")
        if self.finetune_part not in ("full", "head"):
            raise ConfigError(f"config key 'algo.finetune_part' must be one of ['full', 'head'], "
                              f"got {self.finetune_part!r}")
