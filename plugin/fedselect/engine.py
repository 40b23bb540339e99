"""Local training engine shared by every algorithm.

Client datasets here are small (hundreds to a few thousand images), so they live on the
device as uint8 tensors; batches are drawn by index permutation and augmented on the
device. A DataLoader with worker processes would cost more than the training itself.

The optimizer step can be restricted to a boolean mask per parameter tensor
(:class:`fedselect.optim.MaskedSGD`, :func:`fedselect.optim.trainable_only`).

On a GPU nothing here waits for the device inside a pass: losses and counts are summed on the
device and read once per pass (or evaluation), whole-tensor updates run as multi-tensor ops, and
the augmentation's random draws (made on a CPU generator, so CPU and GPU runs augment alike) reach
the device as asynchronous copies. ``train.precision: bf16`` runs forward passes under bf16
autocast (weights, gradients and optimizer state stay fp32); ``train.channels_last`` stores image
batches and convolution weights channels-last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedselect.core import cpu_kernels
from fedselect.cpu_allocator import keep_freed_memory
from fedselect.cuda_graphs import graphed_forward
from fedselect.optim import MaskedSGD, TrainableSpec, mask_coverage, trainable_only
from fedselect.options import ConfigError

# extra loss term added to the cross-entropy, e.g. Ditto's proximal term; gets the model
ExtraLoss = Callable[[nn.Module], torch.Tensor]

# arithmetic of forward passes (config key train.precision)
PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str, *, cache: bool = True) -> AbstractContextManager:
    """bf16 autocast of the forward passes inside the block (``train.precision: bf16``); fp32: nothing.

    ``cache=False`` turns off autocast's cache of cast weights, which CUDA graphs cannot hold.
    """
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)


def configure_device(device: torch.device) -> None:
    """Per-process settings for training on ``device``: cuDNN picks its fastest convolution
    algorithms for the run's fixed shapes (GPU results are not bit-reproducible anyway); on the
    CPU, freed memory stays in the process (:mod:`fedselect.cpu_allocator`; no value changes), and
    ``FEDSELECT_CPU_KERNELS`` is checked before any work (:mod:`fedselect.core.cpu_kernels`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        keep_freed_memory()
        try:
            cpu_kernels.setting()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


@dataclass
class ClientDataset:
    """One client's train and test split, resident on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    def to(self, device: torch.device | str) -> ClientDataset:
        return ClientDataset(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


class ImageTransform:
    """uint8 NCHW batch -> normalized float batch, with optional crop+flip augmentation and resize.

    Augmentation (random crop with ``pad`` pixels of zero padding, horizontal flip) is done on
    the whole batch on its device, driven by an explicit ``torch.Generator`` so that runs are
    reproducible and independent of other clients' random draws.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], *, augment: bool, pad: int = 4,
                 resize: int | None = None, channels_last: bool = False) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad
        # batches are resized on the fly (after augmentation, so crops stay in stored pixels):
        # the stored cache keeps its size and memory
        self.resize = resize
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self._normalize(x)
        if train and self.augment:
            x = self._augment(x, *self._draw(int(x.shape[0]), generator, x.device))
        return self._finish(x)

    def stacked(self, batches: Sequence[torch.Tensor], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``torch.stack([self(x, train=True, generator=g) for x, g in ...])`` in one pass over all
        batches (equal shapes): each generator makes the same draws, in the same order, so the
        values are the same (batched client training, :mod:`fedselect.batched_training`)."""
        x = self._normalize(torch.cat(list(batches)))
        if self.augment:
            draws = [self._draw(int(b.shape[0]), g, x.device) for b, g in zip(batches, generators, strict=True)]
            x = self._augment(x, torch.cat([o for o, _ in draws]), torch.cat([f for _, f in draws]))
        x = self._finish(x)
        return x.view(len(batches), -1, *x.shape[1:])

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return x.float().div_(255.0).sub_(self.mean).div_(self.std)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None and x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _draw(self, n: int, generator: torch.Generator | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets, then flips, of ``n`` images. The random draws happen on the generator's
        device (CPU), then move: identical augmentations on CPU and GPU for the same seed."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator).to(device, non_blocking=True)
        flips = (torch.rand(n, generator=generator) < 0.5).to(device, non_blocking=True)
        return offsets, flips

    def _augment(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        if x.device.type == "cpu":
            # one slice copy per image: on the CPU a third of the batched gather, flip and select
            # below (0.64 against 1.83 ms for 32 CIFAR images), the same values
            out = torch.empty_like(x)
            for i, ((top, left), flip) in enumerate(zip(offsets.tolist(), flips.tolist(), strict=True)):
                crop = padded[i, :, top:top + h, left:left + w]
                out[i] = crop.flip(2) if flip else crop
            return out
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        cropped = padded[batch, chans, rows, cols]
        return torch.where(flips.view(n, 1, 1, 1), cropped.flip(3), cropped)


@dataclass
class TrainStats:
    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")

    def __iadd__(self, other: TrainStats) -> TrainStats:
        self.loss_sum += other.loss_sum
        self.samples += other.samples
        self.steps += other.steps
        return self


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32


@dataclass(frozen=True)
class SplitEpoch:
    """One epoch over the data whose shuffled samples are split, in order, between phases.

    ``phases[i]`` trains on the i-th of ``len(phases)`` near-equal contiguous slices of the
    epoch's sample order (batched within the slice). One epoch of LocalAlt at equal local work
    is ``SplitEpoch((v_spec, u_spec))``: every sample is seen once, by the v phase or the u phase.
    """

    phases: tuple[TrainableSpec | None, ...]


Pass = TrainableSpec | None | SplitEpoch


def train_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: Sequence[Pass], *,
                 optim: OptimConfig, transform: Callable[..., torch.Tensor], generator: torch.Generator,
                 extra_loss: ExtraLoss | None = None, freeze_frozen_norms: bool = False,
                 freeze_norm_stats: bool = False, precision: str = "fp32", cuda_graphs: bool = False) -> TrainStats:
    """One epoch over (x, y) per entry of ``passes``, each updating only its trainable spec.

    All passes share one optimizer (masked momentum, see :class:`MaskedSGD`) and one generator.
    A pass with nothing trainable is skipped without drawing random numbers, so e.g. LocalAlt
    with an empty personal part is exactly plain local SGD. A :class:`SplitEpoch` draws one
    sample order and trains each phase on its slice of it.

    ``freeze_frozen_norms`` puts normalization layers whose parameters are all frozen in this
    pass into eval mode, so their running statistics do not move either: a layer that layer
    selection did not pick then leaves local training bit-identical. ``freeze_norm_stats`` puts
    every normalization layer into eval mode (``train.norm_stats: frozen``). ``precision``: see
    :func:`autocast`. ``cuda_graphs`` replays each pass's forward and backward from CUDA graphs
    (:mod:`fedselect.cuda_graphs`; CUDA tensors only).
    """
    stats = TrainStats()
    n = int(y.shape[0])
    if n == 0:
        return stats
    optimizer = MaskedSGD(lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    was_training = model.training
    # each spec's mask coverage read once per call (epochs repeat the same spec objects)
    coverages: dict[int, dict[str, str]] = {}

    def coverage(spec: TrainableSpec | None) -> dict[str, str]:
        if spec is None:
            return {}
        if id(spec) not in coverages:
            coverages[id(spec)] = mask_coverage({n: torch.as_tensor(m) for n, m in spec.items() if m is not None})
        return coverages[id(spec)]

    for entry in passes:
        phases = entry.phases if isinstance(entry, SplitEpoch) else (entry,)
        if not any(_has_trainable(model, spec, coverage(spec)) for spec in phases):
            continue
        order = torch.randperm(n, generator=generator).to(y.device, non_blocking=True)
        slices = torch.tensor_split(order, len(phases)) if len(phases) > 1 else (order,)
        for spec, idx in zip(phases, slices, strict=True):
            with trainable_only(model, spec, coverage(spec)) as params:
                if not params:
                    continue
                model.train()
                freeze_norms(model, frozen_layers=freeze_frozen_norms, all_layers=freeze_norm_stats)
                # after the modes and requires_grad are set: they are part of a graph's key
                forward = graphed_forward(model) if cuda_graphs else model
                with autocast(x.device, precision, cache=not cuda_graphs):
                    stats += _train_order(model, forward, x, y, idx, params, optimizer, optim.batch_size,
                                          transform, generator, extra_loss, single_ok=n == 1)
                optimizer.zero_grad(params)
    model.train(was_training)
    return stats


def _has_trainable(model: nn.Module, spec: TrainableSpec | None, coverage: Mapping[str, str]) -> bool:
    if spec is None:
        return any(True for _ in model.parameters())
    return any(mask is None for mask in spec.values()) or any(c != "none" for c in coverage.values())


def _train_order(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, order: torch.Tensor,
                 params: list[tuple[str, nn.Parameter, torch.Tensor | None]], optimizer: MaskedSGD,
                 batch_size: int, transform: Callable[..., torch.Tensor], generator: torch.Generator,
                 extra_loss: ExtraLoss | None, *, single_ok: bool) -> TrainStats:
    """SGD steps over ``order`` in batches of ``batch_size`` (the last one may be smaller);
    ``forward`` is ``model`` itself or its graphed replacement.

    The loss sum stays on the device in float64 and is read once at the end: the same sum of
    float64(loss) * batch size, in the same order, as reading it after every step.
    """
    stats = TrainStats()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, int(order.shape[0]), batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() == 1 and not single_ok:
            # a last batch of one sample: BatchNorm cannot normalize it in train mode
            # (1x1 feature maps), and one sample's step is mostly noise; skip it
            continue
        inputs = transform(x[idx], train=True, generator=generator)
        loss = F.cross_entropy(forward(inputs), y[idx])
        total = loss if extra_loss is None else loss + extra_loss(model)
        optimizer.zero_grad(params)
        total.backward()
        optimizer.step(params)
        loss_sum += loss.detach().double() * int(idx.shape[0])
        stats.samples += int(idx.shape[0])
        stats.steps += 1
    stats.loss_sum = float(loss_sum)
    return stats


def norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of the model's BatchNorm layers, by state name (``train.norm_buffers``)."""
    return {f"{prefix}.{name}" if prefix else name: buf
            for prefix, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, buf in module.named_buffers(recurse=False) if buf is not None}


def freeze_norms(model: nn.Module, *, frozen_layers: bool, all_layers: bool) -> None:
    """Put BatchNorm layers into eval mode so their running statistics stay as they are.

    ``all_layers``: every one (``train.norm_stats: frozen``); else, with ``frozen_layers``, those
    whose parameters all have ``requires_grad=False`` in this pass (the BatchNorm rule).
    """
    if not (frozen_layers or all_layers):
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (all_layers or not any(
                p.requires_grad for p in module.parameters(recurse=False))):
            module.eval()


@dataclass(frozen=True)
class EvalResult:
    """Per-sample counts on one client's test split."""

    correct: int
    total: int
    loss_sum: float
    # training sample passes spent adapting the model just before this evaluation (FedBABU)
    adapt_sample_passes: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.total if self.total else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, transform: Callable[..., torch.Tensor],
             batch_size: int = 512, precision: str = "fp32") -> EvalResult:
    """Accuracy counted per sample (not averaged per batch) and summed cross-entropy.

    Counts and the loss sum (float64, per batch in order) stay on the device until the end.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    with autocast(x.device, precision):
        for start in range(0, int(y.shape[0]), batch_size):
            inputs = transform(x[start:start + batch_size], train=False)
            logits = model(inputs)
            target = y[start:start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
            correct += (logits.argmax(dim=1) == target).sum()
    model.train(was_training)
    return EvalResult(correct=int(correct), total=int(y.shape[0]), loss_sum=float(loss_sum))


def client_generator(seed: int, client_id: int, round_idx: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (client, round): independent of which other clients were sampled."""
    gen = torch.Generator()
    gen.manual_seed(((seed * 1_000_003 + client_id) * 10_007 + round_idx) * 31 + stream)
    return gen


@contextmanager
def client_global_rng(seed: int, client_id: int, round_idx: int, device: torch.device | str,
                      stream: int = 0) -> Iterator[None]:
    """Torch's global random state seeded by (seed, client, round) inside the block, restored after.

    Dropout draws from the global generator, not from the batch generator; seeding it per client
    and round makes a client's update independent of which clients trained before it (the
    same in simulation, cross-silo and after a resume).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        state = np.random.SeedSequence([seed, client_id, round_idx, stream, 0xD509]).generate_state(1)
        if device.type == "cpu":
            # the CPU generator alone, as torch.manual_seed seeds it: that call would also queue a lazy
            # seeding of every accelerator type, each recording a formatted stack (0.4 ms per call)
            torch.default_generator.manual_seed(int(state[0]))
        else:
            torch.manual_seed(int(state[0]))
        yield


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; an explicit unavailable cuda device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config key 'device' is {name!r} but CUDA is not available on this machine")
    return device


def snapshot_state(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the named state entries (default: all of them)."""
    state = model.state_dict()
    keys = state.keys() if names is None else names
    return {name: state[name].detach().clone() for name in keys}


def restore_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write a :func:`snapshot_state` back in place, bit for bit."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in saved.items():
            state[name].copy_(value)
