"""The exact solver of problem (P) behind :func:`fedselect.core.selection.solve_ilp`.

Problem (P) of selective layer fine-tuning (arXiv 2408.15600, Sec. 4.2): maximize
sum_i sum_l m_il S_il - lambda * sum_l k_l (N - k_l) over binary m subject to every client's budget
sum_l m_il c_l <= B_i, with k_l = sum_i m_il (see :mod:`fedselect.core.selection`). Here are the steps
that solve it exactly (their reasoning is in ``solve_ilp``'s docstring): best-response local search
for an incumbent, variable fixing by score dominance and by a Lagrangian bound, splitting what is left
into independent parts, and a PuLP/CBC MILP per part.

Separate from :mod:`fedselect.core.selection` because these are the internals of one strategy and
make up most of the code: that module stays the public interface (strategies, validation, results)
and calls :func:`solve_exact`. The objective, :class:`SelectionError` and the budget tolerance are
defined here, the lower of the two modules, so both use them without an import cycle; ``selection``
re-exports the public ones.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pulp

# slack in budget and cost comparisons, so float sums of layer costs that meet a budget exactly still fit
_EPS = 1e-9
# layers left with this many free entries or fewer get the exact pairwise model in the final MILP (at
# most 28 pairs each, so the model stays linear in N x L); larger ones the per-entry one
_PAIRWISE_MAX = 8


class SelectionError(ValueError):
    """The selection problem is malformed or could not be solved."""


def disagreement(mask: np.ndarray) -> float:
    """D(m) = sum_l k_l (N - k_l), which equals sum_l sum_{i<j} (m_il - m_jl)^2 for binary m."""
    mask = np.asarray(mask, dtype=bool)
    k = mask.sum(axis=0).astype(float)
    return float((k * (mask.shape[0] - k)).sum())


def objective_value(mask: np.ndarray, scores: np.ndarray, lam: float) -> float:
    """The objective of problem (P) at a selection."""
    return float((np.asarray(mask, dtype=float) * np.asarray(scores, dtype=float)).sum() - lam * disagreement(mask))


def solve_exact(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, req: tuple[int, ...], *,
                started: float, time_limit_s: float | None,
                threads: int | None) -> tuple[np.ndarray, str, float]:
    """Problem (P) on a validated instance, by steps 1-3 of :func:`fedselect.core.selection.solve_ilp`.

    ``started`` is the ``time.perf_counter()`` the time limit counts from. Returns the selection, its
    status ("optimal" or "time_limit") and the best upper bound proven (inf if none was computed).
    """
    n, L = s.shape
    if c.any() and np.all(c == np.round(c)) and c.max() < 2.0**53:
        # integer costs: a row's cost is a multiple of their gcd, so rounding each budget down to one keeps
        # the same rows feasible and tightens the budget relaxation of step 2 (4.7 unit layers -> 4)
        g = float(np.gcd.reduce(c.astype(np.int64)))
        b = np.floor((b + _EPS) / g) * g
    scale = float(s.sum()) + lam * L * n * n / 4.0  # the objective's magnitude, for relative tolerances
    tol = 1e-9 * scale if scale > 0 else 1e-12
    fix = np.full((n, L), -1, dtype=np.int8)  # -1 free, else the value every optimum has
    fix[:, list(req)] = 1
    counts = np.ones((n + 1, L), dtype=bool)  # counts[k, l]: k_l = k is not ruled out
    total = np.tile(s.sum(axis=0), (n, 1))
    starts = [_greedy_rows(s, c, b, fix), _greedy_rows(total, c, b, fix),  # own best layers; nested sets
              np.tile(_common_row(s.sum(axis=0), c, float(b.min()), fix[0]), (n, 1))]  # the best common set
    best = max((_best_response(m, s, c, b, lam, fix, tol) for m in starts), key=lambda m: objective_value(m, s, lam))
    lower, upper, mu = objective_value(best, s, lam), np.inf, np.zeros(n)
    for _ in range(50):
        changed = _fix_by_dominance(s, c, b, lam, fix, counts, tol)
        candidate = _best_response(best, s, c, b, lam, fix, tol)
        if objective_value(candidate, s, lam) > lower:
            best, lower = candidate, objective_value(candidate, s, lam)
        if (fix >= 0).all():
            break
        upper, mu = _lagrange_bound(s, c, b, lam, fix, counts, lower, tol, mu)
        candidate = _best_response(_lagrange_rows(s, c, b, lam, fix, counts, mu), s, c, b, lam, fix, tol)
        if objective_value(candidate, s, lam) > lower:
            best, lower = candidate, objective_value(candidate, s, lam)
        if upper <= lower + tol:
            break
        changed += _fix_by_lagrange(s, c, b, lam, fix, counts, mu, lower, tol)
        if not changed:
            break
    status = "optimal"
    if (fix >= 0).all():
        best = fix == 1
    elif upper > lower + tol:
        best = _best_response(best, s, c, b, lam, fix, tol)
        mask = fix == 1
        for rows in _parts(fix, lam):
            left = None if time_limit_s is None else time_limit_s - (time.perf_counter() - started)
            part, part_status = _solve_part(s, c, b, lam, fix, counts, rows, best, left, threads)
            mask[rows] = part
            status = "optimal" if status == part_status == "optimal" else "time_limit"
        if objective_value(mask, s, lam) >= lower:
            best = mask
    if (best.astype(float) @ c > b + 1e-6).any() or not best[:, list(req)].all():
        raise SelectionError("internal error: the selection breaks a budget or leaves out a required layer")
    return best, status, upper


def _greedy_rows(values: np.ndarray, costs: np.ndarray, budgets: np.ndarray, fix: np.ndarray) -> np.ndarray:
    """Per row: the fixed-in layers, then free layers of positive value by value per cost while they
    fit. Exact for unit costs (the top layers), a feasible knapsack otherwise."""
    out = fix == 1
    left = budgets - out.astype(float) @ costs
    ratio = np.where(costs > 0, values / np.maximum(costs, _EPS), np.inf)
    for i in range(values.shape[0]):
        for j in np.argsort(-ratio[i], kind="stable"):
            if fix[i, j] == -1 and values[i, j] > 0 and costs[j] <= left[i] + _EPS:
                out[i, j] = True
                left[i] -= costs[j]
    return out


def _common_row(values: np.ndarray, costs: np.ndarray, budget: float, fix_row: np.ndarray) -> np.ndarray:
    """The best set of layers for everyone (D = 0) within the smallest budget: a greedy fill for equal
    costs (exact then), else a one-row knapsack in CBC (greedy alone misses it by up to a layer)."""
    row = _greedy_rows(values[None, :], costs, np.array([budget]), fix_row[None, :])[0]
    free = np.flatnonzero((fix_row == -1) & (values > 0))
    if np.all(costs == costs[0]) or free.size == 0:
        return row
    prob = pulp.LpProblem("common_layers", pulp.LpMaximize)
    x = {j: pulp.LpVariable(f"x_{j}", cat="Binary") for j in free}
    prob += pulp.LpAffineExpression({v: float(values[j]) for j, v in x.items()})
    room = budget - costs @ (fix_row == 1) + _EPS
    prob += pulp.LpAffineExpression({v: float(costs[j]) for j, v in x.items()}) <= room
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=5))
    if prob.sol_status != pulp.LpSolutionOptimal:
        return row
    exact = fix_row == 1
    exact[free] = [(x[j].value() or 0.0) > 0.5 for j in free]
    return exact if values @ exact > values @ row else row


def _best_response(mask: np.ndarray, s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray,
                   tol: float) -> np.ndarray:
    """Rows replaced by a greedy best knapsack for w_il = S_il - lambda (N - 2 k'_l - 1) while that
    raises the objective, and rows breaking ``fix`` repaired; stops when a sweep changes nothing."""
    mask = mask.copy()
    n = s.shape[0]
    for _ in range(100):
        changed = False
        k = mask.sum(axis=0)
        for i in range(n):
            w = s[i] - lam * (n - 2 * (k - mask[i]) - 1)
            row = _greedy_rows(w[None, :], c, b[i:i + 1], fix[i:i + 1])[0]
            if ((fix[i] >= 0) & (mask[i] != (fix[i] == 1))).any() or w @ row > w @ mask[i] + tol:
                k += row.astype(int) - mask[i]
                mask[i], changed = row, True
        if not changed:
            break
    return mask


def _fix_by_dominance(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray,
                      counts: np.ndarray, tol: float) -> int:
    """Fix entries every optimum agrees on because every optimal row is a best knapsack (solve_ilp, 1-2)."""
    n = s.shape[0]
    done, ctol = _fix_by_counts(fix, counts), _EPS * (1.0 + float(c.sum()))
    same, cheaper = np.eye(c.size, dtype=bool), c[None, :] <= c[:, None]  # cheaper[l, d]: c_d <= c_l
    k_min, k_max = counts.argmax(axis=0), n - counts[::-1].argmax(axis=0)
    for i in range(n):
        others = fix.copy()
        others[i] = -1
        lo_k = np.maximum((others == 1).sum(axis=0), k_min - 1)  # k'_l = k_l - m_il
        hi_k = np.minimum(n - 1 - (others == 0).sum(axis=0), k_max)
        lo, hi = s[i] - lam * (n - 2 * lo_k - 1), s[i] - lam * (n - 2 * hi_k - 1)  # w_il grows with k'_l
        free, room = fix[i] == -1, b[i] - c @ (fix[i] == 1) - c  # budget left beside each layer
        # out: layers surely better and no dearer (any fix) cannot all fit beside it
        beats = cheaper & (lo[None, :] > hi[:, None] + tol) & (lo[None, :] > tol) & ~same
        out = (hi < -tol) | ((beats & free[None, :]) @ c > room + ctol) | (beats & (fix[i] == 0)[None, :]).any(axis=1)
        # in: all free layers it does not surely beat fit beside it
        beaten = (c[:, None] <= c[None, :]) & (lo[:, None] > hi[None, :] + tol)
        into = (lo > tol) & ((free[None, :] & (hi[None, :] >= -tol) & ~beaten & ~same) @ c <= room - ctol)
        fix[i, free & out], fix[i, free & ~out & into] = 0, 1
        done += int((free & (out | into)).sum())
    return done + _fix_by_counts(fix, counts)


def _fix_by_counts(fix: np.ndarray, counts: np.ndarray) -> int:
    """Drop counts the fixed entries exclude; fix a layer's free entries when only its smallest
    (everyone free out) or largest (everyone free in) count is left."""
    n = fix.shape[0]
    k = np.arange(n + 1)[:, None]
    ones, zeros = (fix == 1).sum(axis=0), (fix == 0).sum(axis=0)
    counts &= (k >= ones) & (k <= n - zeros)
    if not counts.any(axis=0).all():
        raise SelectionError("internal error: the reductions left a layer without a feasible count")
    free = fix == -1
    all_in = counts.argmax(axis=0) == n - zeros  # the smallest count left needs every free entry
    all_out = n - counts[::-1].argmax(axis=0) == ones  # the largest count left needs none of them
    fix[free & all_out[None, :]] = 0
    fix[free & all_in[None, :]] = 1
    return int((free & (all_in | all_out)[None, :]).sum())


def _layer_table(s: np.ndarray, c: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                 mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer under multipliers ``mu``: clients sorted (fixed-in first, free by W = S - mu c, fixed-out
    last), sorted W, prefix sums, k (N - k), and vals[k, l] = the best value of layer l with k clients."""
    n = s.shape[0]
    w = s - mu[:, None] * c[None, :]
    order = np.argsort(-np.where(fix == 1, np.inf, np.where(fix == 0, -np.inf, w)), axis=0, kind="stable")
    ws = np.take_along_axis(w, order, axis=0)
    pref = np.vstack([np.zeros(c.size), np.cumsum(ws, axis=0)])
    k = np.arange(n + 1)[:, None]
    g = (k * (n - k)).astype(float)
    return order, ws, pref, g, np.where(counts, pref - lam * g, -np.inf)


def _lagrange_bound(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                    lower: float, tol: float, mu: np.ndarray, iters: int = 300) -> tuple[float, np.ndarray]:
    """min over mu >= 0 of the budget-relaxed dual, Polyak steps towards ``lower`` from ``mu``: (bound, mu)."""
    n = s.shape[0]
    best, best_mu, step, stall = np.inf, mu, 1.0, 0
    for _ in range(iters):
        order, _, _, _, vals = _layer_table(s, c, lam, fix, counts, mu)
        k_best = vals.argmax(axis=0)
        dual = float(mu @ b + vals.max(axis=0).sum())
        if dual < best - tol:
            best, best_mu, stall = dual, mu.copy(), 0
        else:
            stall += 1
            if stall >= 10:
                step, stall = step / 2, 0
        if best <= lower + tol or step < 1e-3:
            break
        taken = np.zeros((n, c.size))
        np.put_along_axis(taken, order, (np.arange(n)[:, None] < k_best[None, :]).astype(float), axis=0)
        grad = b - taken @ c
        if not grad.any():
            break
        mu = np.maximum(0.0, mu - step * (dual - lower) / float(grad @ grad) * grad)
    return best, best_mu


def _lagrange_rows(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                   mu: np.ndarray) -> np.ndarray:
    """The relaxation's selection at ``mu`` made feasible: rows over budget drop their free layers of
    least score per cost until they fit (a start for best responses; it is often optimal)."""
    order, _, _, _, vals = _layer_table(s, c, lam, fix, counts, mu)
    mask = np.zeros(fix.shape, dtype=bool)
    np.put_along_axis(mask, order, np.arange(s.shape[0])[:, None] < vals.argmax(axis=0)[None, :], axis=0)
    ratio = np.where(c > 0, s / np.maximum(c, _EPS), np.inf)
    for i in np.flatnonzero(mask.astype(float) @ c > b + _EPS):
        for j in np.argsort(ratio[i], kind="stable"):
            if mask[i] @ c <= b[i] + _EPS:
                break
            if fix[i, j] == -1 and mask[i, j]:
                mask[i, j] = False
    return mask


def _fix_by_lagrange(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                     mu: np.ndarray, lower: float, tol: float) -> int:
    """Rule out counts, and fix entries, whose forced dual bound is below the incumbent ``lower``."""
    order, ws, pref, g, vals = _layer_table(s, c, lam, fix, counts, mu)
    rest = float(mu @ b + vals.max(axis=0).sum()) - vals.max(axis=0)  # the dual minus layer l's own term
    dropped = counts & (rest + vals < lower - tol)
    counts &= ~dropped
    done = int(dropped.sum()) + _fix_by_counts(fix, counts)
    vals = np.where(counts, vals, -np.inf)
    rest = float(mu @ b + vals.max(axis=0).sum()) - vals.max(axis=0)
    n, neg = s.shape[0], np.full((1, c.size), -np.inf)
    ones, zeros = (fix == 1).sum(axis=0), (fix == 0).sum(axis=0)
    k = np.arange(n + 1)[:, None]
    # forced in at rank r: a count k > r as sorted, or k <= r with the top k - 1 (fixed-in ones among them) and r
    with_r = np.where(counts & (k >= ones + 1), np.vstack([neg, pref[:-1]]) - lam * g, -np.inf)
    best_with = np.maximum(np.maximum.accumulate(vals[::-1], axis=0)[::-1][1:],
                           ws + np.maximum.accumulate(with_r, axis=0)[:-1])
    # forced out at rank r: a count k <= r as sorted, or k > r with the top k + 1 but r
    without_r = np.where(counts & (k + 1 <= n - zeros), np.vstack([pref[1:], neg]) - lam * g, -np.inf)
    best_without = np.maximum(np.maximum.accumulate(vals, axis=0)[:-1],
                              np.maximum.accumulate(without_r[::-1], axis=0)[::-1][1:] - ws)
    to_out, to_in = np.zeros(fix.shape, dtype=bool), np.zeros(fix.shape, dtype=bool)
    np.put_along_axis(to_out, order, rest + best_with < lower - tol, axis=0)
    np.put_along_axis(to_in, order, rest + best_without < lower - tol, axis=0)
    free = fix == -1
    fix[free & to_out], fix[free & to_in & ~to_out] = 0, 1
    return done + int((free & (to_out | to_in)).sum()) + _fix_by_counts(fix, counts)


def _parts(fix: np.ndarray, lam: float) -> list[np.ndarray]:
    """Row sets of the independent subproblems: rows with free entries, joined when they share a layer
    with two or more free entries (its penalty couples them; with one free entry it is linear)."""
    free = fix == -1
    label = np.arange(fix.shape[0])
    if lam > 0:
        for col in free[:, free.sum(axis=0) >= 2].T:  # join the rows of each coupling layer
            label[np.isin(label, np.unique(label[col]))] = label[col].min()
    return [np.flatnonzero((label == r) & free.any(axis=1)) for r in np.unique(label[free.any(axis=1)])]


def _solve_part(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                rows: np.ndarray, start: np.ndarray, time_limit_s: float | None,
                threads: int | None) -> tuple[np.ndarray, str]:
    """One subproblem as a MILP over its free entries (fixed ones are constants): its rows' mask and status."""
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
        if lam == 0:
            continue
        lo, hi = int(allowed[0]), int(allowed[-1])
        if len(col) <= _PAIRWISE_MAX:
            # k = ones + X, X = sum of the free entries: k (N - k) = ones (N - ones) + (N - 2 ones - 1) X
            # - 2 sum_{a<b} x_a x_b exactly for binaries; y_ab <= x_a, x_b (pushed up by the objective)
            # is the product's concave envelope, so each such layer's LP is as tight as it can be
            for v in col:
                terms[v] -= lam * float(n - 2 * ones - 1)
            for u, v in itertools.combinations(col, 2):
                y = pulp.LpVariable(f"y_{u.name}_{v.name}", lowBound=0, upBound=1)
                prob += y <= u
                prob += y <= v
                terms[y] = 2.0 * lam
            if lo > ones or hi < ones + len(col):
                prob += pulp.lpSum(col) >= lo - ones, f"kmin_{j}"
                prob += pulp.lpSum(col) <= hi - ones, f"kmax_{j}"
            continue
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
    prob += pulp.LpAffineExpression(terms)
    # no MIP start: CBC 2.10's preprocessing can declare the LP infeasible after reading one and return
    # the start as "optimal" (coin-or/Cbc#670; seen here on a 5 x 6 instance); the start is kept aside
    # Gomory cuts off: on the subproblems left here they cost most of CBC's time (2.3 s -> 1.0 s, 11 s -> 10 s
    # and 1.7 s -> 1.6 s on three measured, never slower)
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, threads=threads, options=["gomory off"]))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if prob.status in (pulp.LpStatusInfeasible, pulp.LpStatusUnbounded):
            raise SelectionError(f"CBC reports the layer selection problem {pulp.LpStatus[prob.status]}")
        return start[rows], "time_limit"
    mask = fix[rows] == 1
    for (i, j), v in x.items():
        mask[np.searchsorted(rows, i), j] = (v.value() or 0.0) > 0.5
    if (mask.astype(float) @ c > b[rows] + 1e-6).any():
        raise SelectionError("CBC returned a selection over a client's budget")
    return mask, "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit"
