"""One-pass CPU kernels (numba) for the masked bookkeeping of a round: the same bits, fewer passes.

A round of FedSelect on the CPU spends most of its time outside the model in element-wise passes
over the whole model under a mask: the masked SGD step (direction * lr, a blend, a subtraction),
the server's sum of an upload's shared entries (an inversion of the mask, a blend, a conversion
to float64, an add, the entry weights, the union of personal masks), and a client's switch to its
personal model (a copy of the global values, then ``masked_scatter_`` of its personal ones). Each
PyTorch or numpy call is one pass over memory, and on one CPU thread these are bound by memory,
not arithmetic. Here each of them is one loop that reads every input once, compiled by numba:

* :func:`masked_step` is ``p -= where(m, d * lr, 0)`` (MaskedSGD without momentum, and with it
  ``buf = where(m, buf * mu + d, buf)`` first);
* :func:`accumulate_shared` adds ``w * x`` to float64 sums, ``w`` to int32 entry weights and the
  personal entries to a union mask (FedSelect Alg. 2's server step, :class:`.aggregate.MaskedMean`);
* :func:`merge_personal` is ``out = g; out[m] = v`` (a client's model: global values on shared
  entries, its own on personal ones);
* :func:`weighted_mean` divides those sums by the entry weights, keeping the old value where no
  client sent one;
* :func:`compress` is ``x[m]``, without a branch per entry;
* :func:`topk` is FedSelect's exact top-k of scores within a mask, by counting.

Every result is the bits of the PyTorch operations it replaces: the same IEEE operations on the
same operands in the same order per entry (numba compiles without fast-math, so no product is
contracted into a fused multiply-add), and selections are made by choosing operands, not by
arithmetic on them. ``tests/test_cpu_kernels.py`` compares each kernel with the PyTorch path over
NaN, infinities, signed zeros and subnormals. One caveat: an addition of two NaN returns one of
them, and which one depends on the compiler's operand order (addition commutes otherwise), in
PyTorch's kernels as in numba's. The tests find them in agreement for the momentum step; for the
server's sums they may differ after an inf - inf, which a run never meets (uploads with non-finite
shared values are dropped before they are added).

They serve single-threaded CPU processes (Snakemake runs each training job with one thread, and
``bench/fedselect_vs_released.py --threads 1``): numba's loops use one thread, while PyTorch's
kernels spread large tensors over all of them. :func:`enabled` says whether to use them: numba
installed (a requirement; GPU tensors never come here), at most :data:`MAX_THREADS` PyTorch
threads (measured: at 2 threads every kernel still beats PyTorch's passes, bench/README.md), and
``FEDSELECT_CPU_KERNELS`` not ``0`` (``1`` forces them on at any thread count: the tests compare
both paths).
"""

from __future__ import annotations

import importlib.util
import os
import threading

import numpy as np
import torch
from torch import Tensor

# numba is imported, and the loops below compiled (or loaded from numba's cache), on first use:
# numba and LLVM take about 150 MB of RSS, which processes that never run CPU bookkeeping (GPU
# runs, the CLI's checks, analysis) need not pay. Without numba, PyTorch's path is taken.
NUMBA_FOUND = importlib.util.find_spec("numba") is not None

__all__ = ["ENV", "MAX_THREADS", "abs_change_topk", "accumulate_shared", "applies", "compress", "enabled",
           "masked_step", "merge_personal", "setting", "step_applies", "topk", "weighted_mean"]

ENV = "FEDSELECT_CPU_KERNELS"
# the fused loops run on one thread; up to here they beat PyTorch's multi-pass kernels (bench/README.md)
MAX_THREADS = 2
_FLOATS = (torch.float32, torch.float64)
_INT_OF_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def setting() -> str:
    """``FEDSELECT_CPU_KERNELS``: ``0`` (off), ``1`` (on at any thread count) or ``auto`` (the default);
    ValueError naming the variable for any other value."""
    value = os.environ.get(ENV, "auto")
    if value not in ("0", "1", "auto"):
        raise ValueError(f"environment variable {ENV} must be 0 (off), 1 (on) or auto, got {value!r}")
    return value


def enabled() -> bool:
    """Whether CPU bookkeeping goes through these kernels (see the module docstring)."""
    if not NUMBA_FOUND:
        return False
    value = setting()
    if value == "0":
        return False
    return value == "1" or torch.get_num_threads() <= MAX_THREADS


def applies(*tensors: Tensor) -> bool:
    """CPU, contiguous, no gradient wanted, and :func:`enabled`: the kernels' preconditions."""
    return enabled() and all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in tensors)


def _flat(t: Tensor) -> np.ndarray:
    array = t.detach().reshape(-1).numpy()
    return array.view(np.uint8) if array.dtype == np.bool_ else array


def _step(p, d, m, lr, zero):  # noqa: ANN001, ANN202 - numba types these per call
    for i in range(p.shape[0]):
        v = d[i] * lr
        p[i] = p[i] - (v if m[i] else zero)

def _momentum_step(p, d, buf, m, lr, mu, zero):  # noqa: ANN001, ANN202
    for i in range(p.shape[0]):
        b = buf[i] * mu + d[i]
        b = b if m[i] else buf[i]
        buf[i] = b
        v = b * lr
        p[i] = p[i] - (v if m[i] else zero)

def _accumulate(total, weight, union, x, personal, w, iw, first):  # noqa: ANN001, ANN202
    neg_zero = -0.0
    if first:
        for i in range(x.shape[0]):
            shared = personal[i] == 0
            v = np.float64(x[i]) * w
            total[i] = v if shared else neg_zero
            weight[i] = iw if shared else 0
            union[i] = personal[i]
    else:
        for i in range(x.shape[0]):
            shared = personal[i] == 0
            v = np.float64(x[i]) * w
            total[i] = total[i] + (v if shared else neg_zero)
            weight[i] = weight[i] + (iw if shared else 0)
            union[i] = union[i] | personal[i]

def _mean(out, total, weight, whole, old):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        w = np.float64(weight[i])
        if whole:
            w = w + whole
        # a branch, taken the same way nearly always (entries that no client sent are rare); the
        # store rounds the float64 mean to out's dtype, as .to() does
        if w > 0:
            out[i] = total[i] / w
        else:
            out[i] = old[i]

def _merge(out, g, m, v):  # noqa: ANN001, ANN202
    last = v.shape[0] - 1
    j = 0
    for i in range(out.shape[0]):
        out[i] = v[min(j, last)] if m[i] else g[i]
        j += m[i]
    return j

def _order_key(bits):  # noqa: ANN001, ANN202
    """A float32's bit pattern as an unsigned key that orders as the values do (-0.0 as +0.0)."""
    if bits == np.int32(-2147483648):  # -0.0 ties with +0.0
        bits = np.int32(0)
    key = np.uint32(bits)
    return key ^ (np.uint32(0xFFFFFFFF) if bits < 0 else np.uint32(0x80000000))


def _topk(bits, within, k, out):  # noqa: ANN001, ANN202
    zero_key = np.uint32(0x80000000)
    # pass 1: candidates per upper 16 bits of the key (and any NaN among them). Zeros, most of a
    # growth's scores in some tensors, are counted apart: adding them to one bin would chain
    # every increment on the one before
    high = np.zeros(65536, np.int64)
    zeros = 0
    nan = 0
    for i in range(bits.shape[0]):
        c = within[i]
        key = _order_key(bits[i])
        if key == zero_key:
            zeros += c
        else:
            high[key >> 16] += c
        nan |= c & ((bits[i] & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000))
    if nan:
        return -1
    high[zero_key >> 16] += zeros
    top, above = 65535, 0
    while above + high[top] < k:
        above += high[top]
        top -= 1
    if top == zero_key >> 16 and above + high[top] - zeros < k:
        # the k-th largest is 0 (growth scores of weights without gradient): no second pass
        kth = zero_key
        above += high[top] - zeros
    else:
        # pass 2: within that bin, candidates per lower 16 bits (zeros again apart)
        low = np.zeros(65536, np.int64)
        for i in range(bits.shape[0]):
            key = _order_key(bits[i])
            if (key >> 16) == top and key != zero_key:
                low[key & np.uint32(0xFFFF)] += within[i]
        if top == zero_key >> 16:
            low[0] += zeros
        bottom = 65535
        while above + low[bottom] < k:
            above += low[bottom]
            bottom -= 1
        kth = (np.uint32(top) << 16) | np.uint32(bottom)
    need = k - above
    # pass 3: everything above the k-th value, and the first `need` tied with it in index order
    taken = 0
    for i in range(bits.shape[0]):
        c = within[i]
        key = _order_key(bits[i])
        tie = c & (key == kth)
        out[i] = (c & (key > kth)) | (tie & (taken < need))
        taken += tie
    return 0

def _abs_change_topk(new, old, within, k, gamma, out):  # noqa: ANN001, ANN202
    # gamma = |new - old| >= 0 (or NaN): its float32 bits order as the values do, with no key map
    bits = gamma.view(np.int32)
    high = np.zeros(32768, np.int64)
    zeros = 0
    nan = 0
    for i in range(new.shape[0]):
        gamma[i] = abs(new[i] - old[i])
        c = within[i]
        key = bits[i]
        if key == 0:  # counted apart, as in _topk
            zeros += c
        else:
            high[key >> 16] += c
        nan |= c & (key > np.int32(0x7F800000))
    if nan:
        return -1
    high[0] += zeros
    top, above = 32767, 0
    while above + high[top] < k:
        above += high[top]
        top -= 1
    if top == 0 and above + high[0] - zeros < k:
        kth = np.int32(0)  # the k-th largest change is 0
        above += high[0] - zeros
    else:
        low = np.zeros(65536, np.int64)
        for i in range(new.shape[0]):
            key = bits[i]
            if (key >> 16) == top and key != 0:
                low[key & np.int32(0xFFFF)] += within[i]
        if top == 0:
            low[0] += zeros
        bottom = 65535
        while above + low[bottom] < k:
            above += low[bottom]
            bottom -= 1
        kth = np.int32((top << 16) | bottom)
    need = k - above
    taken = 0
    for i in range(new.shape[0]):
        c = within[i]
        key = bits[i]
        tie = c & (key == kth)
        out[i] = (c & (key > kth)) | (tie & (taken < need))
        taken += tie
    return 0

def _compress(x, m, out):  # noqa: ANN001, ANN202
    # every entry is written to the next free slot, which only a selected one keeps (the spare
    # last slot takes what follows the last selected entry): no branch per entry
    j = 0
    for i in range(x.shape[0]):
        out[j] = x[i]
        j += m[i]
    return j


_LOOPS = ("_order_key", "_step", "_momentum_step", "_accumulate", "_mean", "_merge", "_topk", "_abs_change_topk",
          "_compress")


_COMPILE_LOCK = threading.Lock()
_compiled = False


def _compile() -> None:
    """Make the loops above numba functions (in dependency order: ``_topk`` calls ``_order_key``).

    Once per process, under a lock: batched clients (fedselect.client_batching) make their first
    calls from several threads at once, and a loop must not be wrapped twice."""
    global _compiled
    if _compiled:
        return
    with _COMPILE_LOCK:
        if _compiled:
            return
        import numba

        jit = numba.njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
        for name in _LOOPS:
            globals()[name] = jit(globals()[name])
        _compiled = True


def masked_step(param: Tensor, direction: Tensor, mask: Tensor, lr: float, *,
                momentum_buffer: Tensor | None = None, momentum: float = 0.0) -> None:
    """In place: with a buffer, ``buf = where(mask, buf * momentum + direction, buf)`` and the step
    ``param -= where(mask, buf * lr, 0)``; without, ``param -= where(mask, direction * lr, 0)``.

    The scalars are rounded to the parameter's dtype first, as PyTorch does with a Python number.
    """
    _compile()
    p, d, m = _flat(param), _flat(direction), _flat(mask)
    scalar = p.dtype.type
    if momentum_buffer is None:
        _step(p, d, m, scalar(lr), scalar(0.0))
    else:
        _momentum_step(p, d, _flat(momentum_buffer), m, scalar(lr), scalar(momentum), scalar(0.0))


def step_applies(param: Tensor, direction: Tensor, mask: Tensor, momentum_buffer: Tensor | None = None) -> bool:
    """Whether :func:`masked_step` takes these tensors (float32/64 of one dtype and shape, a bool mask)."""
    tensors = [param, direction, mask] + ([] if momentum_buffer is None else [momentum_buffer])
    return (param.dtype in _FLOATS and all(t.dtype == param.dtype for t in tensors if t is not mask)
            and mask.dtype == torch.bool and all(t.shape == param.shape for t in tensors)
            and applies(param.detach(), direction, mask, *([] if momentum_buffer is None else [momentum_buffer])))


def accumulate_shared(total: Tensor, weight: Tensor, union: Tensor, values: Tensor, personal: Tensor,
                      w: int, *, first: bool) -> None:
    """In place, where ``personal`` is False: ``total += float64(values) * w`` and ``weight += w``;
    ``union |= personal``. ``first``: the three are written, not added to (an empty sum is -0.0).

    ``total`` float64, ``weight`` int32, ``union`` and ``personal`` bool, ``values`` float32, ``w``
    a whole number: every product is then exact in float64, as in :class:`.aggregate.MaskedMean`.
    """
    _compile()
    _accumulate(_flat(total), _flat(weight), _flat(union), _flat(values), _flat(personal),
                np.float64(w), np.int32(w), first)


def weighted_mean(total: Tensor, weight: Tensor, whole: float, old: Tensor) -> Tensor:
    """``where(w > 0, (total / where(w > 0, w, 1)).to(old.dtype), old)`` with ``w = float64(weight) + whole``
    (``whole`` only when non-zero): the server's mean of each entry over the clients that sent it,
    the old value where none did, in one pass (:meth:`.aggregate.MaskedMean.result`)."""
    _compile()
    out = torch.empty_like(old)
    _mean(_flat(out), _flat(total), _flat(weight), float(whole), _flat(old))
    return out


def merge_personal(out: Tensor, global_values: Tensor, mask: Tensor, personal_values: Tensor) -> None:
    """``out.copy_(global_values); out.masked_scatter_(mask, personal_values)`` in one pass.

    ``personal_values`` holds exactly one value per True entry of ``mask`` (row-major order);
    ValueError otherwise.
    """
    _compile()
    if personal_values.numel() == 0:
        if bool(mask.any()):
            raise ValueError("merge_personal: no personal values for a mask with True entries")
        out.copy_(global_values)
        return
    used = _merge(_flat(out), _flat(global_values), _flat(mask), _flat(personal_values))
    if used != personal_values.numel():
        raise ValueError(f"merge_personal: {personal_values.numel()} personal values for {used} masked entries")


def compress(values: Tensor, mask: Tensor) -> Tensor:
    """``torch.masked_select(values, mask)`` for CPU tensors of one shape, ``mask`` bool."""
    _compile()
    # moved as integers of the same width: any dtype (numba has no float16), the same bits
    x = values.detach().reshape(-1).numpy().view(_INT_OF_SIZE[values.element_size()])
    out = np.empty(x.shape[0] + 1, dtype=x.dtype)
    count = _compress(x, _flat(mask), out)
    return torch.from_numpy(out[:count]).view(values.dtype) if count else values.new_empty(0)


def topk(scores: Tensor, within: Tensor, k: int) -> Tensor:
    """Exactly ``k`` True entries: the largest ``scores`` among the entries where ``within`` is True,
    ties to the lower flat index, as :func:`fedselect.core.topk.topk_mask` chooses them; 0 < k < the
    number of candidates.

    Two or three passes over float32 scores: a count of the candidates per upper 16 bits of an
    order-preserving key, then (unless the k-th largest is 0) per lower 16 bits within the bin that
    holds the k-th largest, which is then known exactly, and the choice, without a branch per entry.
    -0.0 ties with +0.0, as they compare equal. ValueError when a candidate is NaN (no ranking), as
    topk_mask.
    """
    _compile()
    out = torch.empty(scores.shape, dtype=torch.bool)
    status = _topk(_flat(scores).view(np.int32), _flat(within), int(k), _flat(out))
    if status:
        raise ValueError("scores contain NaN among the candidate entries")
    return out


def abs_change_topk(new: Tensor, old: Tensor, within: Tensor, k: int) -> Tensor:
    """:func:`topk` of the scores ``|new - old|`` (float32, one shape), without making them first:
    FedSelect's GradLTN selection (Alg. 1: the largest gamma = |theta_trained - theta_0| within m).

    Three passes, as :func:`topk`'s, the first computing each change as it counts it (the same
    IEEE subtraction and absolute value as ``(new - old).abs()``, so the same entries are chosen);
    0 < k < the number of candidates; ValueError when a candidate's change is NaN.
    """
    _compile()
    gamma = np.empty(new.numel(), dtype=np.float32)
    out = torch.empty(new.shape, dtype=torch.bool)
    status = _abs_change_topk(_flat(new), _flat(old), _flat(within), int(k), gamma, _flat(out))
    if status:
        raise ValueError("scores contain NaN among the candidate entries")
    return out
