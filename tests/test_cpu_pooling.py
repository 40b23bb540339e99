"""Channels-last max pooling on the CPU gives the standard kernel's bits, forward and backward."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedselect.cpu_pooling import ChannelsLastMaxPool2d, use_channels_last_max_pool
from fedselect.models import build_model

GEOMETRIES = [  # kernel, stride, padding, dilation, ceil_mode
    (2, None, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    (2, 1, 0, 1, False),
    ((2, 3), (1, 2), (1, 0), (2, 1), True),
]


def tie_heavy_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ReLU-like values rounded to one decimal: most windows hold ties, many of them zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g)).round(decimals=1)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode"), GEOMETRIES)
def test_same_bits_forward_and_backward(kernel, stride, padding, dilation, ceil_mode) -> None:
    standard = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    fast = copy.deepcopy(standard)
    assert use_channels_last_max_pool(fast) == 1
    x = tie_heavy_input((3, 5, 11, 9), seed=0)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 4, 4] = float("-inf")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = standard(a), fast(b)
    assert out_b.is_contiguous()
    assert torch.equal(out_a.nan_to_num(), out_b.nan_to_num()) and torch.equal(out_a.isnan(), out_b.isnan())
    grad = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(1))
    out_a.backward(grad)
    out_b.backward(grad)
    assert torch.equal(a.grad, b.grad)
    with torch.no_grad():
        assert torch.equal(standard(x).nan_to_num(), fast(x).nan_to_num())


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_models_train_and_evaluate_to_the_same_bits(name: str) -> None:
    torch.manual_seed(0)
    standard = build_model(name, 10)
    fast = copy.deepcopy(standard)
    assert use_channels_last_max_pool(fast) >= 1
    assert fast.state_dict().keys() == standard.state_dict().keys()
    x, y = tie_heavy_input((6, 3, 32, 32), seed=2), torch.arange(6) % 10
    for model in (standard, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in itertools.zip_longest(standard.state_dict().values(), fast.state_dict().values()):
        assert torch.equal(p, q)
    standard.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(standard(x), fast(x))


def test_only_plain_max_pools_change_and_other_layouts_pass_through() -> None:
    class Custom(nn.MaxPool2d):
        pass

    model = nn.Sequential(nn.MaxPool2d(2), Custom(2), nn.AvgPool2d(2), nn.MaxPool2d(2, return_indices=True))
    assert use_channels_last_max_pool(model) == 2
    assert [type(m) for m in model] == [ChannelsLastMaxPool2d, Custom, nn.AvgPool2d, ChannelsLastMaxPool2d]
    pool = model[3]
    out, indices = pool(torch.randn(1, 2, 4, 4))  # indices wanted: the standard kernel
    assert out.shape == indices.shape == (1, 2, 2, 2)
    channels_last = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    assert torch.equal(model[0](channels_last), F.max_pool2d(channels_last, 2))
    assert torch.equal(model[0](torch.ones(3, 6, 6)), torch.ones(3, 3, 3))  # unbatched: standard kernel


def test_cnn_pools_before_its_relu_with_the_bits_of_relu_first() -> None:
    """models.cnn applies ReLU after the pooling (cheaper): same values and gradients as the usual order."""
    torch.manual_seed(0)
    model = build_model("cnn", 10)
    reference = copy.deepcopy(model)

    def relu_first(x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(reference.conv1(x)), 2)
        x = F.max_pool2d(F.relu(reference.conv2(x)), 2)
        return reference.head(F.relu(reference.fc1(torch.flatten(x, 1))))

    x, y = tie_heavy_input((6, 3, 32, 32), seed=3) - 0.3, torch.arange(6) % 10
    for forward, params in ((model, model.parameters()), (relu_first, reference.parameters())):
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
    for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q)
