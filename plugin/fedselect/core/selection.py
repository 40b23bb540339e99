"""Which layers each client trains: the paper's integer program and the baseline strategies.

Selective layer fine-tuning (arXiv 2408.15600, Sec. 4.2, problem (P)): with scores S_il >= 0
(client i, layer l), layer costs c_l and client budgets B_i, choose binary m_il to

    maximize   sum_i sum_l m_il S_il  -  lambda * D(m)
    subject to sum_l m_il c_l <= B_i   for every client i,

where D(m) = sum_l sum_{i<j} (m_il - m_jl)^2 penalizes clients training different layers. For
binaries D(m) = sum_l k_l (N - k_l) with k_l = sum_i m_il, the number of clients training l.

Layers are indexed from the input (0) to the output (L-1). ``required`` layers (the classifier
head) are trained by every client and their cost counts against each budget.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pulp

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("ilp", "top", "bottom", "both", "snr", "rgn", "full", "random")
# the score each score-based strategy needs from clients (others need none)
SCORE_KIND: dict[str, str] = {"ilp": "grad_norm", "snr": "snr", "rgn": "rgn"}
_EPS = 1e-9
# layers left with this many free entries or fewer get the exact pairwise model in the final MILP (at
# most 28 pairs each, so the model stays linear in N x L); larger ones the per-entry one
_PAIRWISE_MAX = 8


class SelectionError(ValueError):
    """The selection problem is malformed or could not be solved."""


class InfeasibleBudgetError(SelectionError):
    """Some client's budget cannot cover the layers every client must train."""


@dataclass(frozen=True)
class SelectionResult:
    """A selection (clients x layers, True = trains it) and how it was found."""

    mask: np.ndarray
    objective: float
    score_term: float
    penalty_term: float
    status: str  # "optimal", "time_limit" (best found when the limit hit) or "heuristic"
    solve_seconds: float
    strategy: str

    def selected(self, client: int) -> list[int]:
        return [int(j) for j in np.flatnonzero(self.mask[client])]

    def cost_per_client(self, costs: Sequence[float]) -> np.ndarray:
        return self.mask.astype(float) @ np.asarray(costs, dtype=float)


def disagreement(mask: np.ndarray) -> float:
    """D(m) = sum_l k_l (N - k_l), which equals sum_l sum_{i<j} (m_il - m_jl)^2 for binary m."""
    mask = np.asarray(mask, dtype=bool)
    k = mask.sum(axis=0).astype(float)
    return float((k * (mask.shape[0] - k)).sum())


def objective_value(mask: np.ndarray, scores: np.ndarray, lam: float) -> float:
    """The objective of problem (P) at a selection."""
    return float((np.asarray(mask, dtype=float) * np.asarray(scores, dtype=float)).sum() - lam * disagreement(mask))


def _check_problem(costs: Sequence[float], budgets: Sequence[float], lam: float, scores: np.ndarray | None,
                   required: Sequence[int]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    c = np.asarray(costs, dtype=float)
    b = np.asarray(budgets, dtype=float)
    if c.ndim != 1 or c.size == 0:
        raise SelectionError(f"costs must be a non-empty vector, got shape {c.shape}")
    if b.ndim != 1 or b.size == 0:
        raise SelectionError(f"budgets must be a non-empty vector, got shape {b.shape}")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise SelectionError("layer costs must be finite and >= 0")
    if not np.all(np.isfinite(b)) or (b < 0).any():
        raise SelectionError("budgets must be finite and >= 0")
    if not np.isfinite(lam) or lam < 0:
        raise SelectionError(f"lambda must be finite and >= 0, got {lam!r}")
    req = tuple(sorted({int(r) for r in required}))
    if any(not 0 <= r < c.size for r in req):
        raise SelectionError(f"required layers {req} out of range for {c.size} layers")
    if scores is not None:
        if scores.shape != (b.size, c.size):
            raise SelectionError(f"scores have shape {scores.shape}, expected (clients, layers) = ({b.size}, {c.size})")
        if not np.all(np.isfinite(scores)) or (scores < 0).any():
            raise SelectionError("scores must be finite and >= 0")
    floor = float(c[list(req)].sum()) if req else 0.0
    short = np.flatnonzero(b + _EPS < floor)
    if short.size:
        i = int(short[0])
        raise InfeasibleBudgetError(f"client {i}'s budget {b[i]:g} is below the cost {floor:g} of the layers every "
                                    f"client must train {list(req)}")
    return c, b, req


def solve_ilp(scores: np.ndarray, costs: Sequence[float], budgets: Sequence[float], lam: float, *,
              required: Sequence[int] = (), time_limit_s: float | None = 60.0,
              threads: int | None = None) -> SelectionResult:
    """Problem (P) (arXiv 2408.15600, Sec. 4.2) solved exactly: exact reductions, then MILPs in PuLP/CBC.

    Why not one plain MILP: every linear-size model of the concave term k_l (N - k_l) has a weak LP
    relaxation (fractional m_il "pay" almost no disagreement). At N = 100, L = 50 and middling lambda,
    CBC on the one-hot count model had not proved optimality after 20 s, nor on the per-entry model
    below after 140 s. The steps here, each exact (they keep every optimal selection), are:

    1. Best responses (:func:`_best_response`): the objective is a potential: client i changing its
       row alone changes it by sum_l dm_il w_il with w_il = S_il - lambda (N - 2 k'_l - 1), k'_l the
       number of *other* clients training l. So in every optimum each row is a best knapsack for its
       w; best responses from a few starts give the incumbent, a lower bound.
    2. Fixing (:func:`_fix_by_dominance`, :func:`_fix_by_lagrange`): bounds on k'_l bound w_il, so a
       layer beating all but too few others for sure is in the best response, and one beaten for sure
       by enough no dearer layers is out. Relaxing the budgets with multipliers mu_i leaves one problem
       per layer solved exactly (sort clients by S_il - mu_i c_l, try every count k); its minimum over
       mu (Polyak subgradient steps) is an upper bound as strong as the convex hull of each layer's
       penalty, and its selection, repaired, is another start for step 1. Where forcing m_il = 1 - v,
       or a count k_l = k, drops the bound below the incumbent, m_il is fixed to v, or k is ruled out.
       Steps 1-2 repeat until nothing changes.
    3. What is left splits into independent parts (clients coupled only through layers with two or
       more free entries); each is a MILP over its free entries in PuLP's bundled CBC
       (:func:`_solve_part`), without pairwise client variables except within small layers:
       a layer with at most ``_PAIRWISE_MAX`` free entries has k (N - k) = const + (N - 2 n_1 - 1) X
       - 2 sum_{a<b} x_a x_b (X = sum of its free x, n_1 its fixed-in count), whose products get
       y_ab <= x_a, x_b (their concave envelope); a larger one uses, with k_l = sum_i m_il,
       k_l (N - k_l) = sum_i max(0, N m_il - k_l) for binaries: one q_il >= N m_il - k_l, q_il >= 0
       per entry (pushed down by the objective), the secant of k (N - k) over k_l's remaining range,
       and one-hot binaries over its counts when step 2 left a few with gaps (e.g. "none or all").
       Size: O(N L).

    If the bound meets the incumbent, or nothing is left free, CBC is not called. Status "optimal"
    means proven optimal (to 1e-9 of the objective's scale); "time_limit" means the limit hit first and
    the best selection known is returned, with a logged warning that gives the upper bound. Scores on
    a wide scale of costs (parameter counts) make step 3 harder: see bench/selection_solve_time.py.
    """
    s = np.asarray(scores, dtype=float)
    c, b, req = _check_problem(costs, budgets, lam, s, required)
    started = time.perf_counter()
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
    if status == "time_limit":
        log.warning("layer selection hit the %s s time limit: using the best selection found (objective %.6g, "
                    "upper bound %.6g)", time_limit_s, objective_value(best, s, lam), upper)
    return _result(best, s, lam, status, time.perf_counter() - started, "ilp")


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


def _layer_table(s: np.ndarray, c: np.ndarray, lam: float, fix: np.ndarray, counts: np.ndarray, mu: np.ndarray):
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



def _result(mask: np.ndarray, scores: np.ndarray | None, lam: float, status: str, seconds: float,
            strategy: str) -> SelectionResult:
    score_term = float((mask * scores).sum()) if scores is not None else 0.0
    penalty = float(lam * disagreement(mask))
    return SelectionResult(mask=mask, objective=score_term - penalty, score_term=score_term, penalty_term=penalty,
                           status=status, solve_seconds=seconds, strategy=strategy)


def _fill(order: Sequence[int], costs: np.ndarray, budget: float, required: tuple[int, ...], *,
          contiguous: bool) -> np.ndarray:
    """Required layers, then layers in ``order`` while they fit (stopping at the first that does
    not when ``contiguous``, else skipping it)."""
    chosen = np.zeros(costs.size, dtype=bool)
    chosen[list(required)] = True
    left = budget - costs[chosen].sum()
    for j in order:
        if chosen[j]:
            continue
        if costs[j] <= left + _EPS:
            chosen[j] = True
            left -= costs[j]
        elif contiguous:
            break
    return chosen


def _both_row(costs: np.ndarray, budget: float, required: tuple[int, ...]) -> np.ndarray:
    """Required layers, then the next layer from the top and from the bottom alternately, top first. A
    required layer takes its side's turn (the head counts towards the top part, so the parts stay
    equal); a side whose next layer does not fit stops (the budget only shrinks), the other goes on."""
    chosen = np.zeros(costs.size, dtype=bool)
    chosen[list(required)] = True
    left = budget - costs[chosen].sum()
    ends, blocked, side = [costs.size - 1, 0], [False, False], 0  # side 0: top (output end), 1: bottom
    while not all(blocked) and ends[0] >= ends[1]:
        j = ends[side]
        if chosen[j] or costs[j] <= left + _EPS:
            left -= 0.0 if chosen[j] else costs[j]
            chosen[j] = True
            ends[side] += 1 if side else -1
        else:
            blocked[side] = True
        side = side if blocked[1 - side] else 1 - side
    return chosen


def select_layers(strategy: str, *, costs: Sequence[float], budgets: Sequence[float], lam: float = 0.0,
                  scores: np.ndarray | None = None, required: Sequence[int] = (), seed: int = 0,
                  round_idx: int = 0, time_limit_s: float | None = 60.0) -> SelectionResult:
    """Every client's layers under one of :data:`STRATEGIES` (paper Sec. 5 baselines).

    ilp: problem (P) on squared gradient norms. top / bottom: the contiguous block of layers
    nearest the output / input that fits the budget. both: top and bottom layers alternately (top first;
    a side stops at its first layer that does not fit, the other goes on).
    snr / rgn: the best-scoring layers within the budget (an exact knapsack: problem (P) with
    lambda = 0 on those scores). full: every layer for every client, budgets ignored (the upper
    bound). random: a random order per client and round (seeded), filled greedily.
    """
    if strategy not in STRATEGIES:
        raise SelectionError(f"unknown layer selection strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    s = None if scores is None else np.asarray(scores, dtype=float)
    if strategy in SCORE_KIND and s is None:
        raise SelectionError(f"strategy {strategy!r} needs {SCORE_KIND[strategy]} scores from the clients")
    c, b, req = _check_problem(costs, budgets, lam, s if strategy in SCORE_KIND else None, required)
    n, L = b.size, c.size
    if strategy == "ilp":
        return solve_ilp(s, c, b, lam, required=req, time_limit_s=time_limit_s)
    if strategy in ("snr", "rgn"):
        result = solve_ilp(s, c, b, 0.0, required=req, time_limit_s=time_limit_s)
        return _result(result.mask, s, lam, result.status, result.solve_seconds, strategy)
    started = time.perf_counter()
    if strategy == "full":
        mask = np.ones((n, L), dtype=bool)
    else:
        rows = []
        for i in range(n):
            if strategy == "top":
                rows.append(_fill(range(L - 1, -1, -1), c, b[i], req, contiguous=True))
            elif strategy == "bottom":
                rows.append(_fill(range(L), c, b[i], req, contiguous=True))
            elif strategy == "both":
                rows.append(_both_row(c, b[i], req))
            else:
                order = np.random.default_rng([seed, round_idx, i]).permutation(L)
                rows.append(_fill(order.tolist(), c, b[i], req, contiguous=False))
        mask = np.stack(rows)
    return _result(mask, s, lam, "heuristic", time.perf_counter() - started, strategy)


def heterogeneous_budgets(num_clients: int, *, level: float, minimum: float, maximum: float,
                          seed: int) -> np.ndarray:
    """Per-client budgets from a seeded truncated half-normal (our reading of the paper's Sec. 5).

    B_i = minimum + |z_i| * scale with z_i ~ N(0, 1), redrawn until B_i <= maximum; ``scale`` makes
    the untruncated mean minimum + scale * sqrt(2 / pi) equal to ``level``.
    """
    if num_clients < 1:
        raise SelectionError(f"num_clients must be >= 1, got {num_clients}")
    if not minimum <= level <= maximum:
        raise SelectionError(f"budgets need minimum <= level <= maximum, got {minimum} <= {level} <= {maximum}")
    scale = (level - minimum) / np.sqrt(2.0 / np.pi)
    rng = np.random.default_rng([seed, 0xB0D6E7])
    out = np.empty(num_clients)
    for i in range(num_clients):
        while True:
            value = minimum + abs(rng.standard_normal()) * scale
            if value <= maximum:
                out[i] = value
                break
    return out
