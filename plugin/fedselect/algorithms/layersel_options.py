"""Options of selective layer fine-tuning (arXiv 2408.15600), ``algorithm: layersel``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fedselect.core.selection import SCORE_KIND, STRATEGIES
from fedselect.options import ConfigError

_SOLVED = ", ".join(SCORE_KIND)  # the strategies whose selection is an exact solve on scores


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

    Issue 18 adds five options (defaults: the behaviour before them, which the studies in README.md
    ran with): ``budget_draw`` (the release's heterogeneous budgets, never below the identical one),
    ``normalize_over`` (the lambda scale without the always-trained head's score), ``top_up`` (the
    release's filling of unused budget after the solve), ``aggregation`` (a layer averaged over its
    trainers, Eq. 7, or over every sampled client with a zero update from the others) and
    ``min_trainers`` (no layer trained by fewer than that many clients, a constraint of the solve).
    Each field's ``help`` gives its meaning, source and default.
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
    # heterogeneous budgets, half_normal draw: the smallest budget (a fraction, like `budget`)
    budget_min: float = 0.2
    # heterogeneous budgets: the largest budget (a fraction, like `budget`)
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
    # heterogeneous budgets' draw: half_normal (ours) or authors (the release, src/server.py:
    # N(1 layer, 1 layer) truncated to [budget, budget_max], whole layers with unit costs)
    budget_draw: Literal["half_normal", "authors"] = field(default="half_normal", metadata={"help": (
        "how budgets: heterogeneous draws each client's budget. half_normal (default, ours): budget_min + |z| s, "
        "z ~ N(0, 1), truncated at budget_max, untruncated mean `budget` (can go below the identical budget). "
        "authors (the release, src/server.py 'get layer budgets': truncnorm(a=n_layers-1, b=n_layers_inc+1, "
        "loc=1, scale=1), rounded): a normal of mean 1 layer and deviation 1 layer truncated to [budget, "
        "budget_max], so every budget is at least the identical one and heterogeneity only adds layers; one "
        "layer is the mean cost of the layers budgets cover, budgets are whole layers with cost: unit; "
        "budget_min is unused")})
    # which scores the lambda scale (normalize_scores) divides by: their mean over every scored layer,
    # or over the layers a client chooses among (the always-trained head out)
    normalize_over: Literal["scored", "choosable"] = field(default="scored", metadata={"help": (
        "with normalize_scores: true, the mean the round's scores are divided by. scored (default, as before "
        "issue 18): over every scored layer, the always-trained head included when head_in_budget is true "
        "(it can hold nearly all the mass, making every block's score tiny against lambda). choosable: over "
        "the layers a client chooses among, always-trained ones out (the release scores no always-trained "
        "layer: src/client.py init_train drops common_layers). normalize_scores: false uses raw scores "
        "(the release)")})
    # fill each client's unused budget with its own best other layers after the solve (the release)
    top_up: bool = field(default=False, metadata={"help": (
        "after the solve, fill each client's unused budget with its own highest-scoring other layers "
        "while they fit (the release: src/helpers/util.py find_selection_set, after the ILP; it adds its "
        "top-budget layers lowest first and can end one layer over budget, here highest first and never "
        "over). With min_trainers > 1 only layers enough clients already train are added. ilp, snr, rgn "
        "only. Default false (the paper's problem (P) as written)")})
    # a layer's new global value: the mean over its trainers (Eq. 7) or over every sampled client,
    # the others counting as a zero update
    aggregation: Literal["trainers", "sampled"] = field(default="trainers", metadata={"help": (
        "how the server averages a layer. trainers (default; the paper's Eq. 7 and the release's "
        "src/server.py aggregation): over the clients that trained it, weighted by data size, so a layer "
        "one client trained becomes that client's copy. sampled: over every sampled client whose upload "
        "was accepted, a client that did not train it counting as a zero update: theta += sum_trainers "
        "w_i (theta_i - theta) / sum_sampled w_i, i.e. Eq. 7's step scaled by the trainers' share of the "
        "weight (a server step size)")})
    # every layer but the head trained by no client or by at least this many (a constraint of the solve)
    min_trainers: int = field(default=1, metadata={"help": (
        "every layer but the always-trained head is trained by no sampled client or by at least this "
        "many: a linear constraint of the exact solve (t z_l <= k_l <= N z_l, z_l binary; ours, not in "
        "the paper or the release). 1 (default): no constraint. ilp, snr, rgn only; at most the clients "
        "sampled per round (checked when the server is built)")})

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
        if (self.budgets == "heterogeneous" and self.budget_draw == "half_normal"
                and not self.budget_min <= self.budget <= self.budget_max):
            raise ConfigError("config keys 'algo.budget_min' <= 'algo.budget' <= 'algo.budget_max' must hold, got "
                              f"{self.budget_min} <= {self.budget} <= {self.budget_max}")
        if self.budgets == "heterogeneous" and self.budget_draw == "authors" and self.budget > self.budget_max:
            raise ConfigError("config keys 'algo.budget' <= 'algo.budget_max' must hold with 'algo.budget_draw': "
                              f"authors (budgets are drawn in between), got {self.budget} > {self.budget_max}")
        self._check_issue18_options()
        if self.score_batches < 1:
            raise ConfigError(f"config key 'algo.score_batches' must be >= 1, got {self.score_batches!r}")
        if self.time_limit_s <= 0:
            raise ConfigError(f"config key 'algo.time_limit_s' must be > 0, got {self.time_limit_s!r}")

    def _check_issue18_options(self) -> None:
        if isinstance(self.min_trainers, bool) or not isinstance(self.min_trainers, int) or self.min_trainers < 1:
            raise ConfigError(f"config key 'algo.min_trainers' must be an integer >= 1, got {self.min_trainers!r}")
        if self.min_trainers > 1 and self.strategy not in SCORE_KIND:
            raise ConfigError(f"config keys 'algo.min_trainers' and 'algo.strategy': a min-trainers constraint is "
                              f"part of the exact solve of {_SOLVED}; strategy {self.strategy!r} has none "
                              "(set min_trainers: 1)")
        if self.top_up and self.strategy not in SCORE_KIND:
            raise ConfigError(f"config keys 'algo.top_up' and 'algo.strategy': top-up fills a budget with the "
                              f"client's best-scoring layers, and only {_SOLVED} have scores; strategy "
                              f"{self.strategy!r} has none (set top_up: false)")
