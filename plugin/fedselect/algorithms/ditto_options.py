"""Options of Ditto (Li et al. 2021), ``algorithm: ditto``; imports neither torch nor FedML."""

from __future__ import annotations

from dataclasses import dataclass

from fedselect.options import ConfigError

__all__ = ["DittoOptions"]


@dataclass(frozen=True)
class DittoOptions:
    """Ditto's personalization strength and personal schedule.

    ``lam``: 1.0. Ditto tunes lambda per dataset on a small grid (Li et al. 2021, Sec. 5 and
    App. C); 1 is its value for the image benchmark Fashion-MNIST in the released experiment
    scripts (``run_fashion_clean_ditto_lam1.sh``, ``--lam=1``). lambda = 0 is local training
    of v_k; lambda -> inf gives the global model.
    Equal local work (:mod:`fedselect.core.work`): Ditto trains two models, and the two updates
    share the round's ``train.local_epochs`` (E). With neither key set, ``global_epochs`` =
    ceil(E/2) and ``personal_epochs`` = the rest (3 + 2 for E = 5), as close as whole epochs get
    to Ditto's Alg. 1, which runs the same number of local steps on v_k as on w. Setting one key
    gives the other the rest of E; setting both runs them as given (``global_epochs: 5,
    personal_epochs: 5`` is Alg. 1 at E = 5 on each model, 2E epochs of work).
    """

    # lambda, weight of the proximal term lambda/2 ||v - w||^2 pulling the personal model v_k toward
    # the received global model (0: v_k trains alone; large: v_k stays near the global model)
    lam: float = 1.0
    # epochs on the personal model v_k; null: the rest of train.local_epochs after the global epochs
    personal_epochs: int | None = None
    # epochs on the global model w (FedAvg's update, uploaded); null: ceil(E/2) when both keys are
    # null, else the rest of train.local_epochs. Both set: run as given
    global_epochs: int | None = None

    def __post_init__(self) -> None:
        if not self.lam >= 0 or self.lam == float("inf"):
            raise ConfigError(f"config key 'algo.lam' must be a finite number >= 0, got {self.lam}")
        for key in ("personal_epochs", "global_epochs"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"config key 'algo.{key}' must be >= 0 or null, got {value}")
