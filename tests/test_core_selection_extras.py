"""Issue 18's additions to the selection core: the exact knapsack, the min-trainers constraint, and the
steps around a round's solve (authors' budget draw, score scaling, top-up, logged figures)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedselect.core.knapsack import knapsack
from fedselect.core.selection import SelectionError, objective_value, select_layers, solve_ilp


def brute_knapsack(values, costs, capacity):
    m = len(values)
    return max(values[list(s)].sum() if s else 0.0 for r in range(m + 1) for s in itertools.combinations(range(m), r)
               if costs[list(s)].sum() <= capacity + 1e-9)


def test_knapsack_is_exact():
    rng = np.random.default_rng(3)
    for _ in range(200):
        m = int(rng.integers(1, 10))
        values, costs = rng.normal(1.0, 1.0, m), rng.integers(0, 6, m).astype(float)
        capacity = float(rng.integers(0, 15))
        taken = knapsack(values, costs, capacity)
        assert costs[taken].sum() <= capacity + 1e-9
        assert values[taken].sum() == pytest.approx(brute_knapsack(values, costs, capacity), abs=1e-9)


def brute_min_trainers(scores, costs, budgets, lam, required, t):
    n, L = scores.shape
    rows = [[np.array(bits, dtype=bool) for bits in itertools.product([0, 1], repeat=L)
             if all(bits[r] for r in required) and np.array(bits) @ costs <= budgets[i] + 1e-9] for i in range(n)]
    best = -np.inf
    for combo in itertools.product(*rows):
        mask = np.stack(combo)
        k = mask.sum(axis=0)
        if all(k[j] == 0 or k[j] >= t for j in range(L) if j not in required):
            best = max(best, objective_value(mask, scores, lam))
    return best


def min_trainer_instances(count, seed):
    rng = np.random.default_rng(seed)
    for case in range(count):
        n, L = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        costs = np.ones(L) if case % 2 else rng.integers(1, 4, L).astype(float)
        required = (L - 1,) if case % 3 else ()
        floor = costs[list(required)].sum()
        budgets = floor + rng.integers(0, int(costs.sum() - floor) + 1, n).astype(float)
        lam = [0.0, 0.05, 0.3, 2.0][case % 4]
        yield rng.gamma(1.0, 1.0, (n, L)), costs, budgets, lam, required, int(rng.integers(2, n + 2))


@pytest.mark.parametrize("instance", list(min_trainer_instances(30, 21)))
def test_min_trainers_solve_matches_exhaustive_search(instance):
    scores, costs, budgets, lam, required, t = instance
    result = solve_ilp(scores, costs, budgets, lam, required=required, min_trainers=t)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(brute_min_trainers(scores, costs, budgets, lam, required, t), abs=1e-7)
    k = result.mask.sum(axis=0)
    assert all(k[j] == 0 or k[j] >= t for j in range(len(costs)) if j not in required)
    assert (result.cost_per_client(costs) <= budgets + 1e-9).all() and result.mask[:, list(required)].all()


def test_min_trainers_on_a_larger_instance_holds_and_never_beats_the_unconstrained_optimum():
    rng = np.random.default_rng(2)
    scores = rng.gamma(1.0, 1.0, (12, 10))
    costs, budgets = np.ones(10), np.full(12, 4.0)
    free = solve_ilp(scores, costs, budgets, 0.0, required=(9,))
    assert (free.mask.sum(axis=0) == 1).any()  # without it some layer has a single trainer
    for strategy in ("ilp", "snr", "rgn"):
        result = select_layers(strategy, costs=costs, budgets=budgets, lam=0.0, scores=scores, required=(9,),
                               min_trainers=3)
        k = result.mask.sum(axis=0)[:9]
        assert result.status == "optimal" and ((k == 0) | (k >= 3)).all(), strategy
        assert result.score_term <= free.score_term + 1e-9


def test_min_trainers_is_only_for_the_solved_strategies_and_must_be_positive():
    costs, budgets = np.ones(4), np.full(3, 2.0)
    with pytest.raises(SelectionError, match="min-trainers"):
        select_layers("top", costs=costs, budgets=budgets, required=(3,), min_trainers=2)
    with pytest.raises(SelectionError, match="min_trainers must be an integer >= 1"):
        solve_ilp(np.ones((3, 4)), costs, budgets, 0.1, min_trainers=0)
    # more than the clients: no layer but the required one can be trained
    result = solve_ilp(np.ones((3, 4)), costs, budgets, 0.1, required=(3,), min_trainers=4)
    assert result.mask[:, :3].sum() == 0 and result.mask[:, 3].all()


# ---- the steps around a round's solve (core.selection_round) ---------------------------------

def test_authors_budgets_never_go_below_the_identical_budget():
    from fedselect.core.selection_round import authors_budgets

    whole = authors_budgets(200, minimum=4.0, maximum=10.0, unit=1.0, seed=3, whole=True)
    assert whole.min() >= 4.0 and whole.max() <= 10.0 and np.all(whole == np.round(whole))
    # the release's truncnorm(a=3, b=9, loc=1, scale=1): mostly 4, some 5 (P(x > 4.5) ~ 17 %)
    assert 0.05 < np.mean(whole >= 5) < 0.35 and np.mean(whole == 4) > 0.6
    assert np.array_equal(whole, authors_budgets(200, minimum=4.0, maximum=10.0, unit=1.0, seed=3, whole=True))
    assert not np.array_equal(whole, authors_budgets(200, minimum=4.0, maximum=10.0, unit=1.0, seed=4, whole=True))
    # one layer as the unit: the mode 1 layer below a minimum of 1 layer gives a half-normal above it
    low = authors_budgets(2000, minimum=1.0, maximum=6.0, unit=1.0, seed=0, whole=False)
    assert low.min() >= 1.0 and abs(low.mean() - (1.0 + np.sqrt(2 / np.pi))) < 0.06
    # far in the tail (8 deviations above the mode) still draws, at the minimum's edge
    far = authors_budgets(200, minimum=9e5, maximum=2e6, unit=1e5, seed=1, whole=False)
    assert far.min() >= 9e5 and far.max() < 1e6 and 0.08e5 < far.mean() - 9e5 < 0.18e5  # excess ~ 1/8 deviation


def test_score_scaling_over_scored_or_choosable_layers_or_none():
    from fedselect.core.selection_round import required_score_share, scale_scores

    scores = np.array([[1.0, 3.0, 96.0], [2.0, 2.0, 96.0]])  # the head (last) holds 96 % of the mass
    assert np.allclose(scale_scores(scores, "scored", [2]), scores / scores.mean())
    assert np.allclose(scale_scores(scores, "choosable", [2]), scores / 2.0)
    assert np.array_equal(scale_scores(scores, "none", [2]), scores)
    assert required_score_share(scores, [2]) == pytest.approx(0.96)
    assert np.array_equal(scale_scores(np.zeros((2, 3)), "choosable", [2]), np.zeros((2, 3)))
    with pytest.raises(SelectionError, match="unknown score scaling"):
        scale_scores(scores, "max", [2])


def test_top_up_fills_budgets_with_the_clients_best_layers_and_never_exceeds_them():
    from fedselect.core.selection_round import top_up, unused_budget

    costs = np.array([2.0, 1.0, 3.0, 1.0])
    scores = np.array([[0.9, 0.2, 0.8, 0.1], [0.1, 0.5, 0.2, 0.7]])
    mask = np.array([[False, False, False, True], [False, False, False, True]])
    budgets = np.array([4.0, 3.0])
    filled = top_up(mask, scores, costs, budgets)
    # client 0: layer 0 (best, cost 2) fits, layer 2 (cost 3) does not, layer 1 does
    assert filled[0].tolist() == [True, True, False, True]
    assert filled[1].tolist() == [False, True, False, True] or filled[1].tolist() == [True, False, False, True]
    assert (filled.astype(float) @ costs <= budgets + 1e-9).all() and (filled >= mask).all()
    assert unused_budget(filled, costs, budgets).tolist() == [0.0, float(budgets[1] - filled[1] @ costs)]
    # min_trainers 2: only layers two clients already train may be added
    both = np.array([[True, False, False, True], [True, False, False, True]])
    limited = top_up(both, scores, costs, np.array([6.0, 6.0]), min_trainers=2)
    assert np.array_equal(limited, both)
    assert unused_budget(np.ones((1, 4), dtype=bool), costs, [3.0]).tolist() == [0.0]  # full: over, 0 left


def test_trainer_share_is_each_layers_share_of_the_weight():
    from fedselect.core.selection_round import trainer_share

    mask = np.array([[True, True, False], [False, True, False], [False, True, False]])
    assert np.allclose(trainer_share(mask, [2.0, 1.0, 1.0]), [0.5, 1.0, 0.0])
    with pytest.raises(SelectionError, match="weights"):
        trainer_share(mask, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("case", range(12))
def test_min_trainers_solve_matches_the_plain_milp_on_mid_sized_instances(case):
    # beyond brute force: the reductions + parts + MILP against the MILP alone (nothing fixed, every
    # count gap enforced), which is exact by itself; lambda 0 included (the solve then has no penalty)
    import fedselect.core.selection_cbc as selection_cbc
    from fedselect.core.selection_problem import counts_ok, hard_counts

    rng = np.random.default_rng(100 + case)
    n, L, t = 8, 7, [2, 3, 4][case % 3]
    costs = np.ones(L) if case % 2 else rng.integers(1, 5, L).astype(float)
    budgets = costs[-1] + rng.uniform(0.5, 0.6 * costs.sum(), n)
    scores = rng.gamma(1.0, 1.0, (n, L))
    lam = [0.0, 0.02, 0.2, 1.0][case % 4]
    result = solve_ilp(scores, costs, budgets, lam, required=(L - 1,), min_trainers=t)
    fix = np.full((n, L), -1, dtype=np.int8)
    fix[:, L - 1] = 1
    start = fix == 1
    plain, status = selection_cbc._solve_part(scores, costs, np.floor(budgets) if case % 2 else budgets, lam, fix,
                                              hard_counts(n, L, (L - 1,), t), np.arange(n), start, 60.0, None,
                                              gaps=True)
    assert status == "optimal" and counts_ok(plain, (L - 1,), t)
    assert result.status == "optimal" and counts_ok(result.mask, (L - 1,), t)
    assert result.objective == pytest.approx(objective_value(plain, scores, lam), abs=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_min_trainers_holds_when_the_reductions_rule_out_none_trainers_too(seed):
    # bench-sized (10 clients x 18 layers, heterogeneous budgets): the Lagrangian step can rule out
    # k = 0 for a layer whose 1..t-1 are ruled out by the constraint, leaving [t, ..] for the MILP to keep
    import fedselect.core.selection_cbc as selection_cbc
    from fedselect.core.selection_problem import counts_ok, hard_counts

    rng = np.random.default_rng(seed)
    n, L, t = 10, 18, 3
    scores = rng.gamma(1.0, 1.0, (n, L))
    budgets = np.maximum(1.0, rng.normal(4.0, 1.5, n))
    for lam in (0.0, 0.01):
        result = solve_ilp(scores, np.ones(L), budgets, lam, required=(L - 1,), min_trainers=t)
        assert result.status == "optimal" and counts_ok(result.mask, (L - 1,), t)
    fix = np.full((n, L), -1, dtype=np.int8)
    fix[:, L - 1] = 1
    plain, status = selection_cbc._solve_part(scores, np.ones(L), np.floor(budgets), 0.0, fix,
                                              hard_counts(n, L, (L - 1,), t), np.arange(n), fix == 1, 60.0, None,
                                              gaps=True)
    exact = solve_ilp(scores, np.ones(L), budgets, 0.0, required=(L - 1,), min_trainers=t)
    assert status == "optimal" and exact.objective == pytest.approx(objective_value(plain, scores, 0.0), abs=1e-7)
