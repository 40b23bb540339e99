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
    """Problem (P) solved exactly as a MILP with PuLP's bundled CBC.

    The concave term k_l (N - k_l) is linearized exactly by one-hot count variables
    z_lj in {0,1}, j = 0..N: sum_j z_lj = 1, sum_j j z_lj = sum_i m_il, and
    D = sum_l sum_j j (N - j) z_lj. That adds L (N + 1) binaries and 2L equalities, so the
    model grows linearly in clients x layers (no pairwise client variables). With lambda = 0
    the count variables are left out and the problem splits into one knapsack per client.

    The LP relaxation of this (or any linear-size) form of the concave term is weak, so CBC may
    need many branches for middling lambda; it starts from the better of two feasible
    selections (each client's own best layers, and one common set for all), so a time limit
    always leaves a feasible selection, reported with status "time_limit" and logged.
    """
    s = np.asarray(scores, dtype=float)
    c, b, req = _check_problem(costs, budgets, lam, s, required)
    n, L = s.shape
    started = time.perf_counter()
    prob = pulp.LpProblem("layer_selection", pulp.LpMaximize)
    m = [[pulp.LpVariable(f"m_{i}_{j}", cat="Binary") for j in range(L)] for i in range(n)]
    score_term = pulp.lpSum(float(s[i, j]) * m[i][j] for i in range(n) for j in range(L) if s[i, j] != 0)
    penalty = 0
    if lam > 0:
        z = [[pulp.LpVariable(f"z_{j}_{k}", cat="Binary") for k in range(n + 1)] for j in range(L)]
        for j in range(L):
            prob += pulp.lpSum(z[j]) == 1
            prob += pulp.lpSum(k * z[j][k] for k in range(1, n + 1)) == pulp.lpSum(m[i][j] for i in range(n))
        penalty = pulp.lpSum(float(lam * k * (n - k)) * z[j][k] for j in range(L) for k in range(1, n))
    prob += score_term - penalty
    start = _warm_start(s, c, b, lam, req)
    for i in range(n):
        for j in range(L):
            m[i][j].setInitialValue(int(start[i, j]))
    if lam > 0:
        for j, count in enumerate(start.sum(axis=0)):
            for k in range(n + 1):
                z[j][k].setInitialValue(int(k == count))
    for i in range(n):
        prob += pulp.lpSum(float(c[j]) * m[i][j] for j in range(L) if c[j] != 0) <= float(b[i]) + _EPS
        for j in req:
            prob += m[i][j] == 1
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, threads=threads, warmStart=True)
    prob.solve(solver)
    seconds = time.perf_counter() - started
    status = pulp.LpStatus[prob.status]
    solution_status = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    mask = np.array([[(m[i][j].value() or 0.0) > 0.5 for j in range(L)] for i in range(n)], dtype=bool)
    if status != "Optimal" and prob.sol_status not in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal):
        raise SelectionError(f"CBC found no selection ({status}, {solution_status}) within {time_limit_s} s")
    over = np.flatnonzero(mask.astype(float) @ c > b + 1e-6)
    if over.size:
        raise SelectionError(f"solver returned a selection over client {int(over[0])}'s budget")
    if not mask[:, list(req)].all():
        raise SelectionError("solver returned a selection without a required layer")
    outcome = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit"
    if outcome == "time_limit":
        log.warning("layer selection hit the %s s time limit: using the best selection found (%s)",
                    time_limit_s, solution_status)
    return _result(mask, s, lam, outcome, seconds, "ilp")


def _greedy_knapsack(values: np.ndarray, costs: np.ndarray, budget: float, required: tuple[int, ...]) -> np.ndarray:
    """Required layers, then the rest by value per unit cost while they fit (a feasible start)."""
    ratio = np.where(costs > 0, values / np.maximum(costs, _EPS), np.inf)
    order = [int(j) for j in np.argsort(-ratio, kind="stable") if values[j] > 0]
    return _fill(order, costs, budget, required, contiguous=False)


def _warm_start(scores: np.ndarray, costs: np.ndarray, budgets: np.ndarray, lam: float,
                required: tuple[int, ...]) -> np.ndarray:
    """The better of: every client's own greedy best layers; one common greedy set for all."""
    own = np.stack([_greedy_knapsack(scores[i], costs, budgets[i], required) for i in range(budgets.size)])
    common_row = _greedy_knapsack(scores.sum(axis=0), costs, float(budgets.min()), required)
    common = np.tile(common_row, (budgets.size, 1))
    return max((own, common), key=lambda mask: objective_value(mask, scores, lam))


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


def _both_order(num_layers: int) -> list[int]:
    """Top and bottom layers alternately, top first: L-1, 0, L-2, 1, ..."""
    order, lo, hi = [], 0, num_layers - 1
    while lo <= hi:
        order.append(hi)
        if lo != hi:
            order.append(lo)
        lo, hi = lo + 1, hi - 1
    return order


def select_layers(strategy: str, *, costs: Sequence[float], budgets: Sequence[float], lam: float = 0.0,
                  scores: np.ndarray | None = None, required: Sequence[int] = (), seed: int = 0,
                  round_idx: int = 0, time_limit_s: float | None = 60.0) -> SelectionResult:
    """Every client's layers under one of :data:`STRATEGIES` (paper Sec. 5 baselines).

    ilp: problem (P) on squared gradient norms. top / bottom: the contiguous block of layers
    nearest the output / input that fits the budget. both: top and bottom layers alternately.
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
                rows.append(_fill(_both_order(L), c, b[i], req, contiguous=True))
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
