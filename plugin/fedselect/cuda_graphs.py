"""CUDA-graphed training forward and backward (``train.cuda_graphs``: ``auto``, the default, or ``true``).

On a GPU, a small model's training step is bound by the host, not by the device: ResNet-18 at
32 px and batch 32 on an H100 spends 1.7 ms of a 10 ms step in kernels, the rest in Python,
autograd and some 300 kernel launches (``bench/step_profile.py``). A CUDA graph records the
forward and the backward pass once and then replays them with one launch each.

:func:`graphed_forward` returns, for one training pass, a drop-in replacement for ``model(x)``
whose forward and backward are replays of graphs captured with
:func:`torch.cuda.make_graphed_callables`. Graphs are kept per model and per everything that
changes what they compute: the input's shape, dtype and strides, which parameters require
gradients, which modules are in training mode, autocast, and the storage of every parameter
and buffer (a model whose tensors were replaced gets new graphs, never stale ones). Within a
study's run those repeat (a client's last smaller batch adds one shape), so a handful of
graphs serve every client and round.

What stays outside the graphs, eagerly: the loss, any extra loss term (Ditto's proximal term),
the optimizer step, augmentation and evaluation. Gradients reach ``param.grad`` through
autograd as usual, so :class:`fedselect.optim.MaskedSGD` works unchanged.

Semantics kept: capturing runs warm-up passes, whose BatchNorm statistics updates are undone
(every buffer is restored bit for bit afterwards); the model's own forward hooks are called after
each replay, as ``model(x)`` would (hooks on submodules or forward pre-hooks would run only while
capturing, so they are refused). Values match the eager step up to the usual GPU reordering of
floating-point sums (``bench/step_profile.py --graphs`` prints the largest difference).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

GraphKey = tuple
Forward = Callable[[torch.Tensor], torch.Tensor]

# model -> {key: graphed callable}, least recently used first; weak, so graphs go with their model
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, OrderedDict[GraphKey, Forward]] = weakref.WeakKeyDictionary()
# graph pairs kept per model: each holds its own memory pool for the pass's activations, and a
# run whose trainable pattern keeps changing (layer selection picks other layers every round)
# would otherwise add pairs without end; the least recently used pair is dropped (and recaptured
# if it is needed again)
MAX_GRAPHS_PER_MODEL = 16


# the largest image side at which ``auto`` turns graphs on: measured at 32 px (ResNet-18 on an
# H100, a step 3.1 instead of 8.2 ms, the whole study 1.87 instead of 2.4 GPU-hours); at 64 px a
# step is still bound by its launches. Larger images make each step's kernels long enough that a
# replay saves little, while each kept graph pins a memory pool for its pass's activations
AUTO_MAX_IMAGE_SIZE = 64


def uses_cuda_graphs(setting: bool | str, device: torch.device, *, image_size: int | None) -> bool:
    """Whether a run's training passes are replayed from CUDA graphs (``train.cuda_graphs``).

    ``true`` and ``false`` are taken as they are (``true`` without CUDA is refused earlier, by
    the config check and :func:`fedselect.runner.federation.on_device`). ``auto`` turns graphs
    on where they were measured to pay: a CUDA device and an image model whose input side
    (``image_size``, after any resize) is at most :data:`AUTO_MAX_IMAGE_SIZE`. Text models
    (``image_size`` None) stay eager: their forward may wait for the host (attention masks,
    data-dependent shapes), which a capture cannot hold.
    """
    if setting == "auto":
        return device.type == "cuda" and image_size is not None and image_size <= AUTO_MAX_IMAGE_SIZE
    return bool(setting)


def graphed_forward(model: nn.Module) -> Forward:
    """``model(x)`` for one training pass, its forward and backward replayed from CUDA graphs.

    Call it at the start of a pass (after ``requires_grad`` and train/eval modes are set): the
    pass-level part of the key is read once here, the batch's shape on every call.
    """
    _check_hooks(model)
    cache = _GRAPHS.setdefault(model, OrderedDict())
    params = tuple(model.parameters())
    model_key = pass_key(model)
    model_ref = weakref.ref(model)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        key = model_key + batch_key(inputs)
        graphed = cache.get(key)
        if graphed is None:
            while len(cache) >= MAX_GRAPHS_PER_MODEL:
                cache.popitem(last=False)
            graphed = cache[key] = _capture(model, params, inputs)
        else:
            cache.move_to_end(key)
        output = graphed(inputs, *params)
        return _after_hooks(model_ref(), inputs, output)

    return forward


def pass_key(model: nn.Module) -> GraphKey:
    """What a graph of ``model`` depends on within a pass: which parameters require gradients,
    which modules train, and where every parameter and buffer is stored."""
    return (
        tuple(p.requires_grad for p in model.parameters()),
        tuple(m.training for m in model.modules()),
        tuple(t.data_ptr() for t in model.parameters()),
        tuple(b.data_ptr() for b in model.buffers()),
    )


def batch_key(inputs: torch.Tensor) -> GraphKey:
    """What a graph depends on per batch: the input's shape, dtype, strides and autocast."""
    return (tuple(inputs.shape), inputs.dtype, inputs.stride(), _autocast_key(inputs.device))


def graph_count(model: nn.Module) -> int:
    """How many graph pairs (forward + backward) are held for ``model``."""
    return len(_GRAPHS.get(model, {}))


def _capture(model: nn.Module, params: tuple[nn.Parameter, ...], sample: torch.Tensor) -> Forward:
    """Capture ``model``'s forward and backward for inputs like ``sample``; the model's state is
    left as it was (the warm-up passes' BatchNorm updates are undone)."""
    model_ref = weakref.ref(model)

    def run(inputs: torch.Tensor, *_params: torch.Tensor) -> torch.Tensor:
        # the parameters are passed as arguments (the same tensors the modules use), so the graphed
        # backward returns their gradients; forward() not __call__: top-level hooks run outside
        return model_ref().forward(inputs)

    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    # the capture's autograd nodes for the parameters (kept alive by the graph's outputs) belong to
    # the capture stream, so each eager backward pass after a replay warns that they differ from
    # its own stream; the stream wait it adds is the price of the graphs, not an error
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    try:
        graphed = torch.cuda.make_graphed_callables(run, (sample.detach().clone(), *params),
                                                    allow_unused_input=True)
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
    return graphed


def _autocast_key(device: torch.device) -> tuple:
    if not torch.is_autocast_enabled(device.type):
        return ()
    if torch.is_autocast_cache_enabled():
        # make_graphed_callables refuses autocast's weight cache; engine.autocast turns it off
        raise RuntimeError("train.cuda_graphs: autocast must run with cache_enabled=False")
    return (torch.get_autocast_dtype(device.type),)


def _check_hooks(model: nn.Module) -> None:
    """Hooks that a replay would skip are refused: on submodules, and forward pre-hooks."""
    if model._forward_pre_hooks or getattr(model, "_forward_hooks_with_kwargs", None):
        raise ValueError("train.cuda_graphs: the model has forward pre-hooks or keyword forward hooks, "
                         "which a graph replay would not run (set train.cuda_graphs: false)")
    for name, module in model.named_modules():
        if module is not model and (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks):
            raise ValueError(f"train.cuda_graphs: module '{name}' has hooks, which would run only while "
                             "capturing the graph, not on its replays (set train.cuda_graphs: false)")


def _after_hooks(model: nn.Module | None, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The model's own forward hooks, called as ``model(inputs)`` would call them."""
    if model is None:
        return output
    for hook in tuple(model._forward_hooks.values()):
        result = hook(model, (inputs,), output)
        if result is not None:
            output = result
    return output
