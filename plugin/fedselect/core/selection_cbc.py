"""The MILPs of the exact layer-selection solver, in PuLP with its bundled CBC.

Step 3 of :func:`fedselect.core.selection.solve_ilp` (problem (P), arXiv 2408.15600, Sec. 4.2): what
the reductions of :mod:`fedselect.core.selection_milp` leave free splits into independent parts
(:func:`_parts`), each solved as a MILP over its free entries (:func:`_solve_part`); and the one-row
knapsack of the best common selection (:func:`_common_row`), one of the solver's starts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pulp

from fedselect.core.knapsack import KnapsackLimit, greedy_rows, knapsack
from fedselect.core.selection_problem import _EPS, SelectionError

# layers left with this many free entries or fewer get the exact pairwise model in the final MILP (at
# most 28 pairs each, so the model stays linear in N x L); larger ones the per-entry one
_PAIRWISE_MAX = 8


def _common_row(values: np.ndarray, costs: np.ndarray, budget: float, fix_row: np.ndarray) -> np.ndarray:
    """The best set of layers for everyone (D = 0) within the smallest budget: a greedy fill for equal
    costs (exact then), else an exact one-row knapsack (greedy alone misses it by up to a layer)."""
    row = greedy_rows(values[None, :], costs, np.array([budget]), fix_row[None, :])[0]
    free = np.flatnonzero((fix_row == -1) & (values > 0))
    if np.all(costs == costs[0]) or free.size == 0:
        return row
    exact = fix_row == 1
    try:
        exact[free[knapsack(values[free], costs[free], budget - costs @ exact)]] = True
    except KnapsackLimit:
        return row
    return exact if values @ exact > values @ row else row


def _parts(fix: np.ndarray, coupled: bool) -> list[np.ndarray]:
    """Row sets of the independent subproblems: rows with free entries, joined (when ``coupled``: lambda
    > 0, or a min-trainers constraint) when they share a layer with two or more free entries (its
    penalty or count constraint couples them; with one free entry it is linear)."""
    free = fix == -1
    label = np.arange(fix.shape[0])
    if coupled:
        for col in free[:, free.sum(axis=0) >= 2].T:  # join the rows of each coupling layer
            label[np.isin(label, np.unique(label[col]))] = label[col].min()
    return [np.flatnonzero((label == r) & free.any(axis=1)) for r in np.unique(label[free.any(axis=1)])]


def _count_runs(prob: pulp.LpProblem, j: int, col: list, ones: int, allowed: np.ndarray) -> None:
    """k_l in the allowed counts: their range, and when they are several runs of consecutive values (a
    min-trainers gap: {0} and [t, N]) one binary per run, sum_r lo_r y_r <= k_l <= sum_r hi_r y_r,
    sum_r y_r = 1."""
    free = [(v, 1.0) for v in col]
    cuts = np.flatnonzero(np.diff(allowed) > 1)
    if cuts.size == 0:
        if allowed[0] > ones:
            prob += pulp.LpAffineExpression(free) >= float(allowed[0] - ones), f"count_lo_{j}"
        if allowed[-1] < ones + len(col):
            prob += pulp.LpAffineExpression(free) <= float(allowed[-1] - ones), f"count_hi_{j}"
        return
    runs = np.split(allowed, cuts + 1)
    y = [pulp.LpVariable(f"run_{j}_{r}", cat="Binary") for r in range(len(runs))]
    prob += pulp.lpSum(y) == 1, f"runs_{j}"
    prob += pulp.LpAffineExpression(free + [(v, -float(r[0])) for v, r in zip(y, runs, strict=True)]) >= -ones
    prob += pulp.LpAffineExpression(free + [(v, -float(r[-1])) for v, r in zip(y, runs, strict=True)]) <= -ones


def _pairwise_layer(prob: pulp.LpProblem, terms: dict, col: list, n: int, ones: int, lam: float) -> None:
    """k = ones + X, X = sum of the free entries: k (N - k) = ones (N - ones) + (N - 2 ones - 1) X
    - 2 sum_{a<b} x_a x_b exactly for binaries; y_ab <= x_a, x_b (pushed up by the objective) is the
    product's concave envelope, so the layer's LP is as tight as it can be."""
    for v in col:
        terms[v] -= lam * float(n - 2 * ones - 1)
    for u, v in itertools.combinations(col, 2):
        y = pulp.LpVariable(f"y_{u.name}_{v.name}", lowBound=0, upBound=1)
        prob += y <= u
        prob += y <= v
        terms[y] = 2.0 * lam


def _entry_layer(prob: pulp.LpProblem, terms: dict, j: int, col: list, n: int, ones: int, allowed: np.ndarray,
                 lam: float) -> None:
    """With k_l = sum_i m_il, k_l (N - k_l) = sum_i max(0, N m_il - k_l) for binaries: one q_il >= N m_il
    - k_l per entry (pushed down by the objective), the secant of k (N - k) over k_l's remaining range,
    and one-hot binaries over its counts when the reductions left a few with gaps (e.g. "none or all")."""
    lo, hi = int(allowed[0]), int(allowed[-1])
    k = pulp.LpVariable(f"k_{j}", lowBound=lo, upBound=hi)
    prob += pulp.LpAffineExpression([(k, 1.0)] + [(v, -1.0) for v in col]) == ones, f"count_{j}"
    pen = pulp.LpVariable(f"pen_{j}", lowBound=0)
    qs = [pulp.LpVariable(f"q_{v.name}", lowBound=0) for v in col]
    for v, q in zip(col, qs, strict=True):
        prob += pulp.LpAffineExpression([(q, 1.0), (v, -float(n)), (k, 1.0)]) >= 0, f"share_{v.name}"
    # pen >= ones (N - k) + sum q: a fixed-in client's share is exactly N - k
    prob += pulp.LpAffineExpression([(pen, 1.0), (k, float(ones))] + [(q, -1.0) for q in qs]) >= ones * n
    if hi > lo:  # the secant of k (N - k) over [lo, hi] lies below it there
        slope = (hi * (n - hi) - lo * (n - lo)) / (hi - lo)
        prob += pulp.LpAffineExpression([(pen, 1.0), (k, -slope)]) >= lo * (n - lo) - slope * lo, f"secant_{j}"
    if len(allowed) <= 16 and len(allowed) < hi - lo + 1:  # a few counts with gaps: one-hot over them
        z = {int(a): pulp.LpVariable(f"z_{j}_{a}", cat="Binary") for a in allowed}
        prob += pulp.lpSum(z.values()) == 1, f"onehot_{j}"
        prob += pulp.LpAffineExpression([(k, 1.0)] + [(v, -float(a)) for a, v in z.items()]) == 0, f"kz_{j}"
        prob += pulp.LpAffineExpression([(pen, 1.0)] + [(v, -float(a * (n - a))) for a, v in z.items()]) >= 0
        for v in col:  # the smallest count means every free entry out, the largest every one in
            if lo == ones:
                prob += v + z[lo] <= 1
            if hi == ones + len(col):
                prob += v - z[hi] >= 0
    terms[pen] = -float(lam)


def _solve_part(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                rows: np.ndarray, start: np.ndarray, time_limit_s: float | None, threads: int | None, *,
                gaps: bool = False) -> tuple[np.ndarray, str]:
    """One subproblem as a MILP over its free entries (fixed ones are constants): its rows' mask and status.

    ``gaps``: the allowed counts of each layer are enforced as constraints (a min-trainers constraint
    is a hard gap); otherwise only their range is, the counts the reductions ruled out being merely
    no better than the incumbent.
    """
    if time_limit_s is not None and time_limit_s <= 0:
        return start[rows], "time_limit"
    n = s.shape[0]
    prob = pulp.LpProblem("layer_selection", pulp.LpMaximize)
    x = {(i, j): pulp.LpVariable(f"m_{i}_{j}", cat="Binary") for i in rows for j in np.flatnonzero(fix[i] == -1)}
    terms = {v: float(s[i, j]) for (i, j), v in x.items()}  # a dict: an expression keeps one coefficient per var
    by_row: dict[int, list] = {int(i): [] for i in rows}
    for (i, j), v in x.items():
        by_row[int(i)].append((v, float(c[j])))
    for i, row in by_row.items():
        prob += pulp.LpAffineExpression(row) <= float(b[i] - c @ (fix[i] == 1)) + _EPS, f"budget_{i}"
    for j in sorted({j for _, j in x}):
        col = [x[i, j] for i in rows if (i, j) in x]
        ones, allowed = int((fix[:, j] == 1).sum()), np.flatnonzero(counts[:, j])
        lo, hi = int(allowed[0]), int(allowed[-1])
        if gaps:
            _count_runs(prob, j, col, ones, allowed)
        if lam == 0:
            continue
        if len(col) > _PAIRWISE_MAX:
            _entry_layer(prob, terms, j, col, n, ones, allowed, lam)
            continue
        _pairwise_layer(prob, terms, col, n, ones, lam)
        if lo > ones or hi < ones + len(col):
            prob += pulp.lpSum(col) >= lo - ones, f"kmin_{j}"
            prob += pulp.lpSum(col) <= hi - ones, f"kmax_{j}"
    prob += pulp.LpAffineExpression(terms)
    # no MIP start: CBC 2.10's preprocessing can declare the LP infeasible after reading one and return
    # the start as "optimal" (coin-or/Cbc#670; seen here on a 5 x 6 instance); the start is kept aside
    # Gomory cuts off: on the subproblems left here they cost most of CBC's time (2.3 s -> 1.0 s, 11 s -> 10 s
    # and 1.7 s -> 1.6 s on three measured, never slower)
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, threads=threads, options=["gomory off"]))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        # CBC stopped by its time limit can call the problem infeasible before it has read it through
        # (seen with 0.07 s left, on a loaded machine); the start is a feasible answer all the same
        timed_out = time_limit_s is not None and prob.solutionTime >= time_limit_s
        if prob.status in (pulp.LpStatusInfeasible, pulp.LpStatusUnbounded) and not timed_out:
            raise SelectionError(f"CBC reports the layer selection problem {pulp.LpStatus[prob.status]}")
        return start[rows], "time_limit"
    mask = fix[rows] == 1
    for (i, j), v in x.items():
        mask[np.searchsorted(rows, i), j] = (v.value() or 0.0) > 0.5
    if (mask.astype(float) @ c > b[rows] + 1e-6).any():
        raise SelectionError("CBC returned a selection over a client's budget")
    return mask, "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit"
