"""One client's layers under its budget: a 0/1 knapsack, greedy or exact (no solver needed).

Problem (P) of arXiv 2408.15600 (Sec. 4.2) without the disagreement term, or with it linear (one
client free to choose while the others are held), is one 0/1 knapsack per client: the layer-selection
solver (:mod:`fedselect.core.selection_milp`) calls :func:`greedy_rows` for its heuristics and
:func:`knapsack` wherever a row is a subproblem of its own (lambda = 0 for SNR and RGN, or a client
left alone by the reductions), which before took one CBC call each (100 clients x 50 layers with
parameter-count costs: 1.4-2.5 s in CBC).
"""

from __future__ import annotations

import bisect

import numpy as np

from fedselect.core.selection_problem import _EPS

# nodes of the depth-first search before it gives up and the caller's MILP solves the row instead; a
# random 50-layer row with parameter-count costs takes tens to a few thousand
_NODE_LIMIT = 200_000


class KnapsackLimit(RuntimeError):
    """The exact search hit its node limit (the caller falls back to a MILP)."""


def greedy_rows(values: np.ndarray, costs: np.ndarray, budgets: np.ndarray, fix: np.ndarray) -> np.ndarray:
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


def knapsack(values: np.ndarray, costs: np.ndarray, capacity: float) -> np.ndarray:
    """The items (bool mask) of largest total value whose costs sum to at most ``capacity``, exactly.

    Depth-first branch and bound over the items sorted by value per cost, pruned by the Dantzig
    bound (the LP relaxation: whole items in that order, then a fraction of the first that does
    not fit), including before excluding (Horowitz-Sahni). Items of value <= 0 are never taken and
    free ones (cost 0) always; a tie between selections of equal value keeps the first found.
    Raises :class:`KnapsackLimit` after ``_NODE_LIMIT`` nodes.
    """
    v, c = np.asarray(values, dtype=float), np.asarray(costs, dtype=float)
    take = np.zeros(v.size, dtype=bool)
    take[(v > 0) & (c <= _EPS)] = True
    cand = np.flatnonzero((v > 0) & (c > _EPS) & (c <= capacity + _EPS))
    if cand.size == 0:
        return take
    order = cand[np.argsort(-(v[cand] / c[cand]), kind="stable")]
    vs, cs = v[order].tolist(), c[order].tolist()
    cum_c, cum_v = np.concatenate([[0.0], np.cumsum(cs)]).tolist(), np.concatenate([[0.0], np.cumsum(vs)]).tolist()
    m, cap = len(vs), float(capacity) + _EPS
    tol = 1e-12 * (1.0 + cum_v[-1])

    def bound(j: int, room: float) -> float:
        # items j.. whole while they fit (prefix sums), then a fraction of the next
        end = bisect.bisect_right(cum_c, cum_c[j] + room, lo=j) - 1
        value = cum_v[end] - cum_v[j]
        if end < m:
            value += (room - (cum_c[end] - cum_c[j])) * vs[end] / cs[end]
        return value

    best_value = -1.0
    best: list[int] = []
    chosen: list[int] = []
    nodes = 0

    def search(j: int, room: float, value: float) -> None:
        nonlocal best_value, best, nodes
        nodes += 1
        if nodes > _NODE_LIMIT:
            raise KnapsackLimit(f"knapsack search passed {_NODE_LIMIT} nodes")
        if value > best_value + tol:
            best_value, best = value, chosen.copy()
        if j == m or value + bound(j, room) <= best_value + tol:
            return
        if cs[j] <= room:
            chosen.append(j)
            search(j + 1, room - cs[j], value + vs[j])
            chosen.pop()
        search(j + 1, room, value)

    search(0, cap, 0.0)
    take[order[best]] = True
    return take


def knapsack_rows(values: np.ndarray, costs: np.ndarray, budgets: np.ndarray, fix: np.ndarray) -> np.ndarray:
    """:func:`knapsack` per row over its free entries (``fix`` -1), the fixed-in ones (1) taken."""
    out = fix == 1
    for i in range(values.shape[0]):
        free = np.flatnonzero(fix[i] == -1)
        room = float(budgets[i] - costs @ out[i])
        out[i, free[knapsack(values[i, free], costs[free], room)]] = True
    return out
