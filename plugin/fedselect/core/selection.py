"""Which layers each client trains: the paper's integer program and the baseline strategies.

Selective layer fine-tuning (arXiv 2408.15600, Sec. 4.2, problem (P)): with scores S_il >= 0
(client i, layer l), layer costs c_l and client budgets B_i, choose binary m_il to

    maximize   sum_i sum_l m_il S_il  -  lambda * D(m)
    subject to sum_l m_il c_l <= B_i   for every client i,

where D(m) = sum_l sum_{i<j} (m_il - m_jl)^2 penalizes clients training different layers. For
binaries D(m) = sum_l k_l (N - k_l) with k_l = sum_i m_il, the number of clients training l.

Layers are indexed from the input (0) to the output (L-1). ``required`` layers (the classifier
head) are trained by every client and their cost counts against each budget. A layer every client
trains *outside* its budget (the authors' release treats the head so; ``layersel``'s
``head_in_budget: false``) is no part of the problem: the caller leaves it out of the costs and
scores and adds it to every selection afterwards (:mod:`fedselect.algorithms.layersel_budget`).

A min-trainers constraint (``min_trainers`` t: every layer but the required ones is trained by no
client or by at least t) keeps a layer from being one client's copy after the per-layer average
(Eq. 7 of the paper averages a layer over its trainers); with a binary z_l it is the linear
t z_l <= k_l <= N z_l, so the solve stays exact.

This module is the public interface: the strategies, input checks and results. The exact solver's
internals are in :mod:`fedselect.core.selection_milp` (reductions), :mod:`fedselect.core.selection_cbc`
(the MILPs) and :mod:`fedselect.core.knapsack` (one client's knapsack); the steps around a round's
solve (budget draws, score scaling, top-up, logged figures) in :mod:`fedselect.core.selection_round`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedselect.core.selection_milp import solve_exact

# SelectionError, disagreement and objective_value live below the solver (it needs them and must not import
# this module); they are re-exported here, where callers have always imported them
from fedselect.core.selection_problem import _EPS, SelectionError, disagreement, objective_value

__all__ = ["SCORE_KIND", "STRATEGIES", "InfeasibleBudgetError", "SelectionError", "SelectionResult", "disagreement",
           "heterogeneous_budgets", "objective_value", "select_layers", "solve_ilp"]

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("ilp", "top", "bottom", "both", "snr", "rgn", "full", "random")
# the score each score-based strategy needs from clients (others need none)
SCORE_KIND: dict[str, str] = {"ilp": "grad_norm", "snr": "snr", "rgn": "rgn"}


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


def _check_min_trainers(min_trainers: int) -> int:
    if isinstance(min_trainers, bool) or not isinstance(min_trainers, (int, np.integer)) or min_trainers < 1:
        raise SelectionError(f"min_trainers must be an integer >= 1, got {min_trainers!r}")
    return int(min_trainers)


def solve_ilp(scores: np.ndarray, costs: Sequence[float], budgets: Sequence[float], lam: float, *,
              required: Sequence[int] = (), time_limit_s: float | None = 60.0,
              threads: int | None = None, min_trainers: int = 1) -> SelectionResult:
    """Problem (P) (arXiv 2408.15600, Sec. 4.2) solved exactly: exact reductions, then MILPs in PuLP/CBC.

    Why not one plain MILP: every linear-size model of the concave term k_l (N - k_l) has a weak LP
    relaxation (fractional m_il "pay" almost no disagreement). At N = 100, L = 50 and middling lambda,
    CBC on the one-hot count model had not proved optimality after 20 s, nor on the per-entry model
    below after 140 s. The steps, each exact (they keep every optimal selection), are in
    :mod:`fedselect.core.selection_milp` (the functions named below live there):

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
       more free entries); a part of one client is a knapsack, solved exactly by branch and bound
       (:mod:`fedselect.core.knapsack`); a larger one is a MILP over its free entries in PuLP's
       bundled CBC (:func:`fedselect.core.selection_cbc._solve_part`), without pairwise client
       variables except within small layers:
       a layer with at most ``_PAIRWISE_MAX`` free entries has k (N - k) = const + (N - 2 n_1 - 1) X
       - 2 sum_{a<b} x_a x_b (X = sum of its free x, n_1 its fixed-in count), whose products get
       y_ab <= x_a, x_b (their concave envelope); a larger one uses, with k_l = sum_i m_il,
       k_l (N - k_l) = sum_i max(0, N m_il - k_l) for binaries: one q_il >= N m_il - k_l, q_il >= 0
       per entry (pushed down by the objective), the secant of k (N - k) over k_l's remaining range,
       and one-hot binaries over its counts when step 2 left a few with gaps (e.g. "none or all").
       Size: O(N L).

    ``min_trainers`` > 1 adds the min-trainers constraint (module docstring): its ruled-out counts are
    excluded from the start, best responses keep it, step 2 fixes by the Lagrangian bound only, and
    the MILP enforces each layer's allowed counts (one binary per run of them).

    If the bound meets the incumbent, or nothing is left free, CBC is not called. Status "optimal"
    means proven optimal (to 1e-9 of the objective's scale); "time_limit" means the limit hit first and
    the best selection known is returned, with a logged warning that gives the upper bound. Scores on
    a wide scale of costs (parameter counts) make step 3 harder: see bench/selection_solve_time.py.
    """
    s = np.asarray(scores, dtype=float)
    c, b, req = _check_problem(costs, budgets, lam, s, required)
    started = time.perf_counter()
    best, status, upper = solve_exact(s, c, b, lam, req, started=started, time_limit_s=time_limit_s,
                                      threads=threads, min_trainers=_check_min_trainers(min_trainers))
    if status == "time_limit":
        log.warning("layer selection hit the %s s time limit: using the best selection found (objective %.6g, "
                    "upper bound %.6g)", time_limit_s, objective_value(best, s, lam), upper)
    return _result(best, s, lam, status, time.perf_counter() - started, "ilp")


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
                  round_idx: int = 0, time_limit_s: float | None = 60.0, min_trainers: int = 1) -> SelectionResult:
    """Every client's layers under one of :data:`STRATEGIES` (paper Sec. 5 baselines).

    ilp: problem (P) on squared gradient norms. top / bottom: the contiguous block of layers
    nearest the output / input that fits the budget. both: top and bottom layers alternately (top first;
    a side stops at its first layer that does not fit, the other goes on).
    snr / rgn: the best-scoring layers within the budget (an exact knapsack: problem (P) with
    lambda = 0 on those scores). full: every layer for every client, budgets ignored (the upper
    bound). random: a random order per client and round (seeded), filled greedily.
    ``min_trainers`` > 1 (ilp, snr, rgn only: a constraint of their exact solve) keeps every
    non-required layer trained by no client or by at least that many.
    """
    if strategy not in STRATEGIES:
        raise SelectionError(f"unknown layer selection strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    s = None if scores is None else np.asarray(scores, dtype=float)
    if strategy in SCORE_KIND and s is None:
        raise SelectionError(f"strategy {strategy!r} needs {SCORE_KIND[strategy]} scores from the clients")
    c, b, req = _check_problem(costs, budgets, lam, s if strategy in SCORE_KIND else None, required)
    n, L = b.size, c.size
    if _check_min_trainers(min_trainers) > 1 and strategy not in SCORE_KIND:
        raise SelectionError(f"a min-trainers constraint is part of the exact solve of {', '.join(SCORE_KIND)}; "
                             f"strategy {strategy!r} has none")
    if strategy == "ilp":
        return solve_ilp(s, c, b, lam, required=req, time_limit_s=time_limit_s, min_trainers=min_trainers)
    if strategy in ("snr", "rgn"):
        result = solve_ilp(s, c, b, 0.0, required=req, time_limit_s=time_limit_s, min_trainers=min_trainers)
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
