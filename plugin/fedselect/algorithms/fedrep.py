"""FedRep (Collins et al. 2021): a personal head trained to convergence, then the shared body.

Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021, arXiv:2102.07078, Alg. 1. On the mask mechanism: personal =
the head (as FedPer); the local schedule differs: first ``head_epochs`` epochs updating only the
head with the body fixed, then ``body_epochs`` epochs updating only the body (representation)
with the new head fixed. Only the body is uploaded and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedselect.config import ConfigError
from fedselect.engine import TrainStats

from .base import FedAvgServer
from .fedper import FedPerClient, head_entries, options_of, train_part
from .registry import register

# generator streams of the two phases, so their sample orders are independent draws
HEAD_STREAM = 0
BODY_STREAM = 1


@dataclass(frozen=True)
class FedRepOptions:
    """FedRep's local schedule.

    ``head_epochs``: 10, FedRep's setting for its image experiments (Collins et al. 2021, Sec. 5:
    many cheap local head updates per representation update; the released code's defaults
    ``--local_ep 11 --local_rep_ep 1`` are 10 head epochs then 1 representation epoch).
    ``body_epochs``: None = ``train.local_epochs``; the FedSelect paper (arXiv:2306.13264,
    Sec. 5) fixes local epochs to 5 for every method, which FedRep spends on its representation.
    """

    head_epochs: int = 10
    body_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.head_epochs < 0:
            raise ConfigError(f"config key 'algo.head_epochs' must be >= 0, got {self.head_epochs}")
        if self.body_epochs is not None and self.body_epochs < 0:
            raise ConfigError(f"config key 'algo.body_epochs' must be >= 0 or null, got {self.body_epochs}")


class FedRepClient(FedPerClient):
    """FedRep's client: FedPer's mask, with the head and body trained in two separate phases."""

    def local_update(self) -> TrainStats:
        """Collins et al. 2021, Alg. 1, lines 5-8: head phase, then body phase; each touches only its part."""
        options = options_of(self.ctx, FedRepOptions)
        body_epochs = self.ctx.config.train.local_epochs if options.body_epochs is None else options.body_epochs
        head = set(head_entries(self.model))
        body = [name for name in self.state_entries() if name not in head]
        stats = train_part(self, options.head_epochs, head, stream=HEAD_STREAM)
        stats += train_part(self, body_epochs, body, stream=BODY_STREAM)
        return stats


register("fedrep", client=FedRepClient, server=FedAvgServer, options=FedRepOptions,
         summary="personal head; local update = head epochs (body fixed), then body epochs (head fixed) "
                 "(Collins et al. 2021)")
