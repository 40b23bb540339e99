"""Options of FedSelect (Tamirisa et al., arXiv 2306.13264), ``algorithm: fedselect``.

Imports neither torch nor FedML, so configs are validated and options listed without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedselect.options import ConfigError

__all__ = ["FedSelectOptions"]


@dataclass(frozen=True)
class FedSelectOptions:
    """Options under ``algo:`` for ``algorithm: fedselect``.

    ``p`` means one of two things, after ``mask_search`` (the key keeps its name because configs
    and studies use it):

    * ``mask_search: gradltn`` (paper Alg. 1): the personalization rate, the *final* fraction of
      each maskable tensor (``topk_scope: model``: of all maskable entries together) that is
      personal after a search, exactly up to whole entries (``fraction_rule: compounding``: p^L);
    * ``mask_search: grow`` (the released code): a *growth rate*, the fraction of each maskable
      tensor's still-shared entries that turn personal at each growth step; a tensor grows until
      its personal fraction exceeds ``grow_target``, which bounds the personal fraction, not ``p``.
    """

    # gradltn: the final personal fraction of each maskable tensor; grow: the share of the
    # still-shared entries that turn personal per growth step (see the class docstring)
    p: float = 0.5
    # gradltn: paper Alg. 1; grow: the released code's online growth (FedSelect v2)
    mask_search: Literal["gradltn", "grow"] = "gradltn"
    # GradLTN: L, the pruning iterations of one mask search (paper, Table 1 setting: L = 5)
    gradltn_iterations: int = 5
    # GradLTN: E, the local epochs of each of its L trainings (paper, Table 1 setting: E = 5)
    gradltn_epochs: int = 5
    # how p maps onto the L selections (core.gradltn.selection_fractions); geometric ends at p
    fraction_rule: Literal["geometric", "per_iteration_of_original", "compounding"] = "geometric"
    # Alg. 1 returns u, v from theta_0; the paper suggests theta_L (trained with the final mask)
    return_weights: Literal["theta0", "thetaL"] = "theta0"
    # GradLTN's top-k per tensor (layer-wise, as the released code) or over the whole model (global)
    topk_scope: Literal["tensor", "model"] = "tensor"
    # search the mask on every `search_every`-th participation of a client (1: every round)
    search_every: int = 1
    # which parameter tensors may hold personal entries: all, or only `*weight` tensors (released code)
    maskable: Literal["all", "weights"] = "all"
    # grow variant (released code): the mask grows every `grow_every` participations of a client
    grow_every: int = 1
    # grow variant: a tensor stops growing once its personal fraction exceeds `grow_target`
    grow_target: float = 0.8
    # one LocalAlt epoch: "split" (v on half the epoch's samples, then u on the other half: one
    # pass, equal local work) or "two_passes" (a full pass over v, then over u: the released code)
    localalt_epoch: Literal["split", "two_passes"] = "split"

    def __post_init__(self) -> None:
        if not 0.0 < self.p < 1.0:
            raise ConfigError(f"config key 'algo.p' must be in (0, 1) (exclusive), got {self.p!r}")
        for key in ("gradltn_iterations", "gradltn_epochs", "search_every", "grow_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'algo.{key}' must be >= 1, got {getattr(self, key)!r}")
        if not 0.0 < self.grow_target <= 1.0:
            raise ConfigError(f"config key 'algo.grow_target' must be in (0, 1], got {self.grow_target!r}")
