"""Server side of FedSelect: average each entry over the clients that share it.

FedSelect (arXiv 2306.13264, Sec. 3 / Alg. 2 server step): the server averages the shared
parameters u over the sampled clients, entry by entry over only those clients whose mask marks the
entry shared, and keeps a global mask m_G = OR of the client masks. Personal entries are never read
by the server. (The broadcast back, where each client overwrites only its own shared entries, is
:meth:`fedselect.algorithms.base.FedAvgClient.set_model_params`; the finiteness guard on uploads is
:func:`fedselect.algorithms.payload.validate_upload`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedselect.core.masks import Mask, State, validate_mask, validate_same_layout

__all__ = ["masked_average"]


def _check_weights(weights: Sequence[float] | None, n_clients: int) -> list[float]:
    if weights is None:
        return [1.0] * n_clients
    ws = [float(w) for w in weights]
    if len(ws) != n_clients:
        raise ValueError(f"got {len(ws)} weights for {n_clients} clients")
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of client {i} must be finite and >= 0, got {w!r}")
    if not any(w > 0 for w in ws):
        raise ValueError("at least one client weight must be > 0")
    return ws


def _opmath(dtype: torch.dtype) -> torch.dtype:
    # Half-precision products are formed in float32 by PyTorch's scalar multiply; do the same so the
    # all-shared case matches FedML's `params * (n_k / N)` bit for bit in every float dtype.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_average(
    global_state: Mapping[str, Tensor],
    client_states: Sequence[Mapping[str, Tensor]],
    client_masks: Sequence[Mapping[str, Tensor] | None],
    weights: Sequence[float] | None = None,
) -> tuple[State, Mask]:
    """Entry-wise average of u over the clients sharing each entry; returns (theta_G, m_G).

    FedSelect server step: for every entry e, theta_G[e] = sum_{k in S_e} w_k x_k[e] / sum_{k in S_e}
    w_k with S_e the clients whose mask is False at e; ``weights`` are sample counts (FedAvg-style
    weighting) or None for the uniform average of the released code. Entries with no sharing client
    (or only zero-weight ones) keep ``global_state``'s value; m_G = OR of the client masks. A mask of
    None means "nothing personal".

    Arithmetic: each contribution is x_k * (w_k / W_e) with the coefficient formed in float64 and
    cast to the product's precision, summed in client order. With all-False masks this is exactly
    FedML's FedAvg formula ``sum_k x_k * (n_k / N)``, bit for bit. Personal entries are selected
    away with ``torch.where`` before any arithmetic, so NaN/Inf there can never reach the result
    (a product with a 0/1 mask would turn NaN * 0 into NaN, as in the released code).

    Float tensors only. Raises ValueError on an empty client list, on mismatched keys/shapes (naming
    the client and tensor) and on negative, non-finite or all-zero weights.
    """
    n = len(client_states)
    if n == 0:
        raise ValueError("masked_average needs at least one client state")
    if len(client_masks) != n:
        raise ValueError(f"got {len(client_masks)} masks for {n} client states")
    ws = _check_weights(weights, n)
    for i, (cs, cm) in enumerate(zip(client_states, client_masks, strict=True)):
        validate_same_layout(global_state, cs, "global state", f"client {i}'s state")
        if cm is not None:
            try:
                validate_mask(cm, global_state)
            except ValueError as err:
                raise ValueError(f"client {i}'s mask: {err}") from err

    new_global: State = {}
    global_mask: Mask = {}
    for key, g in global_state.items():
        if not g.is_floating_point():
            raise ValueError(f"tensor {key!r} has dtype {g.dtype}; only float tensors can be averaged")
        device = g.device
        compute = _opmath(g.dtype)
        shared_by = []
        union = torch.zeros(g.shape, dtype=torch.bool, device=device)
        # float64 denominators: sums of integer sample counts are exact, as in FedML's Python sum.
        denom = torch.zeros(g.shape, dtype=torch.float64, device=device)
        for cm, w in zip(client_masks, ws, strict=True):
            if cm is None:
                shared = torch.ones(g.shape, dtype=torch.bool, device=device)
            else:
                m = cm[key].to(device)
                shared = ~m
                union |= m
            shared_by.append(shared)
            denom = denom + torch.where(shared, torch.tensor(w, dtype=torch.float64, device=device), 0.0)
        has_weight = denom > 0
        safe_denom = torch.where(has_weight, denom, torch.ones((), dtype=torch.float64, device=device))
        # -0.0 is the additive identity of IEEE floats (0.0 + -0.0 would flip a negative zero).
        acc = torch.full(g.shape, -0.0, dtype=g.dtype, device=device)
        for cs, shared, w in zip(client_states, shared_by, ws, strict=True):
            if w == 0:
                continue
            x = cs[key].detach().to(device)
            coef = (w / safe_denom).to(compute)
            contrib = (x.to(compute) * coef).to(g.dtype)
            acc = torch.where(shared, acc + contrib, acc)
        new_global[key] = torch.where(has_weight, acc, g.detach())
        global_mask[key] = union
    return new_global, global_mask

