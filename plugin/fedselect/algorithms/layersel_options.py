"""Options of selective layer fine-tuning (arXiv 2408.15600), ``algorithm: layersel``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedselect.core.selection import STRATEGIES
from fedselect.options import ConfigError


@dataclass(frozen=True)
class LayerSelOptions:
    """Options under ``algo:`` for ``algorithm: layersel``.

    Three choices differ from the authors' release (github.com/hiyuchang/fed_sel_tune, read at
    commit 66f07d3, "the release" below); each is an option whose default is ours. The release's
    reading is ``head_in_budget: false``, ``score_mode: train``, ``normalize_scores: false``.

    ``head_in_budget`` (default true). True: the always-trained head is a candidate layer like the
    blocks: its cost counts against every client's budget and is part of the total ``budget`` is a
    fraction of; its score is in the problem (a constant term, the head being forced) and in the
    mean ``normalize_scores`` divides by. False (the release): budgets cover the body layers only
    (``budget`` is a fraction of their total cost) and every client trains the head in addition;
    clients do not score the head, so it is neither in the problem nor in the normalization.
    Release: src/server.py ``select_layers`` solves over the layers that are neither
    ``fixed_layers`` nor ``common_layers`` with ``n_layers`` (a count of body layers) per client and
    appends ``common_layers`` afterwards, for every strategy; src/client.py ``init_train`` leaves
    ``common_layers`` out of the gradient-norm and RGN scores (src/helpers/config.py:
    ``classifier``, and for CLIP also ``ln_post`` and ``proj``). The paper's problem (P) (Sec. 4.2)
    charges every selected layer's cost to the budget; this option decides whether the forced head
    is one of those layers.

    ``score_mode`` (default eval). eval: scores are taken with the model in eval mode (dropout off,
    BatchNorm normalizing with its running statistics, which do not move). train (the release:
    src/client.py ``init_train`` calls ``model.train()``): the forward of local training (dropout
    on, BatchNorm on batch statistics; normalization layers local training keeps in eval mode,
    ``train.norm_stats: frozen`` or frozen layers such as the stem, stay so); dropout is seeded per
    (seed, client, round) and every buffer is restored afterwards, so the model the client then
    trains is bit-identical to the one it received. Either way inputs are not augmented (the
    release scores on its training loader, whose transform is the model's fixed preprocessing).
    """

    # ilp: the paper's method; top/bottom/both/snr/rgn/full/random: its baselines
    strategy: str = "ilp"
    # lambda, the penalty per disagreeing client pair and layer, in units of the round's mean
    # layer score (scores are divided by their mean before solving; see normalize_scores)
    lam: float = 0.1
    # divide the round's scores (clients x scored layers) by their mean, so that lambda keeps its
    # meaning as gradients shrink over rounds and across models. The release (src/helpers/util.py
    # find_selection_set, weight `balance`, default 0) uses the raw scores: false reproduces it,
    # and lambda then is in the scores' own units (squared gradient norms). Which layers enter the
    # mean follows head_in_budget (the release never scores the head)
    normalize_scores: bool = True
    # budget as a fraction of the total cost of the layers budgets cover: all candidate layers
    # (head included) with head_in_budget, the body layers without it
    budget: float = 0.5
    # true: the head counts against each budget; false (the release): budgets cover the body
    # layers and the head is trained on top (see the class docstring)
    head_in_budget: bool = True
    # identical: every client gets `budget`; heterogeneous: seeded truncated half-normal draws
    # with mean level `budget` in [budget_min, budget_max]
    budgets: Literal["identical", "heterogeneous"] = "identical"
    budget_min: float = 0.2
    budget_max: float = 1.0
    # a layer's cost: 1 per layer, or its parameter count
    cost: Literal["unit", "params"] = "unit"
    # local batches each client scores the global model on (counted as local work); the release
    # scores on all of them (src/helpers/args.py sel_batch = -1): set it to at least the number of
    # local batches for that
    score_batches: int = 2
    # eval: score with the model in eval mode; train (the release): in local training's mode,
    # dropout seeded, BatchNorm statistics restored afterwards (see the class docstring)
    score_mode: Literal["eval", "train"] = "eval"
    # CBC time limit; hitting it keeps the best selection found and is logged
    time_limit_s: float = 60.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"config key 'algo.strategy': unknown strategy {self.strategy!r} "
                              f"(choose from {', '.join(STRATEGIES)})")
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ConfigError(f"config key 'algo.lam' must be a finite number >= 0, got {self.lam!r}")
        for key in ("budget", "budget_min", "budget_max"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"config key 'algo.{key}' must be in (0, 1], got {value!r}")
        if self.budgets == "heterogeneous" and not self.budget_min <= self.budget <= self.budget_max:
            raise ConfigError("config keys 'algo.budget_min' <= 'algo.budget' <= 'algo.budget_max' must hold, got "
                              f"{self.budget_min} <= {self.budget} <= {self.budget_max}")
        if self.score_batches < 1:
            raise ConfigError(f"config key 'algo.score_batches' must be >= 1, got {self.score_batches!r}")
        if self.time_limit_s <= 0:
            raise ConfigError(f"config key 'algo.time_limit_s' must be > 0, got {self.time_limit_s!r}")
