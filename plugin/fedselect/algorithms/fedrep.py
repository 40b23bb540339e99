"""FedRep (Collins et al. 2021): a personal head trained to convergence, then the shared body.

Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021, arXiv:2102.07078, Alg. 1. On the mask mechanism: personal =
the head (as FedPer); the local schedule differs: first ``head_epochs`` epochs updating only the
head with the body fixed, then ``body_epochs`` epochs updating only the body (representation)
with the new head fixed. Only the body is uploaded and averaged. At equal local work (the
default) the two phases share the round's ``train.local_epochs``.
"""

from __future__ import annotations

from typing import Any

from fedselect.core.work import split_local_epochs
from fedselect.engine import TrainStats
from fedselect.options import ConfigError
from fedselect.registry import register

from .base import FedAvgServer
from .fedper import FedPerClient
from .fedrep_options import FedRepOptions
from .parts import head_entries, train_part

# generator streams of the two phases, so their sample orders are independent draws
HEAD_STREAM = 0
BODY_STREAM = 1


class FedRepClient(FedPerClient):
    """FedRep's client: FedPer's mask, with the head and body trained in two separate phases."""

    Options = FedRepOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.options
        epochs = self.ctx.config.train.local_epochs
        body = min(1, epochs) if options.head_epochs is None and options.body_epochs is None else options.body_epochs
        try:
            # resolved now, so a split that does not fit train.local_epochs fails before round 1
            self.head_epochs, self.body_epochs = split_local_epochs(epochs, options.head_epochs, body)
        except ValueError as exc:
            raise ConfigError(f"config keys 'algo.head_epochs'/'algo.body_epochs': {exc}") from None

    def local_update(self) -> TrainStats:
        """Collins et al. 2021, Alg. 1, lines 5-8: head phase, then body phase; each touches only its part."""
        head = set(head_entries(self.model))
        body = [name for name in self.state_entries() if name not in head]
        stats = train_part(self, self.head_epochs, head, stream=HEAD_STREAM)
        stats += train_part(self, self.body_epochs, body, stream=BODY_STREAM)
        return stats


register("fedrep", client=FedRepClient, server=FedAvgServer)
