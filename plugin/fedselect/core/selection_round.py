"""The steps around one round's layer selection: budget draws, score scaling, top-up, logged figures.

Each one is an option of ``algorithm: layersel`` (:class:`fedselect.algorithms.layersel_options.
LayerSelOptions`) that reads the paper (arXiv 2408.15600) or the authors' release
(github.com/hiyuchang/fed_sel_tune at commit 66f07d3, "the release") one way or the other; the
problem itself is solved by :func:`fedselect.core.selection.select_layers`. Framework-free (numpy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from fedselect.core.selection_problem import _EPS, SelectionError

__all__ = ["SCORE_SCALES", "authors_budgets", "required_score_share", "scale_scores", "top_up", "trainer_share",
           "unused_budget"]

# what a round's scores are divided by before the solve: their mean over every scored layer, over the
# layers a client chooses among (the always-trained ones out), or nothing
SCORE_SCALES: tuple[str, ...] = ("scored", "choosable", "none")

_NORMAL = NormalDist()


def _upper_tail_normal(rng: np.random.Generator, a: float, b: float) -> float:
    """One standard normal draw truncated to [a, b], by inverting the upper tail (exact far out in it,
    where rejection would take forever: a budget 8 standard deviations above the mode)."""
    tail_a, tail_b = 0.5 * math.erfc(a / math.sqrt(2.0)), 0.5 * math.erfc(b / math.sqrt(2.0))
    q = tail_b + rng.random() * (tail_a - tail_b)  # P(Z > z) of the draw
    if not 0.0 < q < 1.0:
        return a
    return min(max(-_NORMAL.inv_cdf(q), a), b)


def authors_budgets(num_clients: int, *, minimum: float, maximum: float, unit: float, seed: int,
                    whole: bool) -> np.ndarray:
    """The release's heterogeneous budgets: B_i ~ N(unit, unit^2) truncated to [minimum, maximum].

    The release (src/server.py, "get layer budgets") draws ``truncnorm(a=n_layers - 1, b=n_layers_inc
    + 1, loc=1, scale=1)`` layers, i.e. a normal of mean 1 layer and deviation 1 layer truncated to
    [n_layers, n_layers_inc + 2], rounded to whole layers: every budget is at least the identical one
    (``minimum``), so heterogeneity only adds layers. ``unit`` is one layer (the mean cost of a
    layer the budgets cover); ``whole`` rounds to whole units (unit costs, as the release).
    """
    if num_clients < 1:
        raise SelectionError(f"num_clients must be >= 1, got {num_clients}")
    if not 0 < minimum <= maximum or unit <= 0:
        raise SelectionError(f"budgets need 0 < minimum <= maximum and unit > 0, got {minimum}, {maximum}, {unit}")
    rng = np.random.default_rng([seed, 0xA07B0D])
    a, b = (minimum - unit) / unit, (maximum - unit) / unit
    out = np.array([unit + unit * _upper_tail_normal(rng, a, b) for _ in range(num_clients)])
    if whole:
        out = np.clip(np.floor(out / unit + 0.5) * unit, minimum, maximum)
    return out


def scale_scores(scores: np.ndarray, over: str, required: Sequence[int]) -> np.ndarray:
    """The round's scores (clients x scored layers) divided by their mean over ``over``:

    scored: every scored layer (the always-trained head too when it is scored, ``head_in_budget``);
    choosable: the layers a client chooses among, the ``required`` (always-trained) ones left out;
    none: unchanged (the release: raw squared gradient norms, src/helpers/util.py find_selection_set).
    A zero mean leaves the scores unchanged.
    """
    if over not in SCORE_SCALES:
        raise SelectionError(f"unknown score scaling {over!r} (choose from {', '.join(SCORE_SCALES)})")
    s = np.asarray(scores, dtype=float)
    if over == "none":
        return s
    cols = np.ones(s.shape[1], dtype=bool)
    if over == "choosable":
        cols[list(required)] = False
    mean = float(s[:, cols].mean()) if s.size and cols.any() else 0.0
    return s / mean if mean > 0 else s


def required_score_share(scores: np.ndarray, required: Sequence[int]) -> float:
    """The share of the round's score mass in the always-trained layers (nan without scores)."""
    s = np.asarray(scores, dtype=float)
    total = float(s.sum())
    return float(s[:, list(required)].sum()) / total if total > 0 else float("nan")


def top_up(mask: np.ndarray, scores: np.ndarray, costs: Sequence[float], budgets: Sequence[float], *,
           min_trainers: int = 1) -> np.ndarray:
    """Each client's selection filled up with its own highest-scoring other layers while they fit.

    The release (src/helpers/util.py ``find_selection_set``, after the solve) adds a client's
    top-``budget`` layers by score, lowest of them first, until the cost passes the budget, which
    can leave it one layer over; here layers go in by score, highest first, one that does not fit
    is skipped, and no budget is exceeded. With ``min_trainers`` > 1 only layers that at least that
    many clients already train are added, so the constraint still holds.
    """
    out = np.asarray(mask, dtype=bool).copy()
    s, c, b = np.asarray(scores, dtype=float), np.asarray(costs, dtype=float), np.asarray(budgets, dtype=float)
    eligible = out.sum(axis=0) >= min_trainers if min_trainers > 1 else np.ones(c.size, dtype=bool)
    for i in range(out.shape[0]):
        left = b[i] - c @ out[i]
        for j in np.argsort(-s[i], kind="stable"):
            if not out[i, j] and eligible[j] and c[j] <= left + _EPS:
                out[i, j] = True
                left -= c[j]
    return out


def unused_budget(mask: np.ndarray, costs: Sequence[float], budgets: Sequence[float]) -> np.ndarray:
    """Each client's budget left unused by its selection, in cost units (0 for a selection over it:
    ``full`` ignores budgets)."""
    spent = np.asarray(mask, dtype=float) @ np.asarray(costs, dtype=float)
    return np.maximum(0.0, np.asarray(budgets, dtype=float) - spent)


def trainer_share(mask: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Per layer, the share of the round's aggregation weight held by the clients that trained it.

    The paper's Eq. 7 (and the release's src/server.py ``aggregation``) sets a layer to the
    weighted mean of its trainers' copies, theta_l <- sum_{i in T_l} w_i theta_il / sum_{i in T_l} w_i,
    so a layer one client trained becomes that client's copy. Counting every sampled client S, a
    non-trainer as a zero update, gives theta_l + sum_{i in T_l} w_i (theta_il - theta_l) / sum_{i in S}
    w_i: Eq. 7's step times this share (a server step size, 1 when everyone trained the layer).
    ``mask`` is clients x layers (the accepted clients' rows), ``weights`` their aggregation weights.
    """
    w = np.asarray(weights, dtype=float)
    total = float(w.sum())
    if total <= 0:
        raise SelectionError("the clients' aggregation weights must sum to more than 0")
    return (w @ np.asarray(mask, dtype=float)) / total
