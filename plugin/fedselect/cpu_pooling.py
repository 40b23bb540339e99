"""Max pooling on the CPU in the channels-last layout: the same values and gradients, faster.

On one CPU thread PyTorch's max-pool kernel for contiguous (NCHW) tensors walks each window
entry by entry, while its channels-last kernel compares whole channel vectors at once. For a
ResNet-18 stem on 32 px inputs (64 x 16 x 16, 3x3 stride 2) the NCHW forward takes about 5x as
long as a round trip through channels-last (bench/README.md, "CPU, 2026-11-27, second pass").

Max pooling is exact: every output is one of its window's inputs, picked by the same rule in
both kernels (the first maximum in window order, a NaN wins). So pooling in the other layout
and converting back gives the same bits forward, and the same argmax, hence the same gradient
backward (``tests/test_cpu_pooling.py``). The convolutions around it keep their layout, so
their algorithms, and their bits, do not change either.

:func:`use_channels_last_max_pool` turns every plain ``nn.MaxPool2d`` of a model into a
:class:`ChannelsLastMaxPool2d`; the runner does it for CPU runs (``runner.federation.on_device``).
It changes the modules' class only: no parameters, buffers or state-dict keys change, and
``isinstance(m, nn.MaxPool2d)`` stays true.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

__all__ = ["ChannelsLastMaxPool2d", "use_channels_last_max_pool"]


def _pool_geometry(module: nn.MaxPool2d) -> tuple[list[int], list[int], list[int], list[int]]:
    """(kernel, stride, padding, dilation) as the aten kernels take them; stride None means kernel."""
    stride = module.stride if module.stride is not None else module.kernel_size
    return (list(_pair(module.kernel_size)), list(_pair(stride)), list(_pair(module.padding)),
            list(_pair(module.dilation)))


def _pool_channels_last(x: torch.Tensor, module: nn.MaxPool2d, *, indices: bool) -> Any:
    """``module``'s pooling of ``x`` by the channels-last kernel (with the argmax indices if asked)."""
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), *_pool_geometry(module),
                        ceil_mode=module.ceil_mode, return_indices=indices)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Forward in channels-last with indices; backward by the NCHW kernel autograd itself would call.

    The argmax indices are flat positions within each (sample, channel) plane, the same in both
    layouts, so the backward is ``aten.max_pool2d_with_indices_backward`` on exactly the tensors
    the standard path hands it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.MaxPool2d) -> torch.Tensor:
        pooled, indices = _pool_channels_last(x, module, indices=True)
        indices = indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.module = module
        return pooled.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *_pool_geometry(ctx.module), ctx.module.ceil_mode, indices), None


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a contiguous 4-D CPU batch in channels-last, returning it contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or self.return_indices
                or not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            # not a case this class speeds up (GPU, indices wanted), or already channels-last
            # (or 1x1 spatial, where both layouts coincide): the standard kernel
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _ChannelsLastMaxPool.apply(x, self)
        return _pool_channels_last(x, self, indices=False).contiguous()


def use_channels_last_max_pool(model: nn.Module) -> int:
    """Make every plain ``nn.MaxPool2d`` in ``model`` a :class:`ChannelsLastMaxPool2d`, in place.

    Subclasses of ``nn.MaxPool2d`` are left alone (their forward may differ). Returns how many
    modules changed.
    """
    changed = 0
    for module in model.modules():
        if type(module) is nn.MaxPool2d:
            module.__class__ = ChannelsLastMaxPool2d
            changed += 1
    return changed
