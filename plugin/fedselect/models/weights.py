"""Loading a state dict into a model: strict on the body, lenient on a head of another class count."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedselect.load_errors import load_failure
from fedselect.models.groups import head_param_names

__all__ = ["load_weights"]

logger = logging.getLogger("fedselect.models")

_WRAPPER_KEYS = ("state_dict", "model")
_BN_COUNTER_SUFFIX = ".num_batches_tracked"


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a ``torch.save``'d state_dict from ``path`` into ``model``, in place.

    The file is read with ``weights_only=True`` (a ``.safetensors`` file with safetensors); a dict
    wrapping the state_dict under
    ``"state_dict"`` or ``"model"`` is unwrapped. Head tensors whose shape differs from the
    model's are dropped (logged) so a checkpoint trained for another class count still provides
    the body. Every other key must match exactly.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is unreadable, or a key is missing, unexpected or of the wrong shape
            (the message names the key and the file).
        TypeError: A value in the state_dict is not a tensor.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types for a non-checkpoint file
        raise ValueError(f"cannot read weights file {file}: {load_failure(exc)}") from None
    _load_state(model, state, f"weights file {file}")


def _unwrap(state: Any, source: str) -> Mapping[str, Any]:
    if isinstance(state, Mapping):
        for wrapper in _WRAPPER_KEYS:
            if isinstance(state.get(wrapper), Mapping):
                return state[wrapper]
        return state
    raise ValueError(f"{source} does not hold a state_dict (got {type(state).__name__})")


def _load_state(model: nn.Module, state: Any, source: str) -> None:
    state = _unwrap(state, source)
    expected = model.state_dict()
    head = set(head_param_names(model))

    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"key {key!r} in {source} is a {type(value).__name__}, not a tensor")
    mismatched = [
        key for key, value in state.items() if key in expected and value.shape != expected[key].shape
    ]
    body_mismatch = [key for key in mismatched if key not in head]
    if body_mismatch:
        key = body_mismatch[0]
        raise ValueError(
            f"shape mismatch for key {key!r} in {source}: file has {tuple(state[key].shape)}, "
            f"model expects {tuple(expected[key].shape)}"
        )

    dropped: set[str] = set()
    if mismatched:
        # A head trained for a different class count cannot be reused; keep its random init
        # rather than refusing the (useful) body.
        dropped = {key for key in state if key in head}
        shapes = ", ".join(
            f"{k} {tuple(state[k].shape)}->{tuple(expected[k].shape)}" for k in sorted(dropped)
        )
        logger.warning("dropping head tensors from %s (shape mismatch: %s)", source, shapes)

    # Checked before loading so a rejected checkpoint leaves the model untouched. Old checkpoints
    # predate BatchNorm's num_batches_tracked buffer; torch itself tolerates its absence.
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(
            f"unexpected key {unexpected[0]!r} in {source} ({len(unexpected)} unexpected in all)"
        )
    missing = [
        k for k in expected if k not in state and k not in dropped and not k.endswith(_BN_COUNTER_SUFFIX)
    ]
    if missing:
        raise ValueError(f"key {missing[0]!r} missing from {source} ({len(missing)} missing in all)")
    model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    scale = getattr(model, "new_head_scale", None)
    if dropped and scale is not None:
        # a new head on a pretrained body starts with small logits (loss about ln C) rather than
        # random logits on large pretrained features; not zero, so the body's gradients (layer
        # selection's scores) are informative from round 0
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name in head:
                params[name].mul_(scale)
