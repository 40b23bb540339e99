"""Per-layer scores a client reports on the global model (arXiv 2408.15600, Sec. 4.1 and baselines).

Each function takes one layer group's batch-averaged loss gradients (and, for RGN, its
parameters) as tensors and returns one non-negative float, so the server's selection problem
gets a clients x layers matrix of finite scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

SCORE_KINDS: tuple[str, ...] = ("grad_norm", "rgn", "snr")


def _flat(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    if not tensors:
        raise ValueError(f"a layer group needs at least one {what} tensor")
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"non-finite {what} values")
    return flat


def squared_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """g_il = ||grad_l F_i(theta)||_2^2, the paper's layer importance (Sec. 4.1)."""
    flat = _flat(grads, "gradient")
    return float(flat.pow(2).sum())


def relative_grad_norm(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> float:
    """RGN = ||g_l|| / ||theta_l|| (Lee et al. 2023, "Surgical fine-tuning", Sec. 3.2).

    A layer whose parameters are all zero has no scale to compare against; it scores 0.
    """
    grad_norm = float(_flat(grads, "gradient").norm())
    param_norm = float(_flat(params, "parameter").norm())
    return grad_norm / param_norm if param_norm > 0 else 0.0


def signal_to_noise(grads: Sequence[torch.Tensor]) -> float:
    """SNR = |mean| / std over the layer's gradient elements.

    The mean's sign only says in which direction the loss falls, not how consistently, so its
    magnitude is used. A constant gradient (std 0) scores 0 when it is zero and ``|mean|`` times
    1e6 otherwise: a large but finite score the ILP can still compare.
    """
    flat = _flat(grads, "gradient")
    mean = float(flat.mean().abs())
    std = float(flat.std(unbiased=False)) if flat.numel() > 1 else 0.0
    if std > 0:
        return mean / std
    return 0.0 if mean == 0 else mean * 1e6


def group_score(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], kind: str) -> float:
    """One layer group's score of ``kind`` (one of :data:`SCORE_KINDS`)."""
    if kind == "grad_norm":
        score = squared_grad_norm(grads)
    elif kind == "rgn":
        score = relative_grad_norm(grads, params)
    elif kind == "snr":
        score = signal_to_noise(grads)
    else:
        raise ValueError(f"unknown score kind {kind!r} (choose from {', '.join(SCORE_KINDS)})")
    if not math.isfinite(score):
        raise ValueError(f"{kind} score is not finite")
    return score


def group_scores(grads_by_group: Mapping[str, Sequence[torch.Tensor]],
                 params_by_group: Mapping[str, Sequence[torch.Tensor]], kind: str) -> dict[str, float]:
    """Scores of every group, in the order of ``grads_by_group``."""
    missing = [g for g in grads_by_group if g not in params_by_group]
    if missing:
        raise ValueError(f"no parameters given for layer group {missing[0]!r}")
    return {g: group_score(grads, params_by_group[g], kind) for g, grads in grads_by_group.items()}
