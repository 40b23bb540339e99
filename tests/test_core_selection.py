"""The layer-selection MILP against brute force, and the baseline strategies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedselect.core.compute import backward_flops, backward_fraction
from fedselect.core.scores import group_score, group_scores
from fedselect.core.selection import (
    STRATEGIES,
    InfeasibleBudgetError,
    SelectionError,
    disagreement,
    heterogeneous_budgets,
    objective_value,
    select_layers,
    solve_ilp,
)


def brute_force(scores, costs, budgets, lam, required):
    n, L = scores.shape
    best = -np.inf
    rows = []
    for i in range(n):
        feasible = []
        for bits in itertools.product([0, 1], repeat=L):
            row = np.array(bits, dtype=bool)
            if row[list(required)].all() and row @ costs <= budgets[i] + 1e-9:
                feasible.append(row)
        rows.append(feasible)
    for combo in itertools.product(*rows):
        best = max(best, objective_value(np.stack(combo), scores, lam))
    return best


def instances():
    rng = np.random.default_rng(7)
    for case in range(30):
        n, L = int(rng.integers(2, 4)), int(rng.integers(3, 5))
        costs = np.ones(L) if case % 2 == 0 else rng.integers(1, 4, L).astype(float)
        required = (L - 1,)
        budgets = costs[L - 1] + rng.integers(0, int(costs.sum()), n).astype(float)
        lam = [0.0, 0.05, 0.3, 2.0, 50.0][case % 5]
        yield rng.gamma(1.0, 1.0, (n, L)), costs, budgets, lam, required


@pytest.mark.parametrize("instance", list(instances()))
def test_ilp_equals_brute_force(instance):
    scores, costs, budgets, lam, required = instance
    result = solve_ilp(scores, costs, budgets, lam, required=required)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(brute_force(scores, costs, budgets, lam, required), abs=1e-6)
    assert (result.cost_per_client(costs) <= budgets + 1e-9).all()
    assert result.mask[:, list(required)].all()
    assert result.objective == pytest.approx(objective_value(result.mask, scores, lam))


def test_disagreement_is_pairwise_sum():
    mask = np.random.default_rng(0).random((5, 4)) < 0.5
    pairwise = sum(((mask[i] ^ mask[j]).sum()) for i in range(5) for j in range(i + 1, 5))
    assert disagreement(mask) == pairwise


def test_lambda_zero_unit_costs_gives_each_client_its_top_b():
    rng = np.random.default_rng(1)
    scores = rng.random((6, 8))
    result = solve_ilp(scores, np.ones(8), np.full(6, 3.0), 0.0)
    for i in range(6):
        assert set(result.selected(i)) == set(np.argsort(-scores[i])[:3].tolist())


def test_huge_lambda_gives_one_common_selection():
    rng = np.random.default_rng(2)
    scores = rng.random((6, 7))
    result = solve_ilp(scores, np.ones(7), np.full(6, 3.0), 1e3, required=(6,))
    assert (result.mask == result.mask[0]).all()
    assert disagreement(result.mask) == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_respects_budgets_and_required_layers(strategy):
    rng = np.random.default_rng(3)
    costs = rng.integers(1, 5, 6).astype(float)
    budgets = costs[-1] + rng.integers(0, 8, 5).astype(float)
    result = select_layers(strategy, costs=costs, budgets=budgets, lam=0.2, scores=rng.random((5, 6)),
                           required=(5,), seed=1, round_idx=2)
    assert result.mask[:, 5].all()
    if strategy != "full":
        assert (result.cost_per_client(costs) <= budgets + 1e-9).all()
    else:
        assert result.mask.all()


def test_position_strategies():
    costs, budgets = np.ones(6), np.full(2, 3.0)
    top = select_layers("top", costs=costs, budgets=budgets, required=(5,))
    bottom = select_layers("bottom", costs=costs, budgets=budgets, required=(5,))
    both = select_layers("both", costs=costs, budgets=np.full(2, 4.0), required=(5,))
    assert top.selected(0) == [3, 4, 5]
    assert bottom.selected(0) == [0, 1, 5]
    assert both.selected(0) == [0, 1, 4, 5]
    a = select_layers("random", costs=costs, budgets=budgets, seed=3, round_idx=1)
    b = select_layers("random", costs=costs, budgets=budgets, seed=3, round_idx=1)
    assert np.array_equal(a.mask, b.mask) and a.mask.sum(axis=1).tolist() == [3, 3]


def test_bad_problems_fail_early():
    with pytest.raises(InfeasibleBudgetError, match="client 1"):
        select_layers("top", costs=[1, 1, 5], budgets=[6, 4], required=(2,))
    with pytest.raises(SelectionError, match="needs snr scores"):
        select_layers("snr", costs=[1, 1], budgets=[2])
    with pytest.raises(SelectionError, match="unknown layer selection strategy"):
        select_layers("best", costs=[1], budgets=[1])
    with pytest.raises(SelectionError, match="finite"):
        solve_ilp(np.array([[np.nan, 1.0]]), [1, 1], [1], 0.0)
    with pytest.raises(SelectionError, match="shape"):
        solve_ilp(np.ones((2, 3)), [1, 1], [1, 1], 0.0)


def test_time_limit_keeps_a_feasible_selection():
    rng = np.random.default_rng(0)
    scores = rng.gamma(1.0, 1.0, (40, 20))
    result = solve_ilp(scores, np.ones(20), np.full(40, 6.0), 0.01, required=(19,), time_limit_s=1)
    assert result.status in ("optimal", "time_limit")
    assert (result.mask.sum(axis=1) <= 6).all() and result.mask[:, 19].all()


def test_heterogeneous_budgets_are_seeded_and_truncated():
    a = heterogeneous_budgets(200, level=5.0, minimum=2.0, maximum=8.0, seed=4)
    assert np.array_equal(a, heterogeneous_budgets(200, level=5.0, minimum=2.0, maximum=8.0, seed=4))
    assert a.min() >= 2.0 and a.max() <= 8.0 and 4.0 < a.mean() < 5.5
    with pytest.raises(SelectionError):
        heterogeneous_budgets(3, level=1.0, minimum=2.0, maximum=8.0, seed=0)


def test_scores_by_hand():
    g = [torch.tensor([3.0, -4.0]), torch.tensor([0.0])]
    p = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    assert group_score(g, p, "grad_norm") == pytest.approx(25.0)
    assert group_score(g, p, "rgn") == pytest.approx(5.0)
    flat = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64)
    assert group_score(g, p, "snr") == pytest.approx(abs(float(flat.mean())) / float(flat.std(unbiased=False)))
    assert group_score([torch.zeros(3)], [torch.ones(3)], "snr") == 0.0
    with pytest.raises(ValueError, match="unknown score kind"):
        group_score(g, p, "fisher")
    with pytest.raises(ValueError, match="non-finite"):
        group_score([torch.tensor([float("nan")])], p, "grad_norm")
    assert list(group_scores({"b": g, "a": g}, {"a": p, "b": p}, "grad_norm")) == ["b", "a"]


def test_backward_compute_accounting():
    flops = [4.0, 2.0, 2.0, 1.0]
    assert backward_flops(flops, [True] * 4) == 9.0 + 5.0
    # only the head: its weight gradient, nothing propagates further down
    assert backward_flops(flops, [False, False, False, True]) == 1.0
    # block 1 and head: weight grads 2 + 1, input grads of groups above block 1: 2 + 1
    assert backward_flops(flops, [False, True, False, True]) == 6.0
    assert backward_fraction(flops, [False] * 4) == 0.0
