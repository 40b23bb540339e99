"""Per-tensor boolean masks over a model's parameters (the u / v split of partial personalization).

Conventions shared by all of ``fedselect.core``:

* a *state* is ``dict[str, Tensor]`` keyed by parameter name;
* a *mask* is ``dict[str, BoolTensor]`` with the same keys and shapes; **True = personal** (kept and
  fine-tuned on the client, never averaged), False = shared (averaged by the server).

The partial-personalization split is Pillutla et al. 2022 ("Federated learning with partial model
personalization", Sec. 2: theta = (u, v)); FedSelect (arXiv 2306.13264, Alg. 1) learns the split
element-wise. Every selection here is an *exact* top-k with a fixed tie rule, because the released
code's ``>= quantile`` rule turns whole layers personal when many changes tie (see ``grow_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

State = dict[str, Tensor]
Mask = dict[str, Tensor]

__all__ = [
    "Mask",
    "PackedTensor",
    "State",
    "empty_mask",
    "full_mask",
    "grow_mask",
    "iou_matrix",
    "mask_iou",
    "pack_mask",
    "personal_count",
    "personal_fraction",
    "personal_fraction_by_group",
    "target_count",
    "topk_mask",
    "topk_masks",
    "true_counts",
    "counted_fraction",
    "topk_mask_global",
    "unpack_mask",
    "validate_mask",
    "validate_same_layout",
]


def target_count(n: int, fraction: float) -> int:
    """Number of entries a fraction of ``n`` stands for: nearest integer, halves rounded up.

    Used wherever the paper speaks of "a fraction p of the parameters" (FedSelect Alg. 1, the
    ``(1 - r)`` largest entries) so that every module rounds the same way. Raises ValueError when
    ``fraction`` is outside [0, 1] or ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    # Python's round() is banker's rounding; half-up is easier to state and to predict in tests.
    return min(n, int(math.floor(fraction * n + 0.5)))


def empty_mask(state: Mapping[str, Tensor]) -> Mask:
    """All-False mask (everything shared): the FedAvg split, theta = u (Pillutla et al. 2022, Sec. 2)."""
    return {k: torch.zeros(v.shape, dtype=torch.bool, device=v.device) for k, v in state.items()}


def full_mask(state: Mapping[str, Tensor]) -> Mask:
    """All-True mask (everything personal): GradLTN's starting mask m = 1 (FedSelect Alg. 1, line 1)."""
    return {k: torch.ones(v.shape, dtype=torch.bool, device=v.device) for k, v in state.items()}


def validate_mask(mask: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    """Check that ``mask`` is a bool mask with exactly the keys and shapes of ``state``.

    Precondition of every masked operation in FedSelect (Alg. 1 and the server's masked average).
    Raises ValueError naming the offending tensor (missing/extra key, shape or dtype mismatch).
    """
    missing = [k for k in state if k not in mask]
    if missing:
        raise ValueError(f"mask is missing tensor {missing[0]!r} (missing: {missing})")
    extra = [k for k in mask if k not in state]
    if extra:
        raise ValueError(f"mask has tensor {extra[0]!r} that the state lacks (extra: {extra})")
    for k, t in state.items():
        m = mask[k]
        if m.dtype != torch.bool:
            raise ValueError(f"mask tensor {k!r} has dtype {m.dtype}, expected torch.bool")
        if tuple(m.shape) != tuple(t.shape):
            raise ValueError(
                f"mask tensor {k!r} has shape {tuple(m.shape)} but the state's has {tuple(t.shape)}"
            )


def validate_same_layout(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], what_a: str = "a", what_b: str = "b"
) -> None:
    """Check two states (or masks) have the same keys and shapes; ValueError names the tensor.

    Precondition of the element-wise operations of FedSelect Alg. 1 (gamma = |theta_i - theta_{i-1}|)
    and of the server average.
    """
    for k in a:
        if k not in b:
            raise ValueError(f"{what_b} is missing tensor {k!r} present in {what_a}")
    for k in b:
        if k not in a:
            raise ValueError(f"{what_b} has tensor {k!r} that {what_a} lacks")
    for k, t in a.items():
        if tuple(t.shape) != tuple(b[k].shape):
            raise ValueError(
                f"tensor {k!r}: {what_a} has shape {tuple(t.shape)}, {what_b} has {tuple(b[k].shape)}"
            )


def topk_mask(scores: Tensor, k: int, *, within: Tensor | None = None) -> Tensor:
    """Exactly ``k`` True entries: the largest ``scores`` among the entries where ``within`` is True.

    Implements "the largest (1 - r) fraction of gamma within m" of FedSelect Alg. 1 as an exact
    top-k. Ties are broken by flat (row-major) index, lower index first, so the count is exact even
    when all scores are equal (the released code's ``>= quantile`` rule selects every tied entry).
    ``within=None`` means the whole tensor. NaN scores among the candidates raise ValueError (a
    diverged client has no meaningful ranking); +-inf are ordinary values.
    """
    if within is None:
        within = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if within.dtype != torch.bool:
        raise ValueError(f"within must be a bool tensor, got {within.dtype}")
    if tuple(within.shape) != tuple(scores.shape):
        raise ValueError(
            f"within has shape {tuple(within.shape)} but scores have shape {tuple(scores.shape)}"
        )
    flat_within = within.reshape(-1)
    n_candidates = int(torch.count_nonzero(flat_within))
    if not (0 <= k <= n_candidates):
        raise ValueError(f"k={k} is outside [0, {n_candidates}] (number of candidate entries)")
    flat = scores.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == n_candidates:
        # every candidate is chosen: no selection, but NaN among them still has no ranking
        if flat.is_floating_point() and bool(torch.isnan(flat).logical_and_(flat_within).any()):
            raise ValueError("scores contain NaN among the candidate entries")
        return within.clone()
    if flat.is_floating_point() and 2 * n_candidates >= flat.numel():
        # most entries are candidates: rank in place, the others pushed below every candidate (-inf
        # ties with a -inf candidate are kept out by the tie rule below), with no gather or scatter
        vals = flat if n_candidates == flat.numel() else torch.where(flat_within, flat, float("-inf"))
        chosen = _top_k_in_order(vals, k, candidates=flat_within)
        return chosen.reshape(scores.shape)
    vals = torch.masked_select(flat, flat_within)
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    # candidates in flat order, as masked_select read them
    out.masked_scatter_(flat_within, _top_k_in_order(vals, k))
    return out.reshape(scores.shape)


def _top_k_in_order(vals: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """Exactly ``k`` True entries of ``vals`` (among ``candidates``): the largest, ties to the lower index.

    The k-th largest value is unique even though the order among tied entries is not; everything
    above it is in, and the tied entries fill the remaining slots in index order. kthvalue is a
    selection (linear time), cheaper than sorting millions of entries per tensor.
    """
    kth = torch.kthvalue(vals, vals.numel() - k + 1).values
    above = vals > kth
    tied = vals == kth
    if candidates is not None:
        tied &= candidates
    # amax propagates NaN: one reduction tells whether a candidate is NaN (non-candidates are -inf)
    nan = torch.isnan(vals.amax()) if vals.is_floating_point() else torch.zeros((), dtype=torch.bool)
    # one host synchronisation for the three figures
    has_nan, n_above, n_tied = (int(c) for c in torch.stack(
        [nan.to(device=vals.device, dtype=torch.int64), torch.count_nonzero(above), torch.count_nonzero(tied)]
    ).tolist())
    if has_nan:
        raise ValueError("scores contain NaN among the candidate entries")
    need = k - n_above
    return above | tied if need == n_tied else above | (tied & (torch.cumsum(tied, 0) <= need))


def true_counts(mask: Mapping[str, Tensor]) -> dict[str, int]:
    """True entries per tensor, counted on the device with one host synchronisation for all."""
    if not mask:
        return {}
    first = next(iter(mask.values())).device
    counts = torch.stack([torch.count_nonzero(m).to(first) for m in mask.values()]).tolist()
    return dict(zip(mask, (int(c) for c in counts), strict=True))


def topk_masks(
    names: Sequence[str],
    score_of: Callable[[str], Tensor],
    ks: Mapping[str, int],
    within: Mapping[str, Tensor],
    *,
    method: str = "auto",
) -> Mask:
    """:func:`topk_mask` of every named tensor: ``ks[n]`` entries of ``score_of(n)`` within ``within[n]``.

    The per-tensor selections of FedSelect Alg. 1 (``topk_scope: tensor``) and of mask growth, for a
    whole model at once. ``method="per_tensor"`` runs :func:`topk_mask` one tensor at a time (one
    score in memory at a time; the CPU default); ``"segmented"`` ranks every tensor in one segmented
    stable sort with a single host synchronisation (the CUDA default, where a selection and a few
    synchronisations per tensor would leave the GPU idle). Both choose exactly the same entries.
    """
    if method == "auto":
        device = within[names[0]].device if names else torch.device("cpu")
        method = "segmented" if device.type == "cuda" else "per_tensor"
    if method == "per_tensor":
        return {n: topk_mask(score_of(n), ks[n], within=within[n]) for n in names}
    if method != "segmented":
        raise ValueError(f"method must be auto, per_tensor or segmented, got {method!r}")
    return _segmented_topk(names, [score_of(n) for n in names], ks, within)


def _segmented_topk(names: Sequence[str], scores: Sequence[Tensor], ks: Mapping[str, int],
                    within: Mapping[str, Tensor]) -> Mask:
    """Every tensor's exact top-k in one pass: order all entries by (tensor, candidate first, score
    descending, flat index) with stable sorts, least significant key first, and keep each tensor's
    first k."""
    if not names:
        return {}
    device = scores[0].device
    flat = torch.cat([sc.detach().reshape(-1).to(device=device, dtype=torch.float64) for sc in scores])
    cand = torch.cat([within[n].reshape(-1).to(device) for n in names])
    size_list = [sc.numel() for sc in scores]
    sizes = torch.tensor(size_list, device=device)
    seg = torch.repeat_interleave(torch.arange(len(names), device=device), sizes)
    # one synchronisation: every tensor's candidate count (k must fit) and whether a candidate is NaN
    figures = torch.cat([torch.zeros(len(names), dtype=torch.int64, device=device).index_add_(0, seg, cand.long()),
                         (torch.isnan(flat) & cand).any().long().view(1)]).tolist()
    if figures[-1]:
        raise ValueError("scores contain NaN among the candidate entries")
    for name, n_candidates in zip(names, figures[:-1], strict=True):
        if not (0 <= ks[name] <= n_candidates):
            raise ValueError(f"k={ks[name]} is outside [0, {n_candidates}] (number of candidate entries) "
                             f"for tensor {name!r}")
    order = torch.argsort(-flat, stable=True)
    order = order[torch.argsort((~cand[order]).to(torch.uint8), stable=True)]
    order = order[torch.argsort(seg[order], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    ranked_seg = seg[order]
    rank = torch.arange(flat.numel(), device=device) - starts[ranked_seg]
    k_of = torch.tensor([ks[n] for n in names], device=device)
    chosen = torch.empty(flat.numel(), dtype=torch.bool, device=device)
    chosen[order] = rank < k_of[ranked_seg]
    out: Mask = {}
    for name, part, sc in zip(names, torch.split(chosen, size_list), scores, strict=True):
        out[name] = part.reshape(sc.shape)
    return out


def topk_mask_global(
    scores: Mapping[str, Tensor], k: int, *, within: Mapping[str, Tensor] | None = None
) -> Mask:
    """Exactly ``k`` True entries over *all* tensors: the largest ``scores`` of the whole model.

    The model-wide ("global") reading of "the largest (1 - r) fraction of gamma within m" in
    FedSelect Alg. 1, as in global lottery-ticket pruning (Frankle & Carbin 2019, Sec. 4). One score
    vector is built by concatenating the flattened tensors in ``scores``' key order and a single
    exact selection runs on it (``topk_mask``), so ties go to the earlier tensor in key order, then
    to the lower flat index. ``within`` (same keys and shapes, bool; None = everything) restricts the
    candidates; ``k`` must lie in [0, number of candidates]. Scores are compared after promotion to
    one common dtype, so tensors of different dtypes rank against each other by value.
    """
    if within is not None:
        validate_mask(within, scores)
    keys = list(scores)
    if not keys:
        if k != 0:
            raise ValueError(f"k={k} is outside [0, 0] (number of candidate entries)")
        return {}
    device = scores[keys[0]].device
    dtype = scores[keys[0]].dtype
    for name in keys[1:]:
        dtype = torch.promote_types(dtype, scores[name].dtype)
    flat = torch.cat([scores[name].detach().reshape(-1).to(device=device, dtype=dtype) for name in keys])
    flat_within = None
    if within is not None:
        flat_within = torch.cat([within[name].reshape(-1).to(device) for name in keys])
    chosen = topk_mask(flat, k, within=flat_within)
    out: Mask = {}
    offset = 0
    for name in keys:
        t = scores[name]
        out[name] = chosen[offset : offset + t.numel()].reshape(t.shape).to(t.device)
        offset += t.numel()
    return out


def personal_count(mask: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> tuple[int, int]:
    """(number of personal entries, number of entries) over ``keys`` (default: all tensors).

    The counts behind |v| / |theta| of the partial-personalization split (Pillutla et al. 2022, Sec. 2).
    """
    names = list(mask) if keys is None else list(keys)
    n_true = 0
    n_all = 0
    for k in names:
        if k not in mask:
            raise ValueError(f"mask has no tensor {k!r}")
        n_true += int(torch.count_nonzero(mask[k]))
        n_all += mask[k].numel()
    return n_true, n_all


def personal_fraction(mask: Mapping[str, Tensor]) -> float:
    """Fraction of all entries that are personal, |v| / |theta| (FedSelect's logged personal fraction).

    A mask with no entries has fraction 0.0.
    """
    n_true, n_all = personal_count(mask)
    return n_true / n_all if n_all else 0.0


def counted_fraction(counts: Mapping[str, int], sizes: Mapping[str, int], keys: Iterable[str] | None = None) -> float:
    """:func:`personal_fraction` from per-tensor personal counts (absent = 0) and sizes, over ``keys``
    (default: every tensor in ``sizes``), without touching a mask: |v| / |theta| as logged per round."""
    names = list(sizes) if keys is None else list(keys)
    n_all = sum(sizes[k] for k in names)
    return sum(counts.get(k, 0) for k in names) / n_all if n_all else 0.0


def personal_fraction_by_group(
    mask: Mapping[str, Tensor], groups: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Personal fraction |v_g| / |theta_g| of each named group of tensors (e.g. ResNet blocks).

    Per-layer breakdown of the split of Pillutla et al. 2022, Sec. 2, as logged for FedSelect. A
    group naming a tensor the mask lacks raises ValueError; a group with no entries has fraction 0.0.
    """
    out: dict[str, float] = {}
    for name, keys in groups.items():
        n_true, n_all = personal_count(mask, keys)
        out[name] = n_true / n_all if n_all else 0.0
    return out


def mask_iou(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, keys: Iterable[str] | None = None) -> float:
    """Intersection over union of the personal entries of two masks, over all entries of ``keys``.

    The overlap measure between clients' personal subnetworks (FedSelect Sec. 4 analysis). Two masks
    with no personal entries are identical, so their IoU is defined as 1.0. Keys and shapes must match.
    """
    validate_same_layout(a, b, "mask a", "mask b")
    names = list(a) if keys is None else list(keys)
    inter = 0
    union = 0
    for k in names:
        if k not in a:
            raise ValueError(f"masks have no tensor {k!r}")
        inter += int((a[k] & b[k]).sum().item())
        union += int((a[k] | b[k]).sum().item())
    return inter / union if union else 1.0


def iou_matrix(masks: Sequence[Mapping[str, Tensor]], keys: Iterable[str] | None = None) -> np.ndarray:
    """Symmetric matrix of pairwise ``mask_iou`` between clients' masks (diagonal 1.0).

    The client-by-client overlap of personal subnetworks logged as an artifact for FedSelect.
    """
    names = None if keys is None else list(keys)
    n = len(masks)
    out = np.ones((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = mask_iou(masks[i], masks[j], keys=names)
    return out


class PackedTensor(NamedTuple):
    """One bit-packed mask tensor: ``bits`` (uint8, 8 entries per byte, MSB first) and its shape."""

    bits: Tensor
    shape: tuple[int, ...]


def pack_mask(mask: Mapping[str, Tensor]) -> dict[str, PackedTensor]:
    """Bit-pack a mask, one bit per entry (row-major, MSB first, zero-padded to whole bytes).

    The wire/storage form of a client's mask m_k (FedSelect Alg. 1 output): ceil(numel / 8) bytes per
    tensor instead of one byte per bool. Packed bits are on the CPU.
    """
    out: dict[str, PackedTensor] = {}
    for k, m in mask.items():
        if m.dtype != torch.bool:
            raise ValueError(f"mask tensor {k!r} has dtype {m.dtype}, expected torch.bool")
        # numpy's packbits is this layout (MSB first, zero-padded) and runs in C
        bits = torch.from_numpy(np.packbits(m.detach().reshape(-1).cpu().numpy()))
        out[k] = PackedTensor(bits=bits, shape=tuple(m.shape))
    return out


def unpack_mask(
    packed: Mapping[str, PackedTensor | tuple[Tensor, Sequence[int]]],
    device: torch.device | str | None = None,
) -> Mask:
    """Inverse of ``pack_mask``: exact round trip to a bool mask (optionally moved to ``device``).

    Restores a client's stored mask m_k (FedSelect Alg. 1) before training or aggregation.
    """
    out: Mask = {}
    for k, (bits, shape) in packed.items():
        shape_t = tuple(int(s) for s in shape)
        numel = math.prod(shape_t)
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
            raise ValueError(
                f"packed tensor {k!r}: expected {(numel + 7) // 8} uint8 bytes for shape {shape_t}, "
                f"got {bits.dtype} of shape {tuple(bits.shape)}"
            )
        flat = np.unpackbits(bits.cpu().numpy(), count=numel).view(np.bool_)
        m = torch.from_numpy(flat).reshape(shape_t)
        out[k] = m if device is None else m.to(device)
    return out


def grow_mask(
    mask: Mapping[str, Tensor],
    change: Mapping[str, Tensor],
    *,
    rate: float,
    target_fraction: float,
    keys: Iterable[str] | None = None,
    cap_at_target: bool = False,
) -> Mask:
    """Online mask growth of the released FedSelect code (the "FedSelectv2"/CVPR variant).

    Exact semantics, per tensor ``t`` among ``keys`` (default: every tensor; the released code grows
    only tensors whose name contains ``weight``, which callers select through ``keys``):

    * with ``n`` entries of which ``P`` are personal: if ``P / n > target_fraction`` (strictly, as the
      released ``_violates_bound``) the tensor is left unchanged;
    * otherwise ``k = target_count(n - P, rate)`` still-shared entries with the largest ``|change|``
      become personal (exact top-k, ties to the lower flat index); personal entries stay personal.
      With ``cap_at_target`` (not in the released code) ``k`` is further limited so that the tensor's
      personal count does not pass ``target_count(n, target_fraction)``.

    Tensors outside ``keys`` are copied unchanged. ``change`` must cover the grown tensors with the
    same shapes (it is typically theta_now - theta_at_last_growth).

    Difference from the released code (``get_mask_from_delta`` with ``invert=True``): it takes the
    value at sorted position ``round((1 - rate) * (n - P))`` of the shared entries' |change| as a
    cutoff and makes every entry with ``|change| >= cutoff`` personal. When many changes tie (exactly
    zero for weights that get no gradient, e.g. 3x3 kernels acting on 1x1 maps), all of them pass at
    once and a whole layer flips; it also indexes past the end when that position equals ``n - P``.
    Here exactly ``k`` entries move, so the fraction after one growth step is ``(P + k) / n``.
    """
    if not (0.0 <= rate <= 1.0):
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    if not (0.0 <= target_fraction <= 1.0):
        raise ValueError(f"target_fraction must be in [0, 1], got {target_fraction!r}")
    names = set(mask) if keys is None else set(keys)
    missing = names - set(mask)
    if missing:
        raise ValueError(f"keys name tensor {sorted(missing)[0]!r} that the mask lacks")
    for name in names:
        m = mask[name]
        if m.dtype != torch.bool:
            raise ValueError(f"mask tensor {name!r} has dtype {m.dtype}, expected torch.bool")
        if name not in change:
            raise ValueError(f"change is missing tensor {name!r}")
        if tuple(change[name].shape) != tuple(m.shape):
            raise ValueError(
                f"tensor {name!r}: mask has shape {tuple(m.shape)}, change has {tuple(change[name].shape)}"
            )
    grown_names = [n for n in mask if n in names]
    personal = true_counts({n: mask[n] for n in grown_names})
    ks: dict[str, int] = {}
    for name in grown_names:
        n, n_personal = mask[name].numel(), personal[name]
        if n == 0 or n_personal / n > target_fraction:
            continue
        k = target_count(n - n_personal, rate)
        if cap_at_target:
            k = min(k, max(0, target_count(n, target_fraction) - n_personal))
        ks[name] = k
    chosen = topk_masks(list(ks), lambda name: change[name].detach().abs(), ks, {n: ~mask[n] for n in ks})
    return {name: mask[name] | chosen[name] if name in chosen else m.clone() for name, m in mask.items()}
