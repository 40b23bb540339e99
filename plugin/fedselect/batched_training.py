"""Several clients' local training passes as one batched computation (``train.client_batching``).

On a GPU, one client's step of a small model leaves the device mostly idle: ResNet-18 at 32 px
and batch 32 runs 1.7 ms of kernels on an H100, each too small to fill it, and jobs sharing the
GPU only take turns (docs/GPU.md). Here the clients of a round that make the same training call
train as one: their parameters are stacked along a leading client axis, the forward runs once
under :func:`torch.func.vmap` (a convolution of stacked weights becomes one grouped
convolution, BatchNorm keeps each client's running statistics in its slice), one backward gives
every client's gradient (the loss is the sum of the clients' mean losses, so client k's gradient
is that of its own loss), and the masked SGD step (:class:`fedselect.optim.MaskedSGD`'s rule)
runs as a few whole-stack operations.

What stays per client, as in :func:`fedselect.engine.train_passes`: the sample order and the
augmentation (each client's own generator, drawn in the same order), which entries train (each
client's own mask, applied in the step), its momentum, its loss sum and sample counts. Which
calls can share a batch is :func:`batch_signature`: same model, data size, passes structure,
trainable tensors per phase, optimizer and precision. The values match sequential training up
to floating-point reordering (grouped against separate convolutions), not bit for bit: the
option is for GPUs, whose runs are not bit-reproducible anyway. Not batched: a call with an
extra loss term (Ditto's proximal term, which reads the module); such calls train alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fedselect.engine import (
    ExtraLoss,
    ImageTransform,
    OptimConfig,
    Pass,
    SplitEpoch,
    TrainStats,
    autocast,
    freeze_norms,
    train_passes,
)
from fedselect.optim import TrainableSpec, resolve_trainable


@dataclass
class TrainRequest:
    """One client's :func:`fedselect.engine.train_passes` call, with the identity that seeds it."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    passes: Sequence[Pass]
    optim: OptimConfig
    transform: Any
    generator: torch.Generator
    extra_loss: ExtraLoss | None = None
    freeze_frozen_norms: bool = False
    freeze_norm_stats: bool = False
    precision: str = "fp32"
    cuda_graphs: bool = False
    # (seed, client id, round, stream): seeds the global generator (dropout) of a batched call
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)
    # per phase of every pass: the trainable parameter names and their masks (None: whole tensor)
    _plan: list[list[dict[str, torch.Tensor | None]]] | None = field(default=None, repr=False)

    def run_alone(self) -> TrainStats:
        """The call as :func:`fedselect.engine.train_passes` makes it."""
        return train_passes(self.model, self.x, self.y, self.passes, optim=self.optim, transform=self.transform,
                            generator=self.generator, extra_loss=self.extra_loss,
                            freeze_frozen_norms=self.freeze_frozen_norms, freeze_norm_stats=self.freeze_norm_stats,
                            precision=self.precision, cuda_graphs=self.cuda_graphs)

    def plan(self) -> list[list[dict[str, torch.Tensor | None]]]:
        """Per pass, per phase: trainable name -> mask (None: all of it), as ``trainable_only`` decides
        (:func:`fedselect.optim.resolve_trainable`; one host read per spec)."""
        if self._plan is None:
            resolved: dict[int, dict[str, torch.Tensor | None]] = {}
            for entry in self.passes:
                for spec in _phases(entry):
                    if id(spec) not in resolved:  # epochs repeat the same spec objects
                        resolved[id(spec)] = resolve_trainable(self.model, spec)
            self._plan = [[resolved[id(spec)] for spec in _phases(entry)] for entry in self.passes]
        return self._plan


def _phases(entry: Pass) -> tuple[TrainableSpec | None, ...]:
    return entry.phases if isinstance(entry, SplitEpoch) else (entry,)


def batch_signature(request: TrainRequest) -> tuple | None:
    """What calls must share to train as one batch; None: this call trains alone.

    The model's parameter and buffer shapes, the data's size and sample shape, the optimizer,
    precision and BatchNorm rules, and per phase of every pass which tensors train (the same
    tensors in train mode, the same random draws in the same order). Masks may differ. A model
    whose parameters have several dtypes trains alone.
    """
    model = request.model
    if request.extra_loss is not None or int(request.y.shape[0]) == 0:
        return None
    if len({p.dtype for p in model.parameters()}) != 1:
        return None  # the stack holds one dtype
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items())
    phases = tuple(tuple(tuple(phase) for phase in entry) for entry in request.plan())
    return (type(model), shapes, int(request.y.shape[0]), tuple(request.x.shape[1:]), request.x.dtype,
            request.optim, request.precision, request.freeze_frozen_norms, request.freeze_norm_stats, phases)


def train_together(requests: Sequence[TrainRequest]) -> list[TrainStats]:
    """Train calls of one :func:`batch_signature` as one batch; each call's stats, in order.

    Each client's model ends as its own sequential training would leave it, up to floating-point
    reordering: parameters, BatchNorm statistics, and the momentum of the call (kept per call, as
    :class:`fedselect.optim.MaskedSGD` does within one :func:`fedselect.engine.train_passes`).
    """
    if len(requests) == 1:
        return [requests[0].run_alone()]
    batch = _ClientStack(requests)
    with torch.random.fork_rng(devices=[batch.device] if batch.device.type == "cuda" else []):
        # dropout draws come from the global generator: seeded by the run's seed, the round and
        # stream of the call, and the batch's clients
        seed_, _, round_idx, stream = requests[0].identity
        seed = np.random.SeedSequence([seed_, round_idx, stream, *(r.identity[1] for r in requests), 0xBA7C])
        torch.manual_seed(int(seed.generate_state(1)[0]))
        return batch.train()


class _ClientStack:
    """The state of one batched call: the clients' buffers stacked, momentum per tensor name."""

    def __init__(self, requests: Sequence[TrainRequest]) -> None:
        self.requests = list(requests)
        self.models = [r.model for r in requests]
        self.template = self.models[0]
        self.device = requests[0].x.device
        self.k = len(requests)
        self.n = int(requests[0].y.shape[0])
        self.optim = requests[0].optim
        self.param_names = [n for n, _ in self.template.named_parameters()]
        self.params = [dict(m.named_parameters()) for m in self.models]
        self.client_buffers = [dict(m.named_buffers()) for m in self.models]
        self.buffers = {n: torch.stack([b[n] for b in self.client_buffers]) for n in self.client_buffers[0]}
        # momentum per trainable tensor name, stacked over clients, for this call
        self.momentum: dict[str, torch.Tensor] = {}
        # the trainable tensors stacked, kept from phase to phase while the same tensors train
        # (LocalAlt's v and u phases of FedSelect's masks: the same tensors, other masks), with
        # their flat momentum, the frozen tensors stacked and each phase's stacked masks
        self.stack: _TrainableStack | None = None
        self.stack_momentum: torch.Tensor | None = None
        self.frozen: dict[str, torch.Tensor] = {}
        self.masks: dict[tuple[int, ...], torch.Tensor | None] = {}
        self.loss_sums = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        self.stats = [TrainStats() for _ in requests]

    def train(self) -> list[TrainStats]:
        plans = [r.plan() for r in self.requests]
        was_training = self.template.training
        try:
            for entry_idx in range(len(plans[0])):
                phases = [plan[entry_idx] for plan in plans]
                if not any(phases[0]):
                    continue  # nothing trains: no random draws, as in train_passes
                orders = [torch.randperm(self.n, generator=r.generator).to(self.device, non_blocking=True)
                          for r in self.requests]
                count = len(phases[0])
                slices = [torch.tensor_split(o, count) if count > 1 else (o,) for o in orders]
                for phase_idx in range(count):
                    specs = [p[phase_idx] for p in phases]
                    if specs[0]:
                        self._train_phase(specs, [s[phase_idx] for s in slices])
            self._release_stack()
        finally:
            self.template.train(was_training)
            with torch.no_grad():
                for k, buffers in enumerate(self.client_buffers):
                    for name, buffer in buffers.items():
                        buffer.copy_(self.buffers[name][k])
        for stats, loss_sum in zip(self.stats, self.loss_sums.tolist(), strict=True):
            stats.loss_sum = loss_sum
        return self.stats

    def _train_phase(self, specs: list[dict[str, torch.Tensor | None]], orders: list[torch.Tensor]) -> None:
        names = list(specs[0])
        stack = self._use_stack(names)
        key = tuple(id(spec) for spec in specs)  # a request's resolved specs live as long as the call
        if key not in self.masks:
            self.masks[key] = self._stack_masks(names, specs)
        mask = self.masks[key]
        template = self.template
        saved = {n: p.requires_grad for n, p in template.named_parameters()}
        for n, p in template.named_parameters():
            p.requires_grad_(n in specs[0])
        template.train()
        first = self.requests[0]
        freeze_norms(template, frozen_layers=first.freeze_frozen_norms, all_layers=first.freeze_norm_stats)

        def forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(template, {**params, **buffers}, (x,))

        batched_forward = vmap(forward, randomness="different")
        try:
            length = int(orders[0].shape[0])
            for start in range(0, length, self.optim.batch_size):
                batch = [o[start:start + self.optim.batch_size] for o in orders]
                size = int(batch[0].shape[0])
                if size == 1 and self.n != 1:
                    continue  # train_passes skips a last batch of one sample (BatchNorm)
                inputs = self._inputs(batch)
                targets = torch.stack([r.y[i] for r, i in zip(self.requests, batch, strict=True)])
                with autocast(self.device, first.precision):
                    logits = batched_forward({**stack.leaves, **self.frozen}, self.buffers, inputs)
                    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction="none").view(self.k, size).mean(dim=1)
                losses.sum().backward()
                self.stack_momentum = self._step(stack, mask, self.stack_momentum)
                self.loss_sums += losses.detach().double() * size
                for stats in self.stats:
                    stats.samples += size
                    stats.steps += 1
        finally:
            for n, p in template.named_parameters():
                p.requires_grad_(saved[n])

    def _use_stack(self, names: list[str]) -> _TrainableStack:
        """The stack of these trainable tensors: the current one if it holds them, else a new one."""
        if self.stack is not None and self.stack.names == names:
            return self.stack
        self._release_stack()
        self.stack = _TrainableStack(names, self.params, self.k)
        self.frozen = {n: torch.stack([p[n].detach() for p in self.params]) for n in self.param_names
                       if n not in names}
        self.stack_momentum = self._stack_momentum(names) if self.optim.momentum else None
        return self.stack

    def _release_stack(self) -> None:
        """The current stack's tensors back into the clients' models, its momentum kept by name
        (a later phase of this call may train these tensors again)."""
        if self.stack is None:
            return
        self.stack.write_back(self.params)
        if self.stack_momentum is not None:
            self.momentum.update(self.stack.blocks(self.stack_momentum))
        self.stack, self.stack_momentum, self.frozen = None, None, {}

    def _inputs(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """(clients, batch, ...) model inputs, each client's augmented by its own generator."""
        transform = self.requests[0].transform
        if isinstance(transform, ImageTransform) and all(r.transform is transform for r in self.requests):
            # one augmentation pass over every client's batch: a few launches instead of a few per client
            return transform.stacked([r.x[i] for r, i in zip(self.requests, batch, strict=True)],
                                     [r.generator for r in self.requests])
        return torch.stack([r.transform(r.x[i], train=True, generator=r.generator)
                            for r, i in zip(self.requests, batch, strict=True)])

    def _stack_masks(self, names: list[str], specs: list[dict[str, torch.Tensor | None]]) -> torch.Tensor | None:
        """The entries each client's step may change, in the stack's flat layout; None: all of them."""
        if all(spec[n] is None for spec in specs for n in names):
            return None
        full = {n: torch.ones_like(self.params[0][n], dtype=torch.bool) for n in names}
        return torch.cat([torch.stack([spec[n] if spec[n] is not None else full[n] for spec in specs]).reshape(-1)
                          for n in names]).to(self.device)

    def _stack_momentum(self, names: list[str]) -> torch.Tensor:
        """The call's momentum of these tensors in the stack's flat layout; zeros where a tensor has
        none yet (its first step then starts it at the direction, as MaskedSGD does)."""
        return torch.cat([self.momentum[n].reshape(-1) if n in self.momentum
                          else torch.zeros(self.k * self.params[0][n].numel(), dtype=self.params[0][n].dtype,
                                           device=self.device) for n in names])

    @torch.no_grad()
    def _step(self, stack: _TrainableStack, mask: torch.Tensor | None,
              momentum: torch.Tensor | None) -> torch.Tensor | None:
        """:class:`fedselect.optim.MaskedSGD`'s step on the whole stack in a few flat operations:
        entries outside a client's mask, and their momentum, do not change; nor does a tensor
        that got no gradient (MaskedSGD skips it)."""
        optim = self.optim
        direction, present = stack.gradients()
        if present is not None:
            mask = present if mask is None else mask & present
        if optim.weight_decay:
            direction = direction.add(stack.flat, alpha=optim.weight_decay)
        if momentum is not None:
            updated = momentum.mul(optim.momentum).add_(direction)
            momentum = updated if mask is None else torch.where(mask, updated, momentum)
            direction = momentum
        update = direction * optim.lr
        stack.flat.sub_(update if mask is None else torch.where(mask, update, 0.0))
        return momentum


class _TrainableStack:
    """A phase's trainable tensors of every client in one flat buffer, tensor after tensor, each a
    contiguous (clients, *shape) block. The blocks are the autograd leaves (no slices in the graph,
    whose backward would write a buffer-sized gradient per tensor); the optimizer updates the whole
    buffer at once."""

    def __init__(self, names: list[str], params: list[dict[str, nn.Parameter]], k: int) -> None:
        self.names = names
        self.shapes = [(k, *params[0][n].shape) for n in names]
        self.sizes = [k * params[0][n].numel() for n in names]
        first = params[0][names[0]]
        self.flat = torch.empty(sum(self.sizes), dtype=first.dtype, device=first.device)
        self.leaves: dict[str, torch.Tensor] = {}
        for name, block in zip(names, self.blocks(self.flat).values(), strict=True):
            torch.stack([p[name].detach() for p in params], out=block)
            self.leaves[name] = block.requires_grad_(True)

    def blocks(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat`` (this stack's layout) as a (clients, *shape) view per tensor name."""
        return {n: part.view(shape) for n, part, shape in
                zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's gradients in the flat layout (each leaf's cleared), and where a tensor got
        none, which entries have one (None: all)."""
        grads = [self.leaves[n].grad for n in self.names]
        for leaf in self.leaves.values():
            leaf.grad = None
        if all(g is not None for g in grads):
            return torch.cat([g.reshape(-1) for g in grads]), None
        present = torch.cat([torch.full((size,), g is not None, device=self.flat.device)
                             for g, size in zip(grads, self.sizes, strict=True)])
        return torch.cat([g.reshape(-1) if g is not None else torch.zeros(size, dtype=self.flat.dtype,
                                                                             device=self.flat.device)
                          for g, size in zip(grads, self.sizes, strict=True)]), present

    @torch.no_grad()
    def write_back(self, params: list[dict[str, nn.Parameter]]) -> None:
        """Each client's trained tensors into its own model."""
        for k, client in enumerate(params):
            torch._foreach_copy_([client[n] for n in self.names], [self.leaves[n].detach()[k] for n in self.names])
