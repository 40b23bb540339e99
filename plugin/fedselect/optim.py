"""The masked optimizer under every partially personalized method, and the trainable-part context.

The optimizer step can be restricted to a boolean mask per parameter tensor: this is the mechanism
under every partially personalized method (FedPer's head, FedSelect's learned element-wise mask,
layer selection's frozen blocks). Tensors that are not trainable at all get ``requires_grad=False``
so autograd skips their gradient work entirely.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from fedselect.core import cpu_kernels
from fedselect.core.blend import BIT_TYPES, select_into_, selection_bits, where_fill, where_fill_
from fedselect.core.masks import true_counts

# name -> None (whole tensor trainable) or a bool tensor of the parameter's shape (True =
# this entry may change). A parameter missing from the mapping is frozen.
TrainableSpec = Mapping[str, torch.Tensor | None]


class MaskedSGD:
    """SGD with momentum and weight decay whose step touches only the masked entries.

    ``torch.optim.SGD`` would still apply weight decay and momentum to entries whose gradient
    was zeroed, so masked-out entries would drift. Here an update is ``p -= where(m, lr*d, 0)``:
    entries outside the mask are bit-identical after any number of steps.

    Momentum is masked the same way: an entry's buffer takes in gradient only in a step that
    may update that entry, and is left as it was otherwise. Buffers are kept per parameter name
    across passes, so alternating passes over different parts (LocalAlt) behave as one momentum
    optimizer per part: the shared part u never spends momentum gathered from gradients of a
    pass that held it fixed (Pillutla et al. 2022, Alg. 1: u is fixed while v trains), and a
    v-pass followed by a u-pass equals the v-pass followed by a fresh optimizer's u-pass. A
    whole tensor that a pass freezes has no gradient and keeps its buffer, the same rule.
    """

    def __init__(self, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 flat_masked: bool | None = None) -> None:
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffers: dict[str, torch.Tensor] = {}
        # masked tensors updated as one flat vector (a few whole-model kernels) rather than one
        # tensor at a time: on a GPU a masked step is bound by kernel launches (bench/step_profile.py,
        # H100, ResNet-18: 803 launches and 21 ms per step, 2.5 ms of it in kernels). None: on CUDA
        # tensors only (on CPU the per-tensor path needs no whole-model temporaries). Same values.
        self.flat_masked = flat_masked
        # CPU: each mask's selection bits for the branch-free masked update (fedselect.core.blend)
        self._bits: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, params: list[tuple[str, nn.Parameter, torch.Tensor | None]]) -> None:
        whole = [(name, param) for name, param, mask in params if mask is None and param.grad is not None]
        if whole:
            self._step_whole(whole)
        masked = [(name, param, mask) for name, param, mask in params if mask is not None and param.grad is not None]
        if masked and self._flat(masked):
            self._step_masked_flat(masked)
            return
        for name, param, mask in masked:
            direction = param.grad
            if self.weight_decay:
                direction = direction.add(param, alpha=self.weight_decay)
            buffer = self.buffers.get(name) if self.momentum else None
            if (not self.momentum or buffer is not None) and cpu_kernels.step_applies(param, direction, mask, buffer):
                # one pass instead of three to five (fedselect.core.cpu_kernels), the same bits
                cpu_kernels.masked_step(param, direction, mask, self.lr, momentum_buffer=buffer,
                                        momentum=self.momentum)
                continue
            bits = self._selection_bits(mask, param.dtype)
            if self.momentum:
                direction = self._momentum(name, direction, mask, bits)
            param.sub_(where_fill_(direction * self.lr, mask, bits=bits))  # the product is ours to blend in place

    def _selection_bits(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask's :func:`selection_bits` on CPU, made once per mask object (a pass's masks stay
        the same objects for all its steps; the entry holds the mask, so its id is not reused)."""
        if mask.device.type != "cpu" or dtype not in BIT_TYPES:
            return None
        key = (id(mask), dtype)
        cached = self._bits.get(key)
        if cached is None or cached[0] is not mask:
            cached = self._bits[key] = (mask, selection_bits(mask, dtype))
        return cached[1]

    def _flat(self, masked: list[tuple[str, nn.Parameter, torch.Tensor]]) -> bool:
        use = masked[0][1].is_cuda if self.flat_masked is None else self.flat_masked
        # a tensor's first momentum step starts its buffer, one tensor at a time (once per call)
        return use and len(masked) > 1 and (not self.momentum or all(name in self.buffers for name, _, _ in masked))

    def _step_masked_flat(self, masked: list[tuple[str, nn.Parameter, torch.Tensor]]) -> None:
        """The per-tensor masked update on the concatenation of the masked tensors: the same
        element-wise operations in the same order, so the same values."""
        params = [param for _, param, _ in masked]
        sizes = [param.numel() for param in params]
        mask = torch.cat([m.reshape(-1) for _, _, m in masked])
        direction = torch.cat([param.grad.reshape(-1) for param in params])
        if self.weight_decay:
            direction = direction.add(torch.cat([param.reshape(-1) for param in params]), alpha=self.weight_decay)
        if self.momentum:
            buffers = [self.buffers[name] for name, _, _ in masked]
            flat = torch.cat([b.reshape(-1) for b in buffers])
            flat = torch.where(mask, flat * self.momentum + direction, flat)
            torch._foreach_copy_(buffers, [v.view_as(b) for v, b in zip(flat.split(sizes), buffers, strict=True)])
            direction = flat
        update = torch.where(mask, direction * self.lr, 0.0)
        torch._foreach_sub_(params, [u.view_as(p) for u, p in zip(update.split(sizes), params, strict=True)])

    def _step_whole(self, whole: list[tuple[str, nn.Parameter]]) -> None:
        """Tensors updated in full, as one multi-tensor (``_foreach``) op per stage.

        The same operations, in the same order, as one tensor at a time (on CPU PyTorch runs them so;
        on a GPU they are fused into a few kernel launches instead of several per tensor).
        """
        params = [param for _, param in whole]
        directions = [param.grad for param in params]
        if self.weight_decay:
            directions = torch._foreach_add(directions, params, alpha=self.weight_decay)
        if self.momentum:
            fresh = [i for i, (name, _) in enumerate(whole) if name not in self.buffers]
            for i in fresh:
                self.buffers[whole[i][0]] = directions[i].clone()
            old = [i for i in range(len(whole)) if i not in set(fresh)]
            if old:
                buffers = [self.buffers[whole[i][0]] for i in old]
                torch._foreach_mul_(buffers, self.momentum)
                torch._foreach_add_(buffers, [directions[i] for i in old])
            directions = [self.buffers[name] for name, _ in whole]
        torch._foreach_add_(params, directions, alpha=-self.lr)

    def _momentum(self, name: str, direction: torch.Tensor, mask: torch.Tensor,
                  bits: torch.Tensor | None) -> torch.Tensor:
        """buf <- momentum * buf + direction on the entries this step may update; others unchanged."""
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = where_fill(mask, direction, bits=bits)
        else:
            select_into_(buf, mask, buf * self.momentum + direction, bits=bits)
        return buf

    @staticmethod
    def zero_grad(params: list[tuple[str, nn.Parameter, torch.Tensor | None]]) -> None:
        for _, param, _ in params:
            param.grad = None


def mask_coverage(masks: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """"all", "none" or "some" True entries per mask, with one host synchronisation for all of them."""
    # one pass per mask (a count), not two (all and any)
    counts = true_counts(masks)
    return {name: "all" if counts[name] == m.numel() else ("some" if counts[name] else "none")
            for name, m in masks.items()}


def resolve_trainable(model: nn.Module, trainable: TrainableSpec | None,
                      coverage: Mapping[str, str] | None = None) -> dict[str, torch.Tensor | None]:
    """The parameters a pass trains, in model order: name -> mask on the parameter's device (None:
    the whole tensor). A mask that is all True becomes None; an all-False mask freezes the tensor
    (it is left out). ``coverage``: the spec's :func:`mask_coverage`, when the caller already read it.
    """
    params = dict(model.named_parameters())
    if trainable is None:
        return dict.fromkeys(params)
    unknown = [name for name in trainable if name not in params]
    if unknown:
        raise KeyError(f"trainable spec names unknown parameter '{unknown[0]}'")
    masks = {}
    for name, mask in trainable.items():
        if mask is not None:
            if mask.shape != params[name].shape:
                raise ValueError(f"mask for '{name}' has shape {tuple(mask.shape)}, "
                                 f"parameter has {tuple(params[name].shape)}")
            masks[name] = mask.to(device=params[name].device, dtype=torch.bool)
    if coverage is None:
        coverage = mask_coverage(masks)
    resolved: dict[str, torch.Tensor | None] = {}
    for name in params:
        if name not in trainable:
            continue
        mask = masks.get(name)
        if mask is None or coverage[name] == "all":
            resolved[name] = None
        elif coverage[name] == "some":
            resolved[name] = mask
    return resolved


@contextmanager
def trainable_only(model: nn.Module, trainable: TrainableSpec | None,
                   coverage: Mapping[str, str] | None = None
                   ) -> Iterator[list[tuple[str, nn.Parameter, torch.Tensor | None]]]:
    """Within the block only the parameters :func:`resolve_trainable` picks require grad; yields
    (name, param, mask) for them."""
    resolved = resolve_trainable(model, trainable, coverage)
    params = dict(model.named_parameters())
    saved = {name: p.requires_grad for name, p in params.items()}
    try:
        for name, param in params.items():
            param.requires_grad_(name in resolved)
        yield [(name, params[name], mask) for name, mask in resolved.items()]
    finally:
        for name, param in params.items():
            param.requires_grad_(saved[name])
