"""Exact top-k selections of mask entries: FedSelect's GradLTN selection and the released code's growth.

Every selection here chooses exactly k entries, ties to the lower flat index (the released code's
``>= quantile`` rule can choose more): per tensor (:func:`topk_mask`, :func:`topk_masks` for a whole
model, one segmented sort on a GPU), over a whole model at once (:func:`topk_mask_global`), and the
online growth of the released code (:func:`grow_mask`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedselect.core import cpu_kernels, topk_radix
from fedselect.core.blend import where_fill
from fedselect.core.host import compare, count_true, counts_true
from fedselect.core.kth import kth_largest
from fedselect.core.masks import Mask, compress, scatter_masked, target_count, true_counts, validate_mask

__all__ = ["TOPK_METHODS", "grow_mask", "topk_abs_change", "topk_mask", "topk_mask_global", "topk_masks"]

# how topk_masks selects: auto (per_tensor on the CPU, radix on a GPU) or one of them by name
TOPK_METHODS = ("auto", "per_tensor", "radix", "segmented")


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
    n_candidates = count_true(flat_within)
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
    zero_cut = _zero_cut(flat, flat_within, k, n_candidates)
    if zero_cut is not None:
        return zero_cut.reshape(scores.shape)
    if _kernel_applies(flat, flat_within):
        # after the zero probe, which decides zero-heavy growth scores from counts faster still
        return cpu_kernels.topk(flat, flat_within, k).reshape(scores.shape)
    if flat.is_floating_point() and 2 * n_candidates >= flat.numel():
        # most entries are candidates: rank in place, the others pushed below every candidate (-inf
        # ties with a -inf candidate are kept out by the tie rule below), with no gather or scatter
        vals = flat if n_candidates == flat.numel() else where_fill(flat_within, flat, float("-inf"))
        chosen = _top_k_in_order(vals, k, candidates=flat_within)
        return chosen.reshape(scores.shape)
    vals = compress(flat, flat_within)
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    # candidates in flat order, as compress read them
    return scatter_masked(out, flat_within, _top_k_in_order(vals, k)).reshape(scores.shape)


def topk_abs_change(new: Tensor, old: Tensor, k: int, *, within: Tensor, candidates: int) -> Tensor:
    """``topk_mask(|new - old|, k, within=within)``, where ``within`` has ``candidates`` True entries.

    GradLTN's selection (FedSelect Alg. 1: the largest gamma = |theta_trained - theta_0| within m).
    For large float32 CPU tensors one kernel computes the changes as it counts them
    (:func:`fedselect.core.cpu_kernels.abs_change_topk`: no gamma tensor, one pass fewer); the
    same entries either way.
    """
    if (0 < k < candidates and old.dtype == new.dtype and old.shape == new.shape
            and _kernel_applies(new.detach(), within) and cpu_kernels.applies(old.detach())):
        return cpu_kernels.abs_change_topk(new.detach(), old.detach(), within, k)
    return topk_mask((new.detach().to(old.device) - old.detach()).abs(), k, within=within)


def _top_k_in_order(vals: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """Exactly ``k`` True entries of ``vals`` (among ``candidates``): the largest, ties to the lower index.

    The k-th largest value is unique even though the order among tied entries is not; everything
    above it is in, and the tied entries fill the remaining slots in index order. The k-th largest
    is found by a selection (linear time, :func:`fedselect.core.kth.kth_largest`), cheaper than
    sorting millions of entries per tensor.
    """
    kth = kth_largest(vals, k)
    above = compare(vals, "gt", kth)
    tied = compare(vals, "eq", kth)
    if candidates is not None:
        tied &= candidates
    # amax propagates NaN: one reduction tells whether a candidate is NaN (non-candidates are -inf)
    nan = torch.isnan(vals.amax()) if vals.is_floating_point() else torch.zeros((), dtype=torch.bool)
    # one host synchronisation for the three figures
    has_nan, n_above, n_tied = _read_counts(nan, above, tied)
    if has_nan:
        raise ValueError("scores contain NaN among the candidate entries")
    return _above_and_first_ties(above, tied, k - n_above, n_tied)


_ZERO_CUT_MIN_SIZE = 65536


def _kernel_applies(scores: Tensor, within: Tensor) -> bool:
    """Whether :func:`fedselect.core.cpu_kernels.topk` selects (float32 CPU scores, large enough that
    its two 65536-bin counts pay; smaller tensors take the selection below)."""
    return (scores.dtype == torch.float32 and scores.numel() >= _ZERO_CUT_MIN_SIZE
            and cpu_kernels.applies(scores, within))


def _zero_cut(flat: Tensor, flat_within: Tensor, k: int, n_candidates: int) -> Tensor | None:
    """The choice of :func:`_top_k_in_order` when the k-th largest candidate is 0, found without
    a selection or a compaction; None when it is not 0 (or a candidate is NaN: the caller raises).

    Growth scores (|change|) are mostly exact zeros where weights get no gradient (89 % of
    ResNet-18's layer4 kernels on 32 px inputs): then fewer than k candidates are above 0 and k
    reach it, so 0 is the k-th largest and counts decide the whole selection.
    """
    if flat.numel() < _ZERO_CUT_MIN_SIZE:  # a selection on a small tensor costs less than the probe
        return None
    # Most tensors have no zeros at all (every weight gets gradient). Their first block tells: when
    # far more than k / candidates of its candidates are above 0, the probe would fail, so skip it
    # (this decides only whether to look, never what is chosen).
    head, head_within = flat[:_ZERO_CUT_MIN_SIZE], flat_within[:_ZERO_CUT_MIN_SIZE]
    head_candidates, head_above = counts_true([head_within, compare(head, "gt", 0.0).logical_and_(head_within)])
    if head_above > (2 * k / n_candidates + 0.01) * head_candidates:
        return None
    above = compare(flat, "gt", 0.0).logical_and_(flat_within)
    n_above = count_true(above)
    if n_above >= k:
        return None
    tied = compare(flat, "eq", 0.0).logical_and_(flat_within)
    n_tied = count_true(tied)
    if k > n_above + n_tied:
        return None
    # candidates neither above 0 nor at or below it are NaN (counted only when some are not 0 or above)
    if n_above + n_tied != n_candidates and n_above + count_true(
            compare(flat, "le", 0.0).logical_and_(flat_within)) != n_candidates:
        return None
    return _above_and_first_ties(above, tied, k - n_above, n_tied)


def _read_counts(nan: Tensor, above: Tensor, tied: Tensor) -> tuple[int, int, int]:
    """(NaN among candidates, entries above, candidates tied), read back in one synchronisation."""
    has_nan, n_above, n_tied = counts_true([nan.to(above.device), above, tied])
    return has_nan, n_above, n_tied


def _above_and_first_ties(above: Tensor, tied: Tensor, need: int, n_tied: int) -> Tensor:
    """``above`` and the first ``need`` of the ``n_tied`` tied entries in index order."""
    if need == n_tied:
        return above | tied
    if need == 0:
        return above.clone()
    if tied.device.type == "cpu":
        return above | _first_true(tied, need)
    # an int32 running count (half the memory traffic of int64) when it fits
    count_type = torch.int32 if tied.numel() < 2**31 else torch.int64
    return above | (tied & (torch.cumsum(tied, 0, dtype=count_type) <= need))


_BLOCK = 4096


def _first_true(flags: Tensor, need: int) -> Tensor:
    """``flags`` (1-D bool) with only its first ``need`` True entries kept, 0 < need < their count.

    On one CPU thread a running count over millions of entries is a slow serial scan (7 ms for
    2.4 M): counts per block of 4096 find the block where the need-th True lies, and only that
    block is scanned (2 ms). The same entries as ``flags & (cumsum(flags) <= need)``.
    """
    full = flags.numel() - flags.numel() % _BLOCK
    # each block's count summed as bytes into int32 (at most 4096 per block): 4x faster than an int64 sum of bools
    reached = torch.cumsum(flags[:full].view(torch.uint8).view(-1, _BLOCK).sum(1, dtype=torch.int32), 0,
                           dtype=torch.int64)
    block = int(torch.searchsorted(reached, need))  # the first block whose running count reaches need
    before = int(reached[block - 1]) if block > 0 else 0
    start = block * _BLOCK
    local = torch.cumsum(flags[start:start + _BLOCK], 0, dtype=torch.int32)
    last = start + int(torch.searchsorted(local, need - before))  # index of the need-th True
    kept = flags.clone()
    kept[last + 1:] = False
    return kept


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
    score in memory at a time; the CPU default); ``"radix"`` selects in every tensor at once by
    counting (:func:`fedselect.core.topk_radix.radix_topk`: a dozen passes and two histograms, one
    host synchronisation; the CUDA default, where a selection and a few synchronisations per tensor
    would leave the GPU idle), for scores that float32 holds exactly; ``"segmented"`` ranks every
    tensor in one segmented stable sort, also with one synchronisation (CUDA, float64 scores). All
    three choose exactly the same entries.
    """
    if method not in TOPK_METHODS:
        raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}")
    if method == "auto":
        device = within[names[0]].device if names else torch.device("cpu")
        method = "radix" if device.type == "cuda" else "per_tensor"
    if method == "per_tensor":
        return {n: topk_mask(score_of(n), ks[n], within=within[n]) for n in names}
    scores = [score_of(n) for n in names]
    if method == "radix" and topk_radix.applies(scores):
        return topk_radix.radix_topk(names, scores, ks, within)
    return _segmented_topk(names, scores, ks, within)


def _segmented_topk(names: Sequence[str], scores: Sequence[Tensor], ks: Mapping[str, int],
                    within: Mapping[str, Tensor]) -> Mask:
    """Every tensor's exact top-k in one pass: order all entries by (tensor, candidate first, score
    descending, flat index) with stable sorts, least significant key first, and keep each tensor's
    first k."""
    if not names:
        return {}
    segs = topk_radix.checked_segments(names, scores, ks, within, torch.float64)
    flat, cand, sizes, seg, device = segs.flat, segs.candidates, segs.sizes, segs.segment, segs.flat.device
    order = torch.argsort(-flat, stable=True)
    order = order[torch.argsort((~cand[order]).to(torch.uint8), stable=True)]
    order = order[torch.argsort(seg[order], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    ranked_seg = seg[order]
    rank = torch.arange(flat.numel(), device=device) - starts[ranked_seg]
    k_of = torch.tensor([ks[n] for n in names], device=device)
    chosen = torch.empty(flat.numel(), dtype=torch.bool, device=device)
    chosen[order] = rank < k_of[ranked_seg]
    return segs.split(chosen, names, scores)


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
