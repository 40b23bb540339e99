"""Options of LotteryFL (Li et al. 2021), ``algorithm: lotteryfl``; imports neither torch nor FedML."""

from __future__ import annotations

from dataclasses import dataclass

from fedselect.options import ConfigError

__all__ = ["LotteryFLOptions"]


@dataclass(frozen=True)
class LotteryFLOptions:
    """LotteryFL's pruning schedule.

    Defaults are the released code's settings for its non-IID CIFAR-10 experiments (README of
    the LotteryFL repository: ``--prune_percent=20 --prune_start_acc=0.1 --prune_end_rate=0.5``;
    the paper's r_p, acc_threshold and r_target):

    ``target_sparsity``: 0.5, the fraction of each prunable tensor pruned at the end
    (``prune_end_rate`` is the fraction kept, 0.5).
    ``prune_rate``: 0.2, the fraction of the still unpruned weights pruned per pruning step.
    ``acc_threshold``: 0.1, the local accuracy the masked global model must reach before a
    client prunes further (0 = prune whenever sampled, until the target).
    ``reset_to_init``: True, rewind the unpruned parameters to theta_0 after each pruning step
    (Alg. 1; the lottery-ticket rewind). False keeps the received values instead.
    """

    # fraction of each prunable tensor (convolution and linear weights) pruned at the end, in [0, 1)
    target_sparsity: float = 0.5
    # fraction of the still unpruned weights pruned (smallest magnitude first) per pruning step
    prune_rate: float = 0.2
    # local accuracy (on the training split) the masked global model must reach before a client
    # prunes again; 0: prune whenever sampled, until the target
    acc_threshold: float = 0.1
    # rewind the unpruned parameters to the common initialization theta_0 after each pruning step
    # (the lottery-ticket reset); false keeps the received values
    reset_to_init: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ConfigError(f"config key 'algo.target_sparsity' must be in [0, 1), got {self.target_sparsity}")
        if not 0.0 < self.prune_rate <= 1.0:
            raise ConfigError(f"config key 'algo.prune_rate' must be in (0, 1], got {self.prune_rate}")
        if not 0.0 <= self.acc_threshold <= 1.0:
            raise ConfigError(f"config key 'algo.acc_threshold' must be in [0, 1], got {self.acc_threshold}")
