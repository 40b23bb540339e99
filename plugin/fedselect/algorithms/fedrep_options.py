"""Options of FedRep (Collins et al. 2021), ``algorithm: fedrep``; imports neither torch nor FedML."""

from __future__ import annotations

from dataclasses import dataclass

from fedselect.options import ConfigError

__all__ = ["FedRepOptions"]


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

    # epochs updating only the head (body fixed), first; null: train.local_epochs minus the body
    # epochs (E - 1 when both keys are null)
    head_epochs: int | None = None
    # epochs then updating only the body (representation, head fixed); null: 1 when both keys are
    # null, else the rest of train.local_epochs. Both set: run as given, beyond E if they add up so
    body_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.head_epochs is not None and self.head_epochs < 0:
            raise ConfigError(f"config key 'algo.head_epochs' must be >= 0 or null, got {self.head_epochs}")
        if self.body_epochs is not None and self.body_epochs < 0:
            raise ConfigError(f"config key 'algo.body_epochs' must be >= 0 or null, got {self.body_epochs}")
