"""Models for selective fine-tuning: a name registry, weight loading and layer groups.

``build_model(name, num_classes, ...)`` builds a registered architecture and optionally loads
weights: ``None``/``"none"`` (random init, the caller seeds torch), a local ``torch.save``'d
(or ``.safetensors``) state_dict, or a named pretrained checkpoint such as ``"imagenet"`` for
``resnet18``. Later work adds architectures with :func:`register_model` and declares their layer
groups with :func:`register_layer_groups` without touching this package.

Besides the registered names, two open forms take a user's own model, with layer groups found
from its structure: ``hf`` (any Hugging Face encoder from the local folder ``path``, see
:mod:`fedselect.models.hf`) and ``timm:<name>`` (any timm model, see
:mod:`fedselect.models.timm_models`). :func:`build_model_from_config` builds from a config's
``model`` section; :func:`tokenizer_for` gives a text model's own tokenizer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch
from torch import nn

from fedselect.load_errors import load_failure
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
from fedselect.models.hf import HFEncoderClassifier, build_hf
from fedselect.models.resnet import IMAGENET50_URL, IMAGENET_URL, build_resnet18, build_resnet50
from fedselect.models.text import (
    MiniLMClassifier,
    build_minilm,
    minilm_pretrained_state_dict,
    tokenizer_for,
    tokenizer_path,
)
from fedselect.models.timm_models import PREFIX as TIMM_PREFIX
from fedselect.models.timm_models import build_timm, timm_input_stats
from fedselect.models.weights import _load_state, load_weights
from fedselect.options import ConfigError

__all__ = [
    "CNN",
    "GroupSpec",
    "HFEncoderClassifier",
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
    "build_model_from_config",
    "head_param_names",
    "layer_groups",
    "load_weights",
    "network_available",
    "prefix_spec",
    "pretrained_input_stats",
    "register_layer_groups",
    "register_model",
    "resolve_groups",
    "tokenizer_for",
    "tokenizer_path",
]

CONNECT_TIMEOUT_S = 3.0
"""How long the connectivity probe waits before declaring the machine offline."""



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
    trained on (x - 0.5) / 0.5 fed (x - 0.48) / 0.25 sees inputs at twice its scale. A
    ``timm:<name>`` model with a weights file takes timm's statistics for that architecture (what
    timm-trained checkpoints expect).
    """
    if _timm_name(name) is not None:
        random = weights is None or str(weights).strip().lower() == "none"
        return None if random else timm_input_stats(_timm_name(name) or "")
    registration = _MODELS.get(name.strip().lower())
    if weights is None or registration is None:
        return None
    return registration.input_stats.get(str(weights).strip().lower())


def _timm_name(name: str) -> str | None:
    """``NAME`` of ``timm:NAME`` (prefix case-insensitive), else None."""
    stripped = name.strip()
    return stripped[len(TIMM_PREFIX):].strip() if stripped.lower().startswith(TIMM_PREFIX) else None


def accepted_models() -> str:
    """What ``model.name`` accepts, for error messages."""
    return f"{', '.join(available_models())}, hf (with model.path) or {TIMM_PREFIX}<name> (any timm model)"


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
    path: str | os.PathLike[str] | None = None,
    pooling: str | None = None,
) -> nn.Module:
    """Build a registered model, ``hf`` or ``timm:<name>``, and optionally load weights into it.

    Args:
        name: One of :func:`available_models` (case-insensitive), ``hf`` or ``timm:<name>``.
        num_classes: Output width of the head.
        in_channels: Input image channels.
        image_size: Input side length (square images).
        weights: ``None`` or ``"none"`` for random init; a named checkpoint the model registered
            (``"imagenet"`` for ``resnet18``); otherwise a path to a local state_dict file (see
            :func:`load_weights`). Head tensors whose shape does not fit ``num_classes`` are
            dropped, and the head keeps its random init. For ``hf``, ``None`` and ``"pretrained"``
            load the folder's own weights.
        path: ``hf`` only: the Hugging Face folder.
        pooling: ``hf`` only: ``"mean"`` (default) or ``"cls"``.

    Raises:
        ConfigError: Unknown model name (a ValueError naming ``model.name``), a bad ``hf`` folder,
            or ``path``/``pooling`` given for a model other than ``hf``.
        ValueError: Invalid sizes, a named checkpoint the model does not offer, or a weights file
            that does not match the model.
        FileNotFoundError: ``weights`` is a path that does not exist.
        WeightsUnavailableError: Named weights could not be obtained (e.g. offline).
    """
    for label, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    key = name.strip().lower()
    for option, given in (("path", path), ("pooling", pooling)):
        if given is not None and key != "hf":
            raise ConfigError(f"config key 'model.{option}' is only used by model.name hf, not {name!r}")
    label = None if weights is None else str(weights).strip().lower()
    named: Mapping[str, PretrainedSource] = {}
    keep = {"none"}  # weights labels that leave the model as built
    if key == "hf":
        model = build_hf(num_classes, path=path, pooling=pooling, weights=weights)
        keep.add("pretrained")
    elif _timm_name(name) is not None:
        model = build_timm(_timm_name(name) or "", num_classes, in_channels=in_channels, image_size=image_size)
    elif key in _MODELS:
        model = _MODELS[key].builder(num_classes, in_channels=in_channels, image_size=image_size)
        named = _MODELS[key].pretrained
    else:
        raise ConfigError(f"config key 'model.name' unknown model {name!r}; available models: {accepted_models()}")
    if label is None or label in keep:
        return model
    if label in named:
        source = named[label]
        description = f"{key} {label!r} weights"
        state = _fetch_url(source, description) if isinstance(source, str) else source()
        _load_state(model, state, description)
        return model
    offered = {n for registration in _MODELS.values() for n in registration.pretrained} | {"pretrained"}
    if label in offered and not Path(str(weights)).expanduser().exists():
        raise ValueError(
            f"model {key!r} has no {label!r} weights; it accepts: "
            f"{', '.join(sorted({*keep, *named}))} or a local state_dict path"
        )
    load_weights(model, str(weights))
    return model


def build_model_from_config(model_config: Any, num_classes: int, *, in_channels: int = 3,
                            image_size: int = 32) -> nn.Module:
    """:func:`build_model` for a config's ``model`` section (a :class:`fedselect.config.ModelConfig`)."""
    return build_model(model_config.name, num_classes, in_channels=in_channels, image_size=image_size,
                       weights=model_config.weights, path=getattr(model_config, "path", None),
                       pooling=getattr(model_config, "pooling", None))


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
        raise WeightsUnavailableError(f"cannot obtain {description} from {url}: {load_failure(exc)}; {advice}") from exc


register_model("cnn", build_cnn)
register_model("resnet18", build_resnet18, pretrained={"imagenet": IMAGENET_URL},
               input_stats={"imagenet": IMAGENET_STATS})
register_model("resnet50", build_resnet50, pretrained={"imagenet": IMAGENET50_URL},
               input_stats={"imagenet": IMAGENET_STATS})
# both load from files inside installed PyPI packages: no network, ever
register_model("efficientnet_lite0", build_efficientnet_lite0, pretrained={"imagenet": imagenet_state_dict},
               input_stats={"imagenet": INCEPTION_STATS})
register_model("minilm", build_minilm, pretrained={"pretrained": minilm_pretrained_state_dict})
