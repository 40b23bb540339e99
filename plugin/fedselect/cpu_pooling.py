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
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["ChannelsLastMaxPool2d", "ChannelsLastStemConv2d", "use_channels_last_max_pool", "use_channels_last_stems"]


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
    """``nn.MaxPool2d`` that pools a contiguous 4-D CPU batch in channels-last, returning it contiguous.

    A pool fed only by convolutions (``after_stem``, set by :func:`use_channels_last_stems`) also
    takes a channels-last batch, which only a :class:`ChannelsLastStemConv2d` hands it, and returns
    it contiguous, as the standard convolution before it would have left it.
    """

    after_stem = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices:
            return super().forward(x)  # not a case this class speeds up (GPU, indices wanted)
        nchw, channels_last = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
        wants_grad = torch.is_grad_enabled() and x.requires_grad
        if nchw and not channels_last and wants_grad:
            return _ChannelsLastMaxPool.apply(x, self)
        if not wants_grad and ((nchw and not channels_last) or (channels_last and not nchw and self.after_stem)):
            return _pool_channels_last(x, self, indices=False).contiguous()
        # already channels-last (a channels-last model), or 1x1 spatial where both layouts
        # coincide: the standard kernel, which keeps the layout
        return super().forward(x)


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


# A convolution with at most this many input channels (a model's first layer, on images) is a stem
# candidate: there both layouts' kernels reduce over (kh, kw, c) in the same order (bench/README.md)
_STEM_MAX_CHANNELS = 4


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bit patterns (NaN, -0.0 and infinities included), whatever the layouts."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


class ChannelsLastStemConv2d(nn.Conv2d):
    """A model's first convolution whose output only a max pool reads: without autograd on the CPU it
    convolves in channels-last and hands the pool (:class:`ChannelsLastMaxPool2d`) that layout.

    In the standard layout oneDNN writes the output blocked and then reorders it to NCHW, and the
    pool reorders it again to channels-last; here neither happens (small CNN, 200 images: the
    evaluation forward from about 55 to 35 ms). The first batch of every shape is convolved both
    ways and compared bit for bit; a shape whose bits differ (another CPU's kernels) keeps the
    standard convolution. So the output is always the standard kernel's, bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path_applies(x):
            return super().forward(x)
        verdicts: dict[tuple[int, ...], bool] = self.__dict__.setdefault("_layout_verdicts", {})
        key = tuple(x.shape)
        if verdicts.get(key) is False:
            return super().forward(x)
        fast = self._conv_forward(x.contiguous(memory_format=torch.channels_last), self.weight, self.bias)
        if key not in verdicts:
            standard = super().forward(x)
            verdicts[key] = _same_bits(standard, fast)
            if not verdicts[key]:
                return standard
        return fast

    def _fast_path_applies(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False)))
        # a dispatch mode watches the operations themselves (a FLOP counter would count the first
        # call's second convolution; fake tensors have no bits to compare): the standard path
        return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == self.weight.dtype == torch.float32
                and not needs_grad and not torch.is_autocast_enabled("cpu") and not is_in_torch_dispatch_mode()
                and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last))


class _LeafTracer(torch.fx.Tracer):
    """Traces through everything but convolutions, pools and ReLUs (ours are not ``torch.nn`` classes)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.ReLU)) or super().is_leaf_module(m, module_qualified_name)


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    return (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
        node.op == "call_method" and node.target == "relu")


def _source_conv(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The convolution call a pool's input comes from, through ReLUs that only pass it on; None if
    another op made it, or if anything else reads the convolution's output."""
    while _is_relu(node, modules) and len(node.users) == 1 and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d) and len(node.users) == 1:
        return node
    return None


def _stem_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(stem convolution, pool) pairs: a plain few-channel ``nn.Conv2d`` each of whose calls is read
    only by a max pool (through ReLUs), where every call of that pool reads a convolution's output.

    Found on the model's traced graph; a model that does not trace has none.
    """
    modules = dict(model.named_modules())
    # no tracing of models without both (a vision transformer's patch embedding is a stem, but no
    # pool reads it)
    if not (any(_is_stem(m) for m in modules.values())
            and any(isinstance(m, ChannelsLastMaxPool2d) for m in modules.values())):
        return []
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any untraceable model simply keeps the standard kernels
        return []
    calls: dict[str, list[torch.fx.Node]] = {}
    pool_sources: dict[str, list[torch.fx.Node | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        calls.setdefault(str(node.target), []).append(node)
        if isinstance(modules[node.target], ChannelsLastMaxPool2d):
            arg = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            pool_sources.setdefault(str(node.target), []).append(
                _source_conv(arg, modules) if isinstance(arg, torch.fx.Node) else None)
    # a pool qualifies when a convolution feeds every call of it; a convolution when every call of
    # it feeds a qualifying pool (a module called twice changes for both calls)
    feeds = {conv: str(pool) for pool, sources in pool_sources.items() if None not in sources for conv in sources}
    return sorted({(name, feeds[nodes[0]]) for name, nodes in calls.items()
                   if _is_stem(modules[name]) and all(n in feeds for n in nodes)
                   and len({feeds[n] for n in nodes}) == 1})


def _is_stem(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.in_channels <= _STEM_MAX_CHANNELS and conv.groups == 1
            and conv.padding_mode == "zeros")


def use_channels_last_stems(model: nn.Module) -> int:
    """Make each stem convolution of ``model`` whose output only a max pool reads a
    :class:`ChannelsLastStemConv2d`, in place (after :func:`use_channels_last_max_pool`; not for a
    channels-last model, whose layout is its own). Returns how many convolutions changed."""
    modules = dict(model.named_modules())
    pairs = _stem_pairs(model)
    for conv, pool in pairs:
        modules[conv].__class__ = ChannelsLastStemConv2d
        modules[pool].after_stem = True
    return len(pairs)
