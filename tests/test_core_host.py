"""fedselect.core.host: numpy's counts and comparisons equal PyTorch's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fedselect.core.host import compare, count_true, counts_true

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45, 0.1, -0.1, 3.0, 1e30]


def _values(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    random = torch.randn(5000, generator=g).to(dtype)
    random[::7] = 0.0
    return torch.cat([random, torch.tensor(SPECIAL, dtype=dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("op", ["gt", "ge", "eq", "le", "lt"])
def test_compare_equals_torch_for_numbers_and_0d_tensors(dtype, op) -> None:
    import operator

    fn = getattr(operator, op)
    values = _values(dtype)
    cutoffs = [*SPECIAL, values[3].item(), torch.tensor(0.1, dtype=torch.float64), values[11]]
    for cutoff in cutoffs:
        got = compare(values, op, cutoff)
        assert got.dtype == torch.bool and got.shape == values.shape
        assert torch.equal(got, fn(values, cutoff)), (dtype, op, cutoff)


def test_compare_rounds_the_cutoff_to_the_values_dtype_as_torch_does() -> None:
    values = torch.tensor([0.1], dtype=torch.float32)
    assert not compare(values, "gt", 0.1).item()
    assert not compare(values, "gt", torch.tensor(0.1, dtype=torch.float64)).item()


def test_compare_keeps_torch_where_numpy_cannot_serve() -> None:
    grad = torch.zeros(4, requires_grad=True)
    assert torch.equal(compare(grad, "ge", 0.0), torch.ones(4, dtype=torch.bool))
    half = torch.tensor([0.5, -1.0], dtype=torch.bfloat16)
    assert torch.equal(compare(half, "gt", 0.0), torch.tensor([True, False]))
    ints = torch.tensor([0, 1, 2], dtype=torch.uint8)
    assert torch.equal(compare(ints, "gt", 0.5), ints > 0.5)  # promoted to float, not truncated to 0
    strided = _values(torch.float32)[::3]
    assert torch.equal(compare(strided, "le", 0.0), strided <= 0.0)


def test_counts_equal_count_nonzero() -> None:
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(n, generator=g) < 0.3 for n in (0, 1, 7, 4096, 70007)]
    masks += [masks[-1][::5], masks[-1].reshape(7, 10001).t(), torch.tensor(True), torch.tensor(False)]
    expected = [int(torch.count_nonzero(m)) for m in masks]
    assert counts_true(masks) == expected
    assert [count_true(m) for m in masks] == expected
    assert counts_true([]) == []
    floats = torch.tensor([0.0, -0.0, float("nan"), 2.0])
    assert count_true(floats) == 2 and counts_true([floats, floats > 1]) == [2, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_a_gpu_in_one_read() -> None:
    masks = [torch.rand(1000, device="cuda") < 0.5 for _ in range(3)]
    assert counts_true(masks) == [int(torch.count_nonzero(m)) for m in masks]
    values = torch.randn(1000, device="cuda")
    assert torch.equal(compare(values, "gt", torch.tensor(0.0, device="cuda")), values > 0)
