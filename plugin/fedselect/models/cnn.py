"""The small two-conv CNN of FedAvg-style CIFAR/MNIST experiments (McMahan et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedselect.models.groups import prefix_spec, register_layer_groups

__all__ = ["CNN", "build_cnn"]

_KERNEL = 5
_MIN_IMAGE_SIZE = 16


def _feature_size(image_size: int) -> int:
    """Spatial side after two (valid 5x5 conv -> 2x2 max-pool) stages."""
    side = image_size
    for _ in range(2):
        side = (side - _KERNEL + 1) // 2
    return side


class CNN(nn.Module):
    """conv(in,32,5)-pool2-ReLU, conv(32,64,5)-pool2-ReLU, fc(.,512)-ReLU, head(512,num_classes).

    The first linear layer's width is computed from ``image_size`` (64*5*5 for 32x32, 64*4*4 for
    28x28), so the same class serves CIFAR and MNIST.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if image_size < _MIN_IMAGE_SIZE:
            raise ValueError(f"cnn needs image_size >= {_MIN_IMAGE_SIZE}, got {image_size}")
        side = _feature_size(image_size)
        self.conv1 = nn.Conv2d(in_channels, 32, _KERNEL)
        self.conv2 = nn.Conv2d(32, 64, _KERNEL)
        self.fc1 = nn.Linear(64 * side * side, 512)
        self.head = nn.Linear(512, num_classes)
        # a module (not F.max_pool2d) so that the runner can give CPU runs the exact faster kernel
        # (fedselect.cpu_pooling); it has no parameters, so the state dict is the same
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        # ReLU after the pooling, on a quarter of the entries: the same values and gradients as
        # ReLU before it (both are monotone, and the pool picks the same entry; tests/test_cpu_pooling.py)
        x = F.relu(self.pool(self.conv1(x)))
        x = F.relu(self.pool(self.conv2(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.head(x)


register_layer_groups(
    CNN,
    prefix_spec({"conv1": "conv1", "conv2": "conv2", "fc1": "fc1", "head": "head"}),
)


def build_cnn(num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> CNN:
    """Builder for the ``cnn`` model name (random init; the caller seeds torch)."""
    return CNN(num_classes, in_channels=in_channels, image_size=image_size)
