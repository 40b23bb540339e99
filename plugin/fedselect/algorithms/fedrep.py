"""FedRep (Collins et al. 2021): a personal head trained to convergence, then the shared body.

Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021, arXiv:2102.07078, Alg. 1. On the mask mechanism: personal =
the head (as FedPer); the local schedule differs: first ``head_epochs`` epochs updating only the
head with the body fixed, then ``body_epochs`` epochs updating only the body (representation)
with the new head fixed. Only the body is uploaded and averaged. At equal local work (the
default) the two phases share the round's ``train.local_epochs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedselect.core.work import split_local_epochs
from fedselect.engine import TrainStats
from fedselect.options import ConfigError
from fedselect.registry import register

from .base import FedAvgServer
from .fedper import FedPerClient
from .parts import head_entries, train_part

# generator streams of the two phases, so their sample orders are independent draws
HEAD_STREAM = 0
BODY_STREAM = 1


@dataclass(frozen=True)
class FedRepOptions:
    """FedRep's local schedule.

    Equal local work (:mod:`fedselect.core.work`): the two phases spend ``train.local_epochs``
    (E) between them. With neither key set, ``body_epochs`` = 1 and ``head_epochs`` = E - 1:
    FedRep's own schedule is many head epochs per representation epoch (Collins et al. 2021,
    Sec. 5; the released code's ``--local_ep 11 --local_rep_ep 1`` is 10 head epochs, then 1
    representation epoch), and 1 body epoch is the closest split of E = 5 to that ratio that
    still trains the representation. Setting one key gives the other the rest of E; setting
    both runs them as given (e.g. ``head_epochs: 10, body_epochs: 5``, 3E epochs of work,
    this project's setting before equal work was the rule), and the logged sample passes show it.
    """

    head_epochs: int | None = None
    body_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.head_epochs is not None and self.head_epochs < 0:
            raise ConfigError(f"config key 'algo.head_epochs' must be >= 0 or null, got {self.head_epochs}")
        if self.body_epochs is not None and self.body_epochs < 0:
            raise ConfigError(f"config key 'algo.body_epochs' must be >= 0 or null, got {self.body_epochs}")


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


register("fedrep", client=FedRepClient, server=FedAvgServer,
         summary="personal head; local update = head epochs (body fixed), then body epochs (head fixed) "
                 "(Collins et al. 2021)")
