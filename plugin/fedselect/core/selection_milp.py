"""The exact solver of problem (P) behind :func:`fedselect.core.selection.solve_ilp`: its reductions.

Problem (P) of selective layer fine-tuning (arXiv 2408.15600, Sec. 4.2): maximize
sum_i sum_l m_il S_il - lambda * sum_l k_l (N - k_l) over binary m subject to every client's budget
sum_l m_il c_l <= B_i, with k_l = sum_i m_il (see :mod:`fedselect.core.selection_problem`). Here are the
steps that solve it exactly (their reasoning is in ``solve_ilp``'s docstring): best-response local
search for an incumbent, variable fixing by score dominance and by a Lagrangian bound, splitting what
is left into independent parts, an exact knapsack for a part of one client
(:mod:`fedselect.core.knapsack`) and a PuLP/CBC MILP for a larger one (:mod:`fedselect.core.selection_cbc`).

With a min-trainers constraint (every layer but the required ones trained by no client or by at
least ``min_trainers``; a linear constraint, see :func:`fedselect.core.selection_problem.hard_counts`)
the counts it rules out are excluded from the start, best responses only make moves that keep it,
and fixing by dominance is left out: its premise, that every row of an optimum is a best response to
the others, fails when a row cannot change alone without breaking a count.
"""

from __future__ import annotations

import time

import numpy as np

from fedselect.core.knapsack import KnapsackLimit, greedy_rows, knapsack_rows
from fedselect.core.selection_cbc import _common_row, _parts, _solve_part
from fedselect.core.selection_problem import _EPS, SelectionError, counts_ok, hard_counts, objective_value

__all__ = ["solve_exact"]


def solve_exact(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, req: tuple[int, ...], *,
                started: float, time_limit_s: float | None, threads: int | None,
                min_trainers: int = 1) -> tuple[np.ndarray, str, float]:
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
    t = max(1, int(min_trainers))
    fix = np.full((n, L), -1, dtype=np.int8)  # -1 free, else the value every optimum has
    fix[:, list(req)] = 1
    if lam == 0 and t == 1:  # no coupling: one knapsack per client
        try:
            rows = knapsack_rows(s, c, b, fix)
            return rows, "optimal", objective_value(rows, s, 0.0)
        except KnapsackLimit:
            pass
    counts = hard_counts(n, L, req, t)  # counts[k, l]: k_l = k is not ruled out
    _fix_by_counts(fix, counts)
    best, lower, upper = _reduce(s, c, b, lam, req, t, fix, counts, tol)
    status = "optimal"
    if (fix >= 0).all():
        best = fix == 1
    elif upper > lower + tol:
        best = _best_response(best, s, c, b, lam, fix, tol, t)
        mask = fix == 1
        for rows in _parts(fix, coupled=lam > 0 or t > 1):
            left = None if time_limit_s is None else time_limit_s - (time.perf_counter() - started)
            part, part_status = _solve_rows(s, c, b, lam, fix, counts, rows, best, left, threads, gaps=t > 1)
            mask[rows] = part
            status = "optimal" if status == part_status == "optimal" else "time_limit"
        if objective_value(mask, s, lam) >= lower:
            best = mask
    if (best.astype(float) @ c > b + 1e-6).any() or not best[:, list(req)].all() or not counts_ok(best, req, t):
        raise SelectionError("internal error: the selection breaks a budget, a min-trainers count or leaves out "
                             "a required layer")
    return best, status, upper


def _reduce(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, req: tuple[int, ...], t: int, fix: np.ndarray,
            counts: np.ndarray, tol: float) -> tuple[np.ndarray, float, float]:
    """Steps 1-2: starts and best responses (the incumbent), fixing, the Lagrangian bound, repeated until
    nothing changes; ``fix`` and ``counts`` are narrowed in place. Returns (incumbent, its value, bound)."""
    n = s.shape[0]
    total = np.tile(s.sum(axis=0), (n, 1))
    starts = [greedy_rows(s, c, b, fix), greedy_rows(total, c, b, fix),  # own best layers; nested sets
              np.tile(_common_row(s.sum(axis=0), c, float(b.min()), fix[0]), (n, 1))]  # the best common set
    best = max((_best_response(_repair(m, fix, req, t), s, c, b, lam, fix, tol, t) for m in starts),
               key=lambda m: objective_value(m, s, lam))
    lower, upper, mu = objective_value(best, s, lam), np.inf, np.zeros(n)

    def offer(candidate: np.ndarray) -> None:
        nonlocal best, lower
        value = objective_value(candidate, s, lam)
        if value > lower and counts_ok(candidate, req, t) and ((fix == -1) | (candidate == (fix == 1))).all():
            best, lower = candidate, value

    for _ in range(50):
        changed = _fix_by_dominance(s, c, b, lam, fix, counts, tol) if t == 1 else _fix_by_counts(fix, counts)
        offer(_best_response(best, s, c, b, lam, fix, tol, t))
        if (fix >= 0).all():
            break
        upper, mu = _lagrange_bound(s, c, b, lam, fix, counts, lower, tol, mu)
        relaxed = _repair(_lagrange_rows(s, c, b, lam, fix, counts, mu), fix, req, t)
        offer(_best_response(relaxed, s, c, b, lam, fix, tol, t))
        if upper <= lower + tol:
            break
        changed += _fix_by_lagrange(s, c, b, lam, fix, counts, mu, lower, tol)
        if not changed:
            break
    return best, lower, upper


def _solve_rows(s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray,
                rows: np.ndarray, start: np.ndarray, time_limit_s: float | None, threads: int | None, *,
                gaps: bool) -> tuple[np.ndarray, str]:
    """One part: a single client is a knapsack (its free layers have no other free entry, so each one's
    penalty is linear: k (N - k) = n_1 (N - n_1) + (N - 2 n_1 - 1) m for n_1 fixed-in clients); a larger
    part, or a knapsack past its node limit, is a MILP (:func:`fedselect.core.selection_cbc._solve_part`)."""
    if rows.size == 1:
        n, (i,) = s.shape[0], rows
        ones = (fix == 1).sum(axis=0) - (fix[i] == 1)
        values = s[i] - lam * (n - 2 * ones - 1)
        try:
            return knapsack_rows(values[None, :], c, b[rows], fix[rows]), "optimal"
        except KnapsackLimit:
            pass
    return _solve_part(s, c, b, lam, fix, counts, rows, start, time_limit_s, threads, gaps=gaps)


def _repair(mask: np.ndarray, fix: np.ndarray, req: tuple[int, ...], t: int) -> np.ndarray:
    """``mask`` with every layer that too few clients train (0 < k < t, min-trainers) dropped where not fixed in."""
    if t <= 1:
        return mask
    mask = mask.copy()
    k = mask.sum(axis=0)
    short = (k > 0) & (k < t)
    short[list(req)] = False
    mask[:, short] &= fix[:, short] == 1
    return mask


def _best_response(mask: np.ndarray, s: np.ndarray, c: np.ndarray, b: np.ndarray, lam: float, fix: np.ndarray,
                   tol: float, t: int = 1) -> np.ndarray:
    """Rows replaced by a greedy best knapsack for w_il = S_il - lambda (N - 2 k'_l - 1) while that
    raises the objective, and rows breaking ``fix`` repaired; stops when a sweep changes nothing.

    With min-trainers ``t`` > 1 a row keeps every layer that exactly t clients train (dropping it
    would leave t - 1) and adds none that fewer than t - 1 others train, so a selection meeting the
    constraint keeps meeting it."""
    mask = mask.copy()
    n = s.shape[0]
    for _ in range(100):
        changed = False
        k = mask.sum(axis=0)
        for i in range(n):
            others = k - mask[i]
            w = s[i] - lam * (n - 2 * others - 1)
            row_fix = fix[i:i + 1]
            if t > 1:
                row_fix = row_fix.copy()
                free = row_fix[0] == -1
                row_fix[0, free & (others <= t - 2)] = 0
                held = free & (others == t - 1)
                row_fix[0, held] = mask[i, held]
            row = greedy_rows(w[None, :], c, b[i:i + 1], row_fix)[0]
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


