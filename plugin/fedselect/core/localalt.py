"""LocalAlt schedule (Pillutla et al. 2022, "Federated learning with partial model personalization").

LocalAlt updates the personal part v and the shared part u of a client's model alternately. This
module only produces the sequence of trainable masks; the caller runs one full pass over its local
data per mask (updating only the True entries), which keeps the schedule testable without a model.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedselect.core.masks import Mask

__all__ = ["EPOCH_MODES", "PHASES", "invert_mask", "localalt_epochs", "localalt_passes", "localalt_phases"]

PHASES = ("personal", "shared")
# how one LocalAlt epoch spends the data: "split" = one pass over the local data, the first half
# of its shuffled samples updating v and the second half u (equal local work: E epochs are E
# passes, as for every other method); "two_passes" = a full pass over v, then a full pass over u
# (the FedSelect authors' code: E epochs are 2E passes)
EPOCH_MODES = ("split", "two_passes")


def invert_mask(mask: Mapping[str, Tensor]) -> Mask:
    """The complementary mask (personal <-> shared): the trainable set of LocalAlt's u-pass.

    Pillutla et al. 2022, Alg. 1 (FedAlt/LocalAlt): the u-update trains exactly the entries that are
    not in v.
    """
    return {k: ~m for k, m in mask.items()}


def localalt_phases(epochs: int, *, order: Sequence[str] = PHASES) -> list[str]:
    """Phase names of the LocalAlt schedule: ``order`` repeated once per epoch.

    Pillutla et al. 2022, Alg. 1: per local epoch, one pass over v (personal), then one over u
    (shared); ``order`` may put "shared" first or name a single phase. Raises ValueError for negative
    ``epochs``, an empty ``order`` or an unknown phase name.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    epochs = int(epochs)
    order = tuple(order)
    if not order:
        raise ValueError("order must name at least one phase")
    for name in order:
        if name not in PHASES:
            raise ValueError(f"unknown LocalAlt phase {name!r}; expected one of {PHASES}")
    return [name for _ in range(epochs) for name in order]


def localalt_passes(
    personal_mask: Mapping[str, Tensor],
    epochs: int,
    *,
    order: Sequence[str] = PHASES,
    skip_empty: bool = False,
) -> list[Mask]:
    """Trainable masks of LocalAlt, one per full pass over the local data (Pillutla et al. 2022, Alg. 1).

    For each of ``epochs`` local epochs and each phase in ``order`` (default: personal then shared,
    as FedSelect's local update), the pass trains ``personal_mask`` ("personal") or its complement
    ("shared"). So ``epochs=5`` gives 10 passes, alternating v, u, v, u, ...

    The list repeats the same two dict objects: treat them as read-only. ``skip_empty`` (not in the
    paper) drops passes with no trainable entry, e.g. the v-pass of a client with an empty mask,
    which would cost a full forward/backward pass for nothing.
    """
    phases = localalt_phases(epochs, order=order)
    personal: Mask = {k: m for k, m in personal_mask.items()}
    for k, m in personal.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"personal_mask tensor {k!r} must be a bool tensor")
    shared = invert_mask(personal)
    by_phase = {"personal": personal, "shared": shared}
    if skip_empty:
        nonempty = {name: any(bool(t.any()) for t in m.values()) for name, m in by_phase.items()}
        phases = [name for name in phases if nonempty[name]]
    return [by_phase[name] for name in phases]


def localalt_epochs(personal_mask: Mapping[str, Tensor], epochs: int, *, mode: str = "split",
                    order: Sequence[str] = PHASES) -> list[tuple[Mask, ...]]:
    """LocalAlt's E local epochs, each as the masks it trains in turn (Pillutla et al. 2022, Alg. 1).

    Every entry is one epoch of local work: ``mode="split"`` gives ``(v, u)`` per epoch, to be
    trained on two halves of one pass over the data (:data:`EPOCH_MODES`); ``"two_passes"``
    gives ``(v,)`` and ``(u,)`` as separate entries, each a full pass (2E entries). Phases with no
    trainable entry are dropped (an empty v costs nothing, and "split" then gives u the whole
    epoch), so LocalAlt with nothing personal is exactly local SGD.
    """
    if mode not in EPOCH_MODES:
        raise ValueError(f"LocalAlt epoch mode must be one of {EPOCH_MODES}, got {mode!r}")
    localalt_phases(epochs, order=order)  # validates epochs and order
    masks = localalt_passes(personal_mask, 1, order=order, skip_empty=True)
    if mode == "two_passes":
        return [(m,) for _ in range(int(epochs)) for m in masks]
    return [tuple(masks) for _ in range(int(epochs))] if masks else []
