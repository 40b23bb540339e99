"""Every tensor's exact top-k at once by counting, without a sort: the GPU's selection.

FedSelect's GradLTN (Alg. 1, "the largest (1 - r) fraction of gamma within m") and the released
code's mask growth select, per tensor, exactly k entries with the largest scores within a mask,
ties to the lower flat index (:func:`fedselect.core.topk.topk_mask`). On a GPU the selections of
a whole model run as one: :func:`fedselect.core.topk.topk_masks` with ``method="segmented"``
orders all entries with three stable sorts, which for ResNet-18's 11 M weights are three radix
sorts of 11 M 64-bit keys, done 50 times a round by a FedSelect study's 10 clients.

Here the k-th largest score of every tensor is found as a radix select finds it (the same idea
as :func:`fedselect.core.cpu_kernels.topk`, for all tensors at once, in PyTorch operations):

1. every float32 score becomes a signed 32-bit key that orders as the values do (-0.0 as +0.0);
2. candidates are counted per (tensor, upper 16 bits of the key): one histogram of 65536 bins
   per tensor; a cumulative count from the top gives each tensor's bin of its k-th largest;
3. candidates in that bin are counted per lower 16 bits: each tensor's k-th largest key, exactly;
4. a tensor's entries above its k-th key are chosen, and of those equal to it the first ones in
   index order (a running count of ties within the tensor) until k are chosen.

So a selection is a dozen passes over the scores and two histograms, with one host
synchronisation (each tensor's candidate count, which k must not exceed, and whether a candidate
is NaN), and chooses exactly the entries that the sort does. Scores of float32 or narrower
float types (converted exactly) and bool or uint8 (exactly) are taken; float64 scores keep the
sort (:func:`applies`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Segments", "applies", "checked_segments", "radix_topk"]

_BINS = 1 << 16
_EXACT_IN_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)


def applies(scores: Sequence[Tensor]) -> bool:
    """Whether every score converts to float32 exactly (so that keys of float32 order them)."""
    return all(s.dtype in _EXACT_IN_FLOAT32 for s in scores)


def _order_keys(flat: Tensor) -> Tensor:
    """Signed int32 keys ordering as the float32 values do; -0.0 and +0.0 get the same key.

    A non-negative float's bits already order as integers; a negative one's magnitude bits are
    flipped, so that a larger magnitude gives a smaller key (NaN is excluded by the caller).
    """
    bits = (flat + 0.0).view(torch.int32)  # -0.0 + 0.0 is +0.0; every other value is unchanged
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_bins(hist: Tensor, want: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``hist`` (counts per bin, bins in ascending key order): the bin that holds the
    ``want``-th largest entry, and how many entries lie in higher bins."""
    from_top = hist.flip(1).cumsum(1)
    position = torch.searchsorted(from_top, want.view(-1, 1)).view(-1).clamp_(max=hist.shape[1] - 1)
    bins = hist.shape[1] - 1 - position
    above = from_top.gather(1, position.view(-1, 1)).view(-1) - hist.gather(1, bins.view(-1, 1)).view(-1)
    return bins, above


@dataclass(frozen=True)
class Segments:
    """A whole model's scores and candidates as one flat vector each, tensor after tensor."""

    flat: Tensor  # the scores, converted to one dtype
    candidates: Tensor  # bool
    size_list: list[int]
    sizes: Tensor  # entries per tensor, on the scores' device
    segment: Tensor  # each entry's tensor index

    def split(self, chosen: Tensor, names: Sequence[str], scores: Sequence[Tensor]) -> dict[str, Tensor]:
        """The flat choice back as one mask per named tensor, in its shape."""
        return {name: part.reshape(s.shape)
                for name, part, s in zip(names, torch.split(chosen, self.size_list), scores, strict=True)}


def checked_segments(names: Sequence[str], scores: Sequence[Tensor], ks: Mapping[str, int],
                     within: Mapping[str, Tensor], dtype: torch.dtype) -> Segments:
    """Every tensor's scores (as ``dtype``) and candidates concatenated, checked with one host
    synchronisation: each ``ks[name]`` within [0, the tensor's candidates] and no candidate's score
    NaN (ValueError otherwise). Shared by the GPU's whole-model selections (radix and sort)."""
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=dtype) for s in scores])
    cand = torch.cat([within[n].reshape(-1).to(device) for n in names])
    size_list = [s.numel() for s in scores]
    sizes = torch.tensor(size_list, device=device)
    # output_size given: no host synchronisation to learn it
    segment = torch.repeat_interleave(torch.arange(len(names), device=device), sizes, output_size=flat.numel())
    counts = torch.zeros(len(names), dtype=torch.int64, device=device).index_add_(0, segment, cand.long())
    figures = torch.cat([counts, (torch.isnan(flat) & cand).any().long().view(1)]).tolist()
    if figures[-1]:
        raise ValueError("scores contain NaN among the candidate entries")
    for name, n_candidates in zip(names, figures[:-1], strict=True):
        if not (0 <= ks[name] <= n_candidates):
            raise ValueError(f"k={ks[name]} is outside [0, {n_candidates}] (number of candidate entries) "
                             f"for tensor {name!r}")
    return Segments(flat, cand, size_list, sizes, segment)


def radix_topk(names: Sequence[str], scores: Sequence[Tensor], ks: Mapping[str, int],
               within: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per named tensor, exactly ``ks[name]`` True entries: its largest ``scores`` among ``within``,
    ties to the lower flat index (the entries of :func:`fedselect.core.topk.topk_mask`).

    ValueError when a k is outside [0, the tensor's candidates], or a candidate's score is NaN.
    """
    if not names:
        return {}
    segs = checked_segments(names, scores, ks, within, torch.float32)
    flat, cand, sizes, seg = segs.flat, segs.candidates, segs.sizes, segs.segment
    device, n_tensors = flat.device, len(names)
    if flat.numel() == 0:
        return segs.split(torch.zeros(0, dtype=torch.bool, device=device), names, scores)
    k = torch.tensor([ks[n] for n in names], dtype=torch.int64, device=device)
    keys = _order_keys(flat)
    high = (keys >> 16) + _BINS // 2  # 0 .. 65535, ascending with the key
    low = keys & (_BINS - 1)
    counts = cand.to(torch.int32)
    hist = torch.zeros(n_tensors * _BINS, dtype=torch.int32, device=device)
    hist.index_add_(0, seg * _BINS + high, counts)
    top, above_top = _kth_bins(hist.view(n_tensors, _BINS).long(), k)
    in_top = counts * (high == top[seg])
    hist.zero_().index_add_(0, seg * _BINS + low, in_top)
    kth_low, above_kth = _kth_bins(hist.view(n_tensors, _BINS).long(), k - above_top)
    kth = ((top - _BINS // 2) * _BINS + kth_low).to(torch.int32)[seg]  # each entry's tensor's k-th largest key
    chosen = cand & (keys > kth)
    tied = cand & (keys == kth)
    # the entries tied with the k-th largest are chosen in index order until k are: a running count of
    # ties over all tensors, against each tensor's count before it plus the ties it needs (k = 0 needs
    # none: then nothing is above the k-th key and no tie is taken)
    running = torch.cumsum(tied, 0, dtype=torch.int64)
    starts = torch.cumsum(sizes, 0) - sizes
    before = torch.where(starts > 0, running[(starts - 1).clamp_(min=0)], torch.zeros_like(starts))
    chosen |= tied & (running <= (before + k - above_top - above_kth)[seg])
    return segs.split(chosen, names, scores)
