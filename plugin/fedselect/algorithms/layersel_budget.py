"""The server side of ``algorithm: layersel`` that needs no model: costs, budgets, the round's selection.

Whether the always-trained head sits inside the budgets (``algo.head_in_budget``, see
:class:`fedselect.algorithms.layersel_options.LayerSelOptions`) is decided here and nowhere else:

* ``head_in_budget: true``: the candidates are the body layers and the head; the head is a
  ``required`` layer of :func:`fedselect.core.selection.select_layers` (trained by every client,
  its cost counted against every budget) and ``budget`` is a fraction of the cost of all
  candidates;
* ``head_in_budget: false``: the selection problem is over the body layers alone (scores, costs,
  budgets, the disagreement penalty); ``budget`` is a fraction of the body layers' total cost and
  the head is added to every client's selection afterwards, outside its budget.

Every strategy goes through :func:`select_round`, so all of them (ilp, top, bottom, both, snr,
rgn, random, full) follow the same rule; it also applies ``min_trainers`` and ``top_up`` (issue 18,
:mod:`fedselect.core.selection_round`) to the selectable layers.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np

from fedselect.core.selection import (
    InfeasibleBudgetError,
    SelectionResult,
    heterogeneous_budgets,
    objective_value,
    select_layers,
)
from fedselect.core.selection_round import authors_budgets, top_up
from fedselect.models import LayerGroup
from fedselect.options import ConfigError

from .layersel_options import LayerSelOptions

T = TypeVar("T")


def layer_costs(groups: list[LayerGroup], kind: str) -> np.ndarray:
    """A cost per candidate layer: 1 (``cost: unit``) or its parameter count (``cost: params``)."""
    return np.array([1.0 if kind == "unit" else float(g.num_params) for g in groups])


def selectable(items: list[T], head_in_budget: bool) -> list[T]:
    """The candidates the selection problem chooses among (the head is the last candidate):
    all of them when the head is inside the budgets, the body layers alone when it is not."""
    return list(items) if head_in_budget else list(items[:-1])


def client_budgets(costs: np.ndarray, num_clients: int, options: LayerSelOptions, *, seed: int) -> np.ndarray:
    """Every client's budget in cost units; budgets that cannot work fail here, before round 1.

    ``costs`` are all candidates' (head last). The budget levels are fractions of the total cost
    of the layers the budgets cover: all candidates with the head in the budget, the body layers
    without it. A budget must cover what it always pays for: with the head inside, the head's
    cost; without it, the cheapest body layer (a smaller budget could never pay for any layer,
    and the client would train the head alone whatever the scores).
    """
    o = options
    covered = np.asarray(selectable(list(costs), o.head_in_budget), dtype=float)
    key = "algo.budget" if o.budgets == "identical" or o.budget_draw == "authors" else "algo.budget_min"
    if covered.size == 0:
        raise InfeasibleBudgetError("config key 'algo.head_in_budget': with the head outside the budgets the model "
                                    "needs at least one block layer to select among")
    total = float(covered.sum())
    if o.budgets == "identical":
        budgets = np.full(num_clients, o.budget * total)
    elif o.budget_draw == "authors":
        budgets = authors_budgets(num_clients, minimum=o.budget * total, maximum=o.budget_max * total,
                                  unit=total / covered.size, seed=seed, whole=o.cost == "unit")
    else:
        budgets = heterogeneous_budgets(num_clients, level=o.budget * total, minimum=o.budget_min * total,
                                        maximum=o.budget_max * total, seed=seed)
    if o.head_in_budget:
        floor, what = float(costs[-1]), "the cost {:g} of the always-trained head, which counts against"
    else:
        floor, what = float(covered.min()), "the cost {:g} of the cheapest selectable layer, the head being outside"
    short = np.flatnonzero(budgets + 1e-9 < floor)  # the tolerance of core.selection's own check
    if short.size:
        raise InfeasibleBudgetError(
            f"config key '{key}': client {int(short[0])}'s budget {budgets[short[0]]:g} ({o.cost} cost) is below "
            f"{what.format(floor)} the budgets (total cost of the layers budgets cover {total:g})")
    return budgets


def check_min_trainers(options: LayerSelOptions, num_clients: int, participation: float) -> None:
    """A ConfigError naming the keys when ``min_trainers`` exceeds the clients sampled per round (no
    layer but the head could ever be trained); sampled: max(1, round(participation x num_clients)),
    as :func:`fedselect.fedml_runtime.simulation.sample_clients` draws them."""
    sampled = min(num_clients, max(1, round(participation * num_clients)))
    if options.min_trainers > sampled:
        raise ConfigError(f"config keys 'algo.min_trainers', 'train.participation' and 'data.partition.num_clients': "
                          f"min_trainers {options.min_trainers} exceeds the {sampled} clients sampled per round "
                          f"(participation {participation:g} of {num_clients}), so no layer but the head could be "
                          "trained")


def select_round(options: LayerSelOptions, costs: np.ndarray, budgets: np.ndarray, scores: np.ndarray | None, *,
                 seed: int, round_idx: int) -> SelectionResult:
    """This round's selection, a mask over all candidates (head last, always True).

    ``costs`` are all candidates'; ``budgets`` the sampled clients'; ``scores`` (clients x
    selectable layers, scaled as the solve should see them) or None. With the head outside the
    budgets the head column is appended to the body layers' selection; objective, score and
    penalty terms are then the body problem's. ``min_trainers`` is a constraint of the solve;
    ``top_up`` fills each budget afterwards (the terms are then the filled selection's).
    """
    o = options
    chosen_costs = np.asarray(selectable(list(costs), o.head_in_budget), dtype=float)
    required = (len(costs) - 1,) if o.head_in_budget else ()
    result = select_layers(o.strategy, costs=chosen_costs, budgets=budgets, lam=o.lam, scores=scores,
                           required=required, seed=seed, round_idx=round_idx, time_limit_s=o.time_limit_s,
                           min_trainers=o.min_trainers)
    if o.top_up and scores is not None:
        filled = top_up(result.mask, scores, chosen_costs, budgets, min_trainers=o.min_trainers)
        score_term = float((filled * scores).sum())
        objective = objective_value(filled, scores, o.lam)
        result = dataclasses.replace(result, mask=filled, score_term=score_term, objective=objective,
                                     penalty_term=score_term - objective)
    if o.head_in_budget:
        return result
    head = np.ones((result.mask.shape[0], 1), dtype=bool)
    return dataclasses.replace(result, mask=np.hstack([result.mask, head]))
