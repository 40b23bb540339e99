"""Opt-in GPU speed options (train.precision, train.channels_last) run and validate on CPU too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedselect.config import ConfigError, load_config_dict
from fedselect.engine import ImageTransform, OptimConfig, evaluate, train_passes
from fedselect.runner.federation import on_device


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 3, (24,), generator=g)


def test_bf16_autocast_trains_and_evaluates_with_fp32_weights() -> None:
    model, (x, y) = _net(), _data()
    transform = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_passes(model, x, y, [None], optim=OptimConfig(lr=0.1, momentum=0.9, batch_size=8),
                         transform=transform, generator=torch.Generator().manual_seed(2), precision="bf16")
    assert stats.samples == 24 and torch.isfinite(torch.tensor(stats.loss_sum))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = evaluate(model, x, y, transform=transform, precision="bf16")
    assert result.total == 24 and 0 <= result.correct <= 24
    with pytest.raises(ValueError, match="precision"):
        evaluate(model, x, y, transform=transform, precision="fp8")


def test_channels_last_layout_for_model_and_batches() -> None:
    config = load_config_dict({"device": "cpu", "train": {"channels_last": True}})
    model = on_device(config, _net(), torch.device("cpu"))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = _data()
    batch = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=False, channels_last=True)(x, train=False)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    reference = _net()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name  # same values, another layout


def test_unknown_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.precision"):
        load_config_dict({"train": {"precision": "fp16"}})
