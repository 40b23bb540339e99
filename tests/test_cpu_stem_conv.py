"""A stem convolution run in channels-last on the CPU gives the standard kernel's bits, and only where
its output goes straight into a max pool (fedselect.cpu_pooling.use_channels_last_stems)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedselect import cpu_pooling
from fedselect.cpu_pooling import (
    ChannelsLastMaxPool2d,
    ChannelsLastStemConv2d,
    use_channels_last_max_pool,
    use_channels_last_stems,
)
from fedselect.models import build_model


def fast_copy(model: nn.Module) -> tuple[nn.Module, int]:
    fast = copy.deepcopy(model)
    use_channels_last_max_pool(fast)
    return fast, use_channels_last_stems(fast)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 32, 32), generator=g)


def test_cnn_stem_evaluates_to_the_same_bits_for_every_batch_shape() -> None:
    torch.manual_seed(0)
    standard = build_model("cnn", 10).eval()
    fast, changed = fast_copy(standard)
    assert changed == 1 and type(fast.conv1) is ChannelsLastStemConv2d and type(fast.conv2) is nn.Conv2d
    assert fast.pool.after_stem and fast.state_dict().keys() == standard.state_dict().keys()
    with torch.no_grad():
        for n, seed in ((200, 1), (200, 2), (7, 3), (1, 4), (7, 5)):  # each shape's first call, then a later one
            x = images(n, seed)
            assert torch.equal(standard(x), fast(x))
    verdicts = fast.conv1._layout_verdicts
    assert set(verdicts) == {(200, 3, 32, 32), (7, 3, 32, 32), (1, 3, 32, 32)}


def test_the_stem_hands_the_pool_channels_last_and_the_pool_hands_on_contiguous() -> None:
    torch.manual_seed(0)
    fast, _ = fast_copy(build_model("cnn", 10))
    x = images(8, 0)
    with torch.no_grad():
        out = fast.conv1(x)
        if fast.conv1._layout_verdicts[(8, 3, 32, 32)]:  # this CPU's kernels agree
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        pooled = fast.pool(out)
        assert pooled.is_contiguous()
        assert torch.equal(pooled, F.max_pool2d(F.conv2d(x, fast.conv1.weight, fast.conv1.bias), 2))


def test_a_shape_whose_bits_differ_keeps_the_standard_convolution(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    standard = build_model("cnn", 10).eval()
    fast, _ = fast_copy(standard)
    monkeypatch.setattr(cpu_pooling, "_same_bits", lambda a, b: False)
    x = images(5, 0)
    with torch.no_grad():
        first = fast.conv1(x)
        again = fast.conv1(x)
        assert torch.equal(fast(x), standard(x))
    assert fast.conv1._layout_verdicts == {(5, 3, 32, 32): False}
    assert first.is_contiguous() and again.is_contiguous()


def test_training_keeps_the_standard_path_and_the_bits() -> None:
    """With autograd on the stem's weights the standard kernel runs; a frozen stem may take the fast one."""
    torch.manual_seed(0)
    standard = build_model("cnn", 10)
    fast, _ = fast_copy(standard)
    x, y = images(6, 1), torch.arange(6) % 10
    for freeze_stem in (False, True):
        for model in (standard, fast):
            model.conv1.requires_grad_(not freeze_stem)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        for p, q in zip(standard.state_dict().values(), fast.state_dict().values(), strict=True):
            assert torch.equal(p, q)
    assert (6, 3, 32, 32) in fast.conv1._layout_verdicts  # the frozen stem took the fast path
    fast.conv1.requires_grad_(True)
    assert fast.conv1(x).is_contiguous()  # autograd wanted: the standard convolution


class ConvThenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))


class SharedConv(nn.Module):
    """The stem is called twice; one call is read by something other than the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)) + self.conv(x)[:, :, ::2, ::2]


class PoolOfSum(nn.Module):
    """The pool is also called on a sum: it must not turn that call's layout into NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)) + self.pool(x + 1)


class ReluBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.pool(self.act(self.conv(x)))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            return self.pool(self.conv(x))
        return self.pool(self.conv(-x))


@pytest.mark.parametrize(("model", "expected"), [
    (ConvThenNorm(), 0), (SharedConv(), 0), (PoolOfSum(), 0), (Untraceable(), 0), (ReluBetween(), 1),
])
def test_only_stems_read_by_nothing_but_a_max_pool_change(model: nn.Module, expected: int) -> None:
    fast, changed = fast_copy(model)
    assert changed == expected
    fast.eval(), model.eval()
    with torch.no_grad():
        for seed in (0, 1):
            x = images(4, seed)
            assert torch.equal(model(x), fast(x))


def test_resnet18_has_no_stem_read_by_a_pool() -> None:
    _, changed = fast_copy(build_model("resnet18", 10))
    assert changed == 0  # its stem convolution feeds BatchNorm first


def test_cpu_runs_get_the_stem_and_channels_last_models_do_not() -> None:
    from fedselect.runner import federation

    def run_model(channels_last: bool) -> nn.Module:
        train = type("T", (), {"cuda_graphs": False, "channels_last": channels_last, "client_batching": False})()
        config = type("C", (), {"train": train, "device": "cpu"})()
        return federation.on_device(config, build_model("cnn", 10), torch.device("cpu"))

    assert type(run_model(False).conv1) is ChannelsLastStemConv2d
    model = run_model(True)
    assert type(model.conv1) is nn.Conv2d and type(model.pool) is ChannelsLastMaxPool2d and not model.pool.after_stem


def test_flop_counts_see_the_standard_convolution_only() -> None:
    """Under a dispatch mode (a FLOP counter) the stem takes the standard path: no second, probing
    convolution on a shape's first call (layer selection's layer costs come from these counts)."""
    from fedselect.models.flops import forward_flops_by_group

    torch.manual_seed(0)
    standard = build_model("cnn", 10, image_size=16)
    fast, changed = fast_copy(standard)
    assert changed == 1
    example = torch.randn(1, 3, 16, 16)
    assert forward_flops_by_group(fast, example) == forward_flops_by_group(standard, example)
    assert not getattr(fast.conv1, "_layout_verdicts", {})  # nothing probed under the counter
