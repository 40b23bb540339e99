"""Models for selective fine-tuning: a name registry, weight loading and layer groups.

``build_model(name, num_classes, ...)`` builds a registered architecture and optionally loads
weights: ``None``/``"none"`` (random init, the caller seeds torch), a local ``torch.save``'d
state_dict, or a named pretrained checkpoint such as ``"imagenet"`` for ``resnet18``. Later work
adds architectures with :func:`register_model` and declares their layer groups with
:func:`register_layer_groups` without touching this package.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch
from torch import nn

from fedselect.models.cnn import CNN, build_cnn
from fedselect.models.efficientnet import build_efficientnet_lite0, imagenet_state_dict
from fedselect.models.groups import (
    GroupSpec,
    LayerGroup,
    body_param_names,
    head_param_names,
    layer_groups,
    prefix_spec,
    register_layer_groups,
    resolve_groups,
)
from fedselect.models.resnet import IMAGENET_URL, build_resnet18
from fedselect.models.text import MiniLMClassifier, build_minilm, minilm_pretrained_state_dict

__all__ = [
    "CNN",
    "GroupSpec",
    "IMAGENET_STATS",
    "INCEPTION_STATS",
    "InputStats",
    "LayerGroup",
    "MiniLMClassifier",
    "ModelBuilder",
    "PretrainedSource",
    "WeightsUnavailableError",
    "available_models",
    "body_param_names",
    "build_model",
    "head_param_names",
    "layer_groups",
    "load_weights",
    "network_available",
    "prefix_spec",
    "pretrained_input_stats",
    "register_layer_groups",
    "register_model",
    "resolve_groups",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
"""How long the connectivity probe waits before declaring the machine offline."""

_WRAPPER_KEYS = ("state_dict", "model")
_BN_COUNTER_SUFFIX = ".num_batches_tracked"


class WeightsUnavailableError(RuntimeError):
    """Named pretrained weights could not be obtained (offline, or the download failed)."""


class ModelBuilder(Protocol):
    """Signature of a model builder given to :func:`register_model`."""

    def __call__(self, num_classes: int, *, in_channels: int, image_size: int) -> nn.Module:
        """Return a randomly initialised model (the caller seeds torch)."""
        ...


PretrainedSource = str | Callable[[], Mapping[str, Any]]
"""A checkpoint URL (fetched through torch.hub's cache), or a callable returning a state_dict.

A callable is responsible for its own failures and should raise :class:`WeightsUnavailableError`
when the weights cannot be obtained.
"""

InputStats = tuple[tuple[float, ...], tuple[float, ...]]
"""Per-channel (mean, std) that inputs are normalized with, for images scaled to [0, 1]."""


@dataclass(frozen=True)
class _Registration:
    builder: ModelBuilder
    # named weights (lower-case name -> source) and the input normalization some of them expect
    pretrained: dict[str, PretrainedSource]
    input_stats: dict[str, InputStats]


_MODELS: dict[str, _Registration] = {}

IMAGENET_STATS: InputStats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""torchvision's ImageNet normalization."""

INCEPTION_STATS: InputStats = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
"""TensorFlow's (x - 127.5) / 127.5, which Google's EfficientNet-Lite checkpoints were trained with."""


def register_model(
    name: str,
    builder: ModelBuilder,
    *,
    pretrained: Mapping[str, PretrainedSource] | None = None,
    input_stats: Mapping[str, InputStats] | None = None,
    replace: bool = False,
) -> None:
    """Make ``builder`` available to :func:`build_model` under ``name`` (case-insensitive).

    Args:
        name: Model name, e.g. ``"efficientnet_lite0"``.
        builder: ``builder(num_classes, *, in_channels, image_size) -> nn.Module``. The model's
            class (or its ``fedselect_arch`` attribute) must have layer groups registered with
            :func:`register_layer_groups` for head-aware weight loading and selective fine-tuning.
        pretrained: Named weights the model accepts, e.g. ``{"imagenet": url}``; names are
            case-insensitive and must not be ``"none"``.
        input_stats: For named weights, the input normalization they were trained with
            (see :func:`pretrained_input_stats`).
        replace: Allow overriding an existing registration.

    Raises:
        ValueError: ``name`` is already registered and ``replace`` is false, or a bad weights name.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("model name must be non-empty")
    if key in _MODELS and not replace:
        raise ValueError(f"model {key!r} is already registered (pass replace=True to override)")
    named = {k.strip().lower(): v for k, v in (pretrained or {}).items()}
    if "none" in named:
        raise ValueError("'none' is reserved for random initialisation")
    stats = {k.strip().lower(): v for k, v in (input_stats or {}).items()}
    if set(stats) - set(named):
        raise ValueError(f"input_stats for weights the model does not offer: {sorted(set(stats) - set(named))}")
    _MODELS[key] = _Registration(builder, named, stats)


def pretrained_input_stats(name: str, weights: str | os.PathLike[str] | None) -> InputStats | None:
    """The (mean, std) the named ``weights`` of model ``name`` expect their inputs normalized with.

    ``None`` for random init, a weights file, or named weights registered without stats: the
    data's own statistics are used then. Pretrained features are sensitive to this: a checkpoint
    trained on (x - 0.5) / 0.5 fed (x - 0.48) / 0.25 sees inputs at twice its scale.
    """
    registration = _MODELS.get(name.strip().lower())
    if weights is None or registration is None:
        return None
    return registration.input_stats.get(str(weights).strip().lower())


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def network_available(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def build_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a registered model and optionally load weights into it.

    Args:
        name: One of :func:`available_models` (case-insensitive).
        num_classes: Output width of the head.
        in_channels: Input image channels.
        image_size: Input side length (square images).
        weights: ``None`` or ``"none"`` for random init; a named checkpoint the model registered
            (``"imagenet"`` for ``resnet18``); otherwise a path to a local state_dict file (see
            :func:`load_weights`). Head tensors whose shape does not fit ``num_classes`` are
            dropped, and the head keeps its random init.

    Raises:
        ValueError: Unknown model name, invalid sizes, a named checkpoint the model does not
            offer, or a weights file that does not match the model.
        FileNotFoundError: ``weights`` is a path that does not exist.
        WeightsUnavailableError: Named weights could not be obtained (e.g. offline).
    """
    key = name.strip().lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    for label, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    builder, named = _MODELS[key].builder, _MODELS[key].pretrained
    model = builder(num_classes, in_channels=in_channels, image_size=image_size)

    if weights is None:
        return model
    label = str(weights).strip().lower()
    if label == "none":
        return model
    if label in named:
        source = named[label]
        description = f"{key} {label!r} weights"
        state = _fetch_url(source, description) if isinstance(source, str) else source()
        _load_state(model, state, description)
        return model
    offered = {n for registration in _MODELS.values() for n in registration.pretrained}
    if label in offered and not Path(weights).exists():
        raise ValueError(
            f"model {key!r} has no {label!r} weights; it accepts: "
            f"{', '.join(['none', *sorted(named)])} or a local state_dict path"
        )
    load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a ``torch.save``'d state_dict from ``path`` into ``model``, in place.

    The file is read with ``weights_only=True``; a dict wrapping the state_dict under
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
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types for a non-checkpoint file
        raise ValueError(f"cannot read weights file {file}: {exc}") from exc
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


def _fetch_url(url: str, description: str) -> Mapping[str, Any]:
    """Fetch a checkpoint through torch.hub's cache, probing connectivity before any download."""
    advice = "pass the path of a local state_dict file as weights instead"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file():
        host = urlparse(url).hostname or ""
        if not network_available(host):
            raise WeightsUnavailableError(
                f"cannot download {description}: {host} is unreachable (offline?); {advice}"
            )
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # network, hash and unpickling failures all mean "not available"
        raise WeightsUnavailableError(f"cannot obtain {description} from {url}: {exc}; {advice}") from exc


register_model("cnn", build_cnn)
register_model("resnet18", build_resnet18, pretrained={"imagenet": IMAGENET_URL},
               input_stats={"imagenet": IMAGENET_STATS})
# both load from files inside installed PyPI packages: no network, ever
register_model("efficientnet_lite0", build_efficientnet_lite0, pretrained={"imagenet": imagenet_state_dict},
               input_stats={"imagenet": INCEPTION_STATS})
register_model("minilm", build_minilm, pretrained={"pretrained": minilm_pretrained_state_dict})
