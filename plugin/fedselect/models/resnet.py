"""torchvision's ResNet-18 and ResNet-50, unchanged apart from the head (and conv1 for non-RGB inputs).

The architecture is kept exactly as torchvision defines it so that its ImageNet checkpoint loads
key for key (as does any file saved from torchvision's ``resnet18``/``resnet50``, e.g. the
``resnet18-f37072fd.pth`` a torchvision download leaves in torch.hub's cache); on 32x32 inputs
the final feature map is 1x1, which is the usual price of reusing ImageNet weights on CIFAR.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import ResNet, ResNet18_Weights, ResNet50_Weights, resnet18, resnet50

from fedselect.models.groups import GroupSpec, prefix_spec, register_layer_groups

__all__ = ["IMAGENET50_URL", "IMAGENET_URL", "build_resnet18", "build_resnet50", "resnet_group_spec"]

IMAGENET_URL: str = ResNet18_Weights.IMAGENET1K_V1.url
"""torchvision's ResNet18_Weights.IMAGENET1K_V1 checkpoint."""

IMAGENET50_URL: str = ResNet50_Weights.IMAGENET1K_V2.url
"""torchvision's ResNet50_Weights.IMAGENET1K_V2 checkpoint (its default ResNet-50 weights)."""

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def resnet_group_spec(model: nn.Module) -> tuple[GroupSpec, ...]:
    """Groups of any torchvision ResNet: stem (conv1+bn1), one group per residual block, head (fc).

    Computed from the model so that deeper variants (resnet34, resnet50) get their blocks too.
    """
    groups: dict[str, list[str]] = {"stem": ["conv1", "bn1"]}
    for stage in _STAGES:
        for index in range(len(getattr(model, stage))):
            groups[f"{stage}.{index}"] = [f"{stage}.{index}"]
    groups["head"] = ["fc"]
    return prefix_spec(groups)


register_layer_groups(ResNet, resnet_group_spec)


def _build(factory: Callable[..., ResNet], num_classes: int, in_channels: int, image_size: int) -> ResNet:
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same init torchvision applies to every conv, so the replaced stem is not an outlier.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_resnet18(num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """Builder for the ``resnet18`` model name (random init; the caller seeds torch).

    ``image_size`` is accepted for a uniform builder signature; the adaptive pooling makes the
    network size-agnostic. ``in_channels != 3`` swaps conv1 for a freshly initialised one of the
    same geometry, so such a model cannot take the ImageNet conv1 weights.
    """
    return _build(resnet18, num_classes, in_channels, image_size)


def build_resnet50(num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """Builder for the ``resnet50`` model name: as :func:`build_resnet18`, with bottleneck blocks (16 of them)."""
    return _build(resnet50, num_classes, in_channels, image_size)
