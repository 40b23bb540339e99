"""The layer-selection MILP against brute force, and the baseline strategies."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

import fedselect.core.selection_cbc as selection_cbc
import fedselect.core.selection_milp as selection_milp
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


# ---- the exact solver's reductions and MILP forms, against an exhaustive search ----------------

def feasible_rows(costs, budget, required):
    """Every row (bool, L) a client with ``budget`` may choose."""
    rows = np.array(list(itertools.product([False, True], repeat=costs.size)), dtype=bool)
    return rows[rows[:, list(required)].all(axis=1) & (rows.astype(float) @ costs <= budget + 1e-9)]


def exhaustive(scores, costs, budgets, lam, required):
    """(optimal objective, every optimal selection) by enumerating all combinations of feasible rows."""
    rows = [feasible_rows(costs, b, required) for b in budgets]
    grid = np.stack(np.meshgrid(*[np.arange(len(r)) for r in rows], indexing="ij"), -1).reshape(-1, len(rows))
    masks = np.stack([rows[i][grid[:, i]] for i in range(len(rows))], axis=1)  # (combos, N, L)
    k = masks.sum(axis=1)
    values = (masks * scores).sum(axis=(1, 2)) - lam * (k * (len(rows) - k)).sum(axis=1)
    best = values.max()
    return float(best), masks[values >= best - 1e-9]


def exact_instances(count, seed):
    rng = np.random.default_rng(seed)
    shapes = [(2, 3), (2, 4), (2, 5), (3, 3), (3, 4), (3, 5), (4, 3), (4, 4)]
    for case in range(count):
        n, L = shapes[case % len(shapes)]
        costs = np.ones(L) if case % 2 == 0 else rng.integers(1, 4, L).astype(float)
        if case % 8 == 7:
            costs = np.round(rng.uniform(0.5, 3.0, L), 2)  # not integers: no budget rounding
        required = (L - 1,) if case % 3 else ()
        floor = costs[list(required)].sum()
        budgets = floor + rng.integers(0, int(costs.sum() - floor) + 1, n).astype(float)
        if case % 5 == 1:
            budgets = floor + rng.uniform(0.0, costs.sum() - floor, n)  # fractional budgets
        scores = rng.gamma(1.0, 1.0, (n, L))
        if case % 4 == 0:
            scores = np.round(scores, 1)  # ties
        lam = [0.0, 0.01, 0.1, 0.3, 1.0, 50.0][case % 6]
        yield scores, costs, budgets, lam, required


@pytest.mark.parametrize("instance", list(exact_instances(48, 11)))
def test_solver_matches_exhaustive_search(instance):
    scores, costs, budgets, lam, required = instance
    best, _ = exhaustive(scores, costs, budgets, lam, required)
    result = solve_ilp(scores, costs, budgets, lam, required=required)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(best, abs=1e-7)
    assert (result.cost_per_client(costs) <= budgets + 1e-9).all() and result.mask[:, list(required)].all()
    assert result.penalty_term == pytest.approx(lam * disagreement(result.mask))
    assert result.score_term - result.penalty_term == pytest.approx(result.objective)


@pytest.mark.parametrize("instance", list(exact_instances(24, 12)))
def test_reductions_keep_every_optimum(instance):
    # every fixed entry and every ruled-out count must agree with *all* optimal selections
    scores, costs, budgets, lam, required = instance
    best, optima = exhaustive(scores, costs, budgets, lam, required)
    n, L = scores.shape
    tol = 1e-9 * (scores.sum() + lam * L * n * n / 4)
    fix = np.full((n, L), -1, dtype=np.int8)
    fix[:, list(required)] = 1
    counts = np.ones((n + 1, L), dtype=bool)
    mu = np.zeros(n)
    for _ in range(3):
        selection_milp._fix_by_dominance(scores, costs, budgets, lam, fix, counts, tol)
        upper, mu = selection_milp._lagrange_bound(scores, costs, budgets, lam, fix, counts, best - tol, tol, mu)
        assert upper >= best - 1e-7
        selection_milp._fix_by_lagrange(scores, costs, budgets, lam, fix, counts, mu, best - tol, tol)
    for mask in optima:
        assert ((fix == -1) | (mask == (fix == 1))).all()
        assert counts[mask.sum(axis=0), np.arange(L)].all()


@pytest.mark.parametrize("pairwise_max", [0, 8])
@pytest.mark.parametrize("instance", list(exact_instances(16, 13)))
def test_final_milp_forms_are_exact(instance, pairwise_max, monkeypatch):
    # the MILP alone (nothing fixed), in the per-entry form (pairwise_max 0, with one-hot counts over a
    # gapped set that keeps the optimum's counts) and in the pairwise form
    scores, costs, budgets, lam, required = instance
    best, optima = exhaustive(scores, costs, budgets, lam, required)
    n, L = scores.shape
    monkeypatch.setattr(selection_cbc, "_PAIRWISE_MAX", pairwise_max)
    fix = np.full((n, L), -1, dtype=np.int8)
    fix[:, list(required)] = 1
    counts = np.ones((n + 1, L), dtype=bool)
    if pairwise_max == 0:
        counts[:] = False
        counts[[0, n], :] = True
        counts[optima[0].sum(axis=0), np.arange(L)] = True
        selection_milp._fix_by_counts(fix, counts)
    start = optima[0] & False
    start[:, list(required)] = True
    rows = np.flatnonzero((fix == -1).any(axis=1))
    mask = fix == 1
    if rows.size:
        part, status = selection_cbc._solve_part(scores, costs, budgets, lam, fix, counts, rows, start, 60.0, None)
        assert status == "optimal"
        mask[rows] = part
    assert objective_value(mask, scores, lam) == pytest.approx(best, abs=1e-7)


def test_large_instance_is_proven_optimal():
    # N = 100 x L = 50 at a lambda where reductions leave a part for CBC (a plain MILP ran out of time)
    rng = np.random.default_rng(0)
    scores = rng.gamma(1.0, 1.0, (100, 50))
    scores /= scores.mean()
    result = solve_ilp(scores, np.ones(50), np.full(100, 10.0), 0.01, required=(49,), time_limit_s=120)
    assert result.status == "optimal"
    assert (result.mask.sum(axis=1) <= 10).all() and result.mask[:, 49].all()
    # at least as good as every client's own top layers and as one common set
    own = np.zeros_like(result.mask)
    own[:, 49] = True
    own[np.arange(100)[:, None], np.argsort(-scores[:, :49], axis=1)[:, :9]] = True
    common = np.tile(np.isin(np.arange(50), np.append(np.argsort(-scores[:, :49].sum(0))[:9], 49)), (100, 1))
    assert result.objective >= max(objective_value(own, scores, 0.01), objective_value(common, scores, 0.01)) - 1e-9


def test_time_limit_with_parameter_costs_keeps_the_incumbent(caplog):
    # wide parameter-count costs make the final MILP hard: a short limit returns a feasible selection
    rng = np.random.default_rng(1)
    costs = np.round(rng.lognormal(13.0, 1.0, 30))
    budgets = np.full(60, 0.2 * costs.sum())
    scores = rng.gamma(1.0, 1.0, (60, 30))
    with caplog.at_level(logging.WARNING, logger="fedselect.core.selection"):
        result = solve_ilp(scores, costs, budgets, 0.02, required=(29,), time_limit_s=0.5)
    assert result.status in ("optimal", "time_limit")
    assert (result.cost_per_client(costs) <= budgets + 1e-6).all() and result.mask[:, 29].all()
    if result.status == "time_limit":
        assert "time limit" in caplog.text and "upper bound" in caplog.text


@pytest.mark.parametrize("time_limit_s", [0.05, None])
def test_cbc_calling_a_timed_out_problem_infeasible_keeps_the_start(monkeypatch, time_limit_s):
    """CBC stopped by its time limit can report "Infeasible" (seen once in CI with 0.07 s left): the
    feasible start is the time-limited answer; without a time limit the report stays an error."""
    import pulp

    def stopped(prob, solver=None):
        prob.status, prob.sol_status, prob.solutionTime = pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible, 0.06

    monkeypatch.setattr(pulp.LpProblem, "solve", stopped)
    rng = np.random.default_rng(3)
    n, L = 4, 5
    scores, costs = rng.random((n, L)), np.ones(L)
    fix = np.full((n, L), -1, dtype=np.int8)
    counts = np.ones((n + 1, L), dtype=bool)
    start = np.zeros((n, L), dtype=bool)
    rows = np.arange(n)
    args = (scores, costs, np.full(n, 2.0), 0.1, fix, counts, rows, start, time_limit_s, None)
    if time_limit_s is None:
        with pytest.raises(selection_cbc.SelectionError, match="Infeasible"):
            selection_cbc._solve_part(*args)
    else:
        part, status = selection_cbc._solve_part(*args)
        assert status == "time_limit" and (part == start).all()


def test_zero_time_limit_still_returns_a_feasible_selection():
    rng = np.random.default_rng(2)
    costs = rng.integers(1, 9, 12).astype(float)
    result = solve_ilp(rng.random((30, 12)), costs, np.full(30, 15.0), 0.005, time_limit_s=0.0)
    assert result.status in ("optimal", "time_limit")
    assert (result.cost_per_client(costs) <= 15.0 + 1e-9).all()


def test_both_goes_on_from_one_side_when_the_other_is_blocked():
    # the bottom layer costs 5 and never fits, so 'both' keeps taking layers from the top
    assert select_layers("both", costs=[5, 1, 1, 1, 1], budgets=[3.0]).selected(0) == [2, 3, 4]
    assert select_layers("both", costs=[1, 1, 1, 1, 5], budgets=[3.0]).selected(0) == [0, 1, 2]
    # top stops at its first layer that does not fit (contiguous), bottom likewise
    assert select_layers("top", costs=[1, 1, 5, 1, 1], budgets=[3.0]).selected(0) == [3, 4]
    assert select_layers("bottom", costs=[1, 1, 5, 1, 1], budgets=[3.0]).selected(0) == [0, 1]
    # random skips what does not fit and goes on
    row = select_layers("random", costs=[5, 1, 1, 1, 1], budgets=[4.0], seed=0).selected(0)
    assert sum([5, 1, 1, 1, 1][j] for j in row) <= 4 and len(row) == 4


def test_full_ignores_budgets_and_bad_numbers_fail():
    full = select_layers("full", costs=[3, 3], budgets=[1.0, 1.0])
    assert full.mask.all() and full.status == "heuristic"
    with pytest.raises(SelectionError, match="lambda"):
        solve_ilp(np.ones((1, 2)), [1, 1], [1], -0.1)
    with pytest.raises(SelectionError, match="costs"):
        solve_ilp(np.ones((1, 2)), [1, -1], [1], 0.0)
    with pytest.raises(SelectionError, match="budgets"):
        solve_ilp(np.ones((1, 2)), [1, 1], [-1], 0.0)
    with pytest.raises(InfeasibleBudgetError, match="client 0's budget 1 .* cost 2"):
        solve_ilp(np.ones((2, 2)), [1, 1], [1, 3], 0.0, required=(0, 1))
