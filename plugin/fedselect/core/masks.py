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
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fedselect.core import cpu_kernels
from fedselect.core.host import counts_true

State = dict[str, Tensor]
Mask = dict[str, Tensor]

__all__ = [
    "Mask",
    "PackedTensor",
    "State",
    "compress",
    "empty_mask",
    "full_mask",
    "gather_masked",
    "iou_matrix",
    "mask_iou",
    "pack_bits",
    "pack_mask",
    "personal_count",
    "personal_fraction",
    "personal_fraction_by_group",
    "scatter_masked",
    "target_count",
    "true_counts",
    "counted_fraction",
    "unpack_bits",
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


def true_counts(mask: Mapping[str, Tensor]) -> dict[str, int]:
    """True entries per tensor, counted on the device with one host synchronisation for all."""
    return dict(zip(mask, counts_true(list(mask.values())), strict=True))


def personal_count(mask: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> tuple[int, int]:
    """(number of personal entries, number of entries) over ``keys`` (default: all tensors).

    The counts behind |v| / |theta| of the partial-personalization split (Pillutla et al. 2022, Sec. 2).
    """
    names = list(mask) if keys is None else list(keys)
    for k in names:
        if k not in mask:
            raise ValueError(f"mask has no tensor {k!r}")
    counts = true_counts({k: mask[k] for k in names})
    return sum(counts.values()), sum(mask[k].numel() for k in names)


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


def compress(values: Tensor, mask: Tensor) -> Tensor:
    """``torch.masked_select(values, mask)`` (same shape and dtype), by ``numpy.compress`` on the CPU.

    On one CPU thread ``masked_select`` branches per entry and mispredicts on scattered masks;
    numpy's compress is about twice as fast (25 ms against 10 ms for 2.4 M entries with a 30 %
    mask; bench/README.md). Other devices, dtypes numpy lacks (bfloat16), and tensors that need
    a gradient use ``masked_select``.
    """
    if (values.device.type != "cpu" or values.requires_grad or values.dtype == torch.bfloat16
            or values.shape != mask.shape or mask.dtype != torch.bool):
        return torch.masked_select(values, mask)
    if cpu_kernels.applies(values, mask):
        return cpu_kernels.compress(values, mask)  # one branch-free pass: 0.8 against 9 ms for 2.4 M
    kept = np.compress(mask.reshape(-1).numpy(), values.reshape(-1).numpy())
    # an empty numpy result has stride 0, which byte views of it refuse: a fresh empty tensor instead
    return torch.from_numpy(kept) if kept.size else values.new_empty(0)


def scatter_masked(target: Tensor, mask: Tensor, values: Tensor, *, base: Tensor | None = None) -> Tensor:
    """In place: ``target`` takes ``base``'s values (when given), then ``target[mask] = values`` in
    row-major order (``masked_scatter_``); ``values`` holds one entry per True entry of ``mask``.

    A client's model is its global values with its personal ones on top (``base`` the global tensor).
    On the CPU both happen in one pass (:func:`fedselect.core.cpu_kernels.merge_personal`, 1.7 against
    11 ms for 2.4 M entries), with the same bits.
    """
    if (values.dtype == target.dtype and (base is None or (base.dtype == target.dtype and base.shape == target.shape))
            and cpu_kernels.applies(target.detach(), mask, values, *([] if base is None else [base]))):
        target = target.detach()
        cpu_kernels.merge_personal(target, target if base is None else base, mask, values)
        return target
    if base is not None:
        target.copy_(base)
    return target.masked_scatter_(mask, values.to(target.dtype))


def gather_masked(values: Tensor, mask: Tensor, count: int, *, method: str = "auto") -> Tensor:
    """``values[mask]`` (row-major order) when the number of True entries, ``count``, is known.

    ``masked_select`` must read the mask's count back from the device; with the count known, the
    GPU path writes each selected value to its rank (``cumsum``) in a buffer with one spare slot for
    the rest, so nothing waits for the device. Same values in the same order either way
    (``method``: auto = ``index_copy`` on CUDA, :func:`compress` elsewhere, or ``masked_select``).
    """
    if method == "auto":
        method = "index_copy" if values.device.type == "cuda" else "compress"
    if method == "compress":
        return compress(values, mask)
    if method == "masked_select":
        return torch.masked_select(values, mask)
    flat_mask = mask.reshape(-1)
    rank = torch.cumsum(flat_mask, 0) - 1
    slot = torch.where(flat_mask, rank, count)  # every unselected entry writes the spare slot
    out = torch.empty(count + 1, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, slot, values.reshape(-1))[:count].clone()


class PackedTensor(NamedTuple):
    """One bit-packed mask tensor: ``bits`` (uint8, 8 entries per byte, MSB first) and its shape."""

    bits: Tensor
    shape: tuple[int, ...]


def pack_mask(mask: Mapping[str, Tensor], *, method: str = "auto") -> dict[str, PackedTensor]:
    """Bit-pack a mask, one bit per entry (row-major, MSB first, zero-padded to whole bytes).

    The wire/storage form of a client's mask m_k (FedSelect Alg. 1 output): ceil(numel / 8) bytes per
    tensor instead of one byte per bool. Packed bits are on the CPU. ``method``: ``numpy`` copies
    the bools to the host once and packs them there (``np.packbits``); ``torch`` packs on the
    mask's device and copies an eighth of the bytes back (:func:`pack_bits`); ``auto`` takes
    ``torch`` for a mask on a CUDA device and ``numpy`` otherwise. Same bits either way.
    """
    for k, m in mask.items():
        if m.dtype != torch.bool:
            raise ValueError(f"mask tensor {k!r} has dtype {m.dtype}, expected torch.bool")
    if not mask:
        _bits_method("pack_mask", method, None)  # a bad method is refused even for an empty mask
        return {}
    device = next(iter(mask.values())).device
    if _bits_method("pack_mask", method, device) == "torch":
        return pack_bits(mask)
    # one device-to-host copy for the whole mask (a GPU waits once, not once per tensor)
    flat = torch.cat([m.detach().reshape(-1).to(device) for m in mask.values()])
    host = flat.cpu().numpy()
    out: dict[str, PackedTensor] = {}
    offset = 0
    for k, m in mask.items():
        # numpy's packbits is this layout (MSB first, zero-padded) and runs in C
        out[k] = PackedTensor(bits=torch.from_numpy(np.packbits(host[offset:offset + m.numel()])),
                              shape=tuple(m.shape))
        offset += m.numel()
    return out


def pack_bits(mask: Mapping[str, Tensor]) -> dict[str, PackedTensor]:
    """:func:`pack_mask`'s bytes made on the mask's device, then copied to the host at once.

    Each tensor's flags are padded with False to whole bytes, so every tensor starts on a byte;
    each byte is its 8 flags weighted 128, 64, ..., 1 (MSB first, as ``np.packbits``).
    """
    device = next(iter(mask.values())).device
    pieces: list[Tensor] = []
    for m in mask.values():
        flat = m.detach().reshape(-1).to(device)
        pieces.append(flat)
        if flat.numel() % 8:
            pieces.append(torch.zeros(8 - flat.numel() % 8, dtype=torch.bool, device=device))
    flags = torch.cat(pieces).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)
    host = (flags * weights).sum(dim=1).to(torch.uint8).cpu()  # each byte's sum is at most 255
    out: dict[str, PackedTensor] = {}
    offset = 0
    for k, m in mask.items():
        size = (m.numel() + 7) // 8
        out[k] = PackedTensor(bits=host[offset:offset + size].clone(), shape=tuple(m.shape))
        offset += size
    return out


def unpack_mask(
    packed: Mapping[str, PackedTensor | tuple[Tensor, Sequence[int]]],
    device: torch.device | str | None = None,
    *,
    method: str = "auto",
) -> Mask:
    """Inverse of ``pack_mask``: exact round trip to a bool mask (optionally moved to ``device``).

    Restores a client's stored mask m_k (FedSelect Alg. 1) before training or aggregation.
    ``method``: ``numpy`` unpacks on the host (``np.unpackbits``) and copies each tensor to
    ``device``; ``torch`` copies the packed bytes of all tensors to ``device`` at once, an eighth
    of the bools, and expands the bits there (:func:`unpack_bits`); ``auto`` takes ``torch`` for
    a CUDA device and ``numpy`` otherwise. Same masks either way.
    """
    items = {k: _checked_packed(k, bits, shape) for k, (bits, shape) in packed.items()}
    target = torch.device(device) if device is not None else None
    if _bits_method("unpack_mask", method, target) == "torch":
        return unpack_bits(items, target or torch.device("cpu"))
    out: Mask = {}
    for k, (bits, shape_t) in items.items():
        flat = np.unpackbits(bits.cpu().numpy(), count=math.prod(shape_t)).view(np.bool_)
        m = torch.from_numpy(flat).reshape(shape_t)
        out[k] = m if target is None else m.to(target)
    return out


def unpack_bits(items: Mapping[str, tuple[Tensor, tuple[int, ...]]], device: torch.device) -> Mask:
    """Packed masks (MSB first, each tensor padded to whole bytes) unpacked on ``device``.

    One host-to-device copy of every tensor's bytes together, then one shift-and-mask expands all
    bits; each tensor's mask is a view of that buffer, starting at 8 times its byte offset.
    """
    if not items:
        return {}
    host = torch.cat([bits.reshape(-1).cpu() for bits, _ in items.values()])
    on_device = host.to(device)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    flags = ((on_device.unsqueeze(1) >> shifts) & 1).to(torch.bool).reshape(-1)
    out: Mask = {}
    offset = 0
    for k, (bits, shape_t) in items.items():
        numel = math.prod(shape_t)
        out[k] = flags[8 * offset:8 * offset + numel].view(shape_t)
        offset += bits.numel()
    return out


def _bits_method(caller: str, method: str, device: torch.device | None) -> str:
    """``numpy`` or ``torch`` for packing or unpacking: ``auto`` is torch on a CUDA device."""
    if method not in ("auto", "numpy", "torch"):
        raise ValueError(f"{caller}: method must be auto, numpy or torch, got {method!r}")
    if method == "auto":
        return "torch" if device is not None and device.type == "cuda" else "numpy"
    return method


def _checked_packed(name: str, bits: Tensor, shape: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """``(bits, shape)`` of one packed tensor, refused unless the bytes fit the shape exactly."""
    shape_t = tuple(int(s) for s in shape)
    numel = math.prod(shape_t)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed tensor {name!r}: expected {(numel + 7) // 8} uint8 bytes for shape {shape_t}, "
            f"got {bits.dtype} of shape {tuple(bits.shape)}"
        )
    return bits, shape_t
