"""What every client and server object of one run shares: the run context, the options, the
checkpoint protocol, and what an algorithm leaves at the end of a run."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedselect.config import ExperimentConfig
from fedselect.cuda_graphs import uses_cuda_graphs
from fedselect.engine import OptimConfig
from fedselect.options import NoOptions

Mask = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


@dataclass
class RunContext:
    """What all client and server objects of one run share."""

    config: ExperimentConfig
    options: Any
    # stored batch -> model input (ImageTransform, or TokenTransform for text)
    transform: Callable[..., torch.Tensor]
    device: torch.device
    # the side of the model's input images, after any resize; None for text
    image_size: int | None = None
    # read-only values every client of the run may share instead of copying (LotteryFL's
    # theta_0), by a key its algorithm owns; filled by the first client built
    shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def cuda_graphs(self) -> bool:
        """``train.cuda_graphs`` resolved for this run's device and input (``auto``: small images on CUDA;
        never with ``train.client_batching``, whose batched passes are not captured)."""
        if self.config.train.client_batching:
            return False
        return uses_cuda_graphs(self.config.train.cuda_graphs, self.device, image_size=self.image_size)

    @property
    def optim(self) -> OptimConfig:
        t = self.config.train
        return OptimConfig(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, batch_size=t.batch_size)


@dataclass
class RunArtifacts:
    """What an algorithm leaves at the end of a run: files (logged to MLflow under their folder's
    path below the run's artifact folder) and fields it adds to the run record."""

    files: list[Path] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


def resolve_options(ctx: RunContext, cls: type) -> Any:
    """The run's validated options, or ``cls``'s defaults where a caller built the context by hand
    (tests); a run validated for another algorithm is a programming error."""
    if ctx.options is None:
        return cls()
    if cls is not NoOptions and not isinstance(ctx.options, cls):
        raise TypeError(f"expected options of type {cls.__name__}, got {type(ctx.options).__name__}")
    return ctx.options


class Checkpointable:
    """What a client or server keeps between rounds, by attribute name (see :mod:`fedselect.runner.checkpoint`).

    Each class lists in ``checkpoint_attributes`` the attributes *it adds* that change between
    rounds; :meth:`checkpoint_fields` collects them over the class hierarchy, so a subclass
    never repeats its parents'. Every other attribute must come out the same when the object is
    built again from the config, the data and the common initialization (a resumed run
    rebuilds everything, then loads these). Values may be tensors, PackedTensor, numpy arrays,
    dataclasses and plain containers of them.
    """

    checkpoint_attributes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def checkpoint_fields(cls) -> list[str]:
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names.extend(n for n in vars(klass).get("checkpoint_attributes", ()) if n not in names)
        return names

    def checkpoint_state(self) -> dict[str, Any]:
        """The between-round state, by name (live references: serialize before the next round)."""
        return {name: getattr(self, name) for name in self.checkpoint_fields()}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`checkpoint_state` returned; the names must match exactly."""
        fields = self.checkpoint_fields()
        missing = [n for n in fields if n not in state]
        unexpected = sorted(set(state) - set(fields))
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__} state does not match its checkpoint_attributes: "
                           f"missing {missing}, unexpected {unexpected}")
        for name in fields:
            setattr(self, name, state[name])
