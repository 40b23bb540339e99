"""The k-th largest value of a 1-D tensor: the cutoff of every exact top-k selection in :mod:`.topk`.

FedSelect's GradLTN (arXiv 2306.13264, Alg. 1: "the largest (1 - r) fraction of gamma") and the
released code's mask growth both rank each tensor's scores and keep the top k. Only the k-th
largest value is needed: everything above it is in, and ties at it fill the rest by index.

``torch.kthvalue`` finds it by quickselect, which on one CPU thread branches on every comparison
and mispredicts on score-like data: 42 ms for 2.4 M float32 entries, 11-16 ms for 0.8 M
(bench/README.md). On the CPU a float32 tensor of at least :data:`RADIX_MIN_SIZE` entries is
ranked here by two counting passes over its bit patterns instead (a radix selection: 16 bits,
then the other 16 within the one bin that holds the answer), with no comparison branches, in a
quarter to a half of the time. The value is the same: the bit patterns are ordered as the floats
are, except that -0.0 and +0.0 are told apart, and these compare equal, so every selection made
by comparing with the value (``> kth``, ``== kth``) is the same.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["RADIX_MIN_SIZE", "kth_largest"]

# below this a selection is cheap and the counting passes' fixed cost (two 65536-bin histograms) is not
RADIX_MIN_SIZE = 65536

_BINS = 1 << 16
# The upper 16 bits of a float32 pattern, as bins: 0..32767 hold the non-negative floats in
# ascending order, 32768..65535 the negative ones in descending order (a larger pattern there is a
# larger magnitude). So the bins from the largest float down are 32767..0, then 32768..65535.
_BINS_DESCENDING = np.concatenate([np.arange(_BINS // 2 - 1, -1, -1), np.arange(_BINS // 2, _BINS)])


def kth_largest(vals: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry of the 1-D tensor ``vals`` (1 <= k <= numel), as a 0-d tensor.

    ``torch.kthvalue(vals, numel - k + 1).values``, by a radix selection for large float32 CPU
    tensors (module docstring). With NaN among the entries the result is some entry's value: the
    callers check for NaN themselves and refuse to rank.
    """
    n = vals.numel()
    if not (1 <= k <= n):
        raise ValueError(f"k={k} is outside [1, {n}]")
    if vals.device.type != "cpu" or vals.dtype != torch.float32 or n < RADIX_MIN_SIZE or vals.requires_grad:
        return torch.kthvalue(vals, n - k + 1).values
    bits = vals.contiguous().numpy().view(np.uint32)
    high = bits >> 16
    bin_index, rank_in_bin = _descending_bin(np.bincount(high, minlength=_BINS), k, _BINS_DESCENDING)
    low = bits[high == bin_index] & np.uint32(0xFFFF)
    low_order = np.arange(_BINS - 1, -1, -1) if bin_index < _BINS // 2 else np.arange(_BINS)
    low_index, _ = _descending_bin(np.bincount(low, minlength=_BINS), rank_in_bin, low_order)
    pattern = np.array([(bin_index << 16) | low_index], dtype=np.uint32)
    return torch.from_numpy(pattern.view(np.float32)).reshape(())


def _descending_bin(counts: np.ndarray, k: int, order: np.ndarray) -> tuple[int, int]:
    """(bin holding the k-th largest entry, that entry's rank within the bin), with ``order`` listing
    the bins from the largest values down."""
    reached = np.cumsum(counts[order])
    position = int(np.searchsorted(reached, k))  # the first bin whose running count reaches k
    before = int(reached[position - 1]) if position else 0
    return int(order[position]), k - before
