"""Problem (P) of selective layer fine-tuning (arXiv 2408.15600, Sec. 4.2): its objective and error.

maximize sum_i sum_l m_il S_il - lambda * D(m) over binary m, with every client's budget
sum_l m_il c_l <= B_i, where D(m) = sum_l k_l (N - k_l) and k_l = sum_i m_il (the number of clients
training layer l); optionally every layer trained by no client or by at least ``min_trainers``.

The lowest of the selection modules (:mod:`fedselect.core.selection` is the public interface,
:mod:`fedselect.core.selection_milp` the exact solver's reductions, :mod:`fedselect.core.selection_cbc`
its final MILP): all of them use these definitions without an import cycle.
"""

from __future__ import annotations

import numpy as np

# slack in budget and cost comparisons, so float sums of layer costs that meet a budget exactly still fit
_EPS = 1e-9


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


def hard_counts(n: int, num_layers: int, required: tuple[int, ...], min_trainers: int) -> np.ndarray:
    """counts[k, l]: whether k clients may train layer l. All counts, except that a layer other
    than the ``required`` ones is trained by none or by at least ``min_trainers`` clients: with binary
    z_l, min_trainers * z_l <= k_l <= N z_l, a linear constraint of the MILP."""
    counts = np.ones((n + 1, num_layers), dtype=bool)
    if min_trainers > 1:
        body = np.setdiff1d(np.arange(num_layers), np.asarray(required, dtype=int))
        counts[1:min(min_trainers, n + 1)][:, body] = False
    return counts


def counts_ok(mask: np.ndarray, required: tuple[int, ...], min_trainers: int) -> bool:
    """Whether ``mask`` meets the min-trainers constraint (every non-required layer: 0 or >= min_trainers)."""
    if min_trainers <= 1:
        return True
    k = np.asarray(mask, dtype=bool).sum(axis=0)
    body = np.setdiff1d(np.arange(k.size), np.asarray(required, dtype=int))
    return bool(((k[body] == 0) | (k[body] >= min_trainers)).all())
