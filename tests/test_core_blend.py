"""where_fill: torch.where(mask, values, fill) bit for bit, NaN, infinities and signed zeros included."""

from __future__ import annotations

import pytest
import torch

from fedselect.core.blend import selection_bits, where_fill, where_fill_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fill", [0.0, -0.0, float("-inf"), 1.5])
def test_same_bits_as_torch_where(dtype: torch.dtype, fill: float) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, 11, generator=g).to(dtype)
    flat = values.view(-1)
    flat[::7], flat[1::11], flat[2::13], flat[3::17] = float("nan"), float("-inf"), -0.0, float("inf")
    mask = torch.rand(5, 7, 11, generator=g) < 0.5
    before = values.clone()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    expected = torch.where(mask, values, fill)
    for bits in (None, selection_bits(mask, dtype)):
        got = where_fill(mask, values, fill, bits=bits)
        assert got.dtype == dtype and torch.equal(got.view(ints), expected.view(ints))
    assert torch.equal(values.view(ints), before.view(ints))  # the input is left as it was
    for bits in (None, selection_bits(mask, dtype)):  # in place, on a copy the caller owns
        own = values.clone()
        assert where_fill_(own, mask, fill, bits=bits) is own and torch.equal(own.view(ints), expected.view(ints))


def test_broadcast_masks_and_other_dtypes_use_torch_where() -> None:
    values = torch.arange(6, dtype=torch.float32).view(2, 3)
    row = torch.tensor([True, False, True])
    assert torch.equal(where_fill(row, values), torch.where(row, values, 0.0))
    ints = torch.arange(6).view(2, 3)
    assert torch.equal(where_fill(row.expand(2, 3), ints), torch.where(row, ints, 0))
    assert torch.equal(where_fill_(ints.clone(), row.expand(2, 3)), torch.where(row, ints, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_select_into_equals_copy_of_torch_where(dtype: torch.dtype) -> None:
    from fedselect.core.blend import select_into_

    g = torch.Generator().manual_seed(1)
    target = torch.randn(64, 9, generator=g).to(dtype)
    values = torch.randn(64, 9, generator=g).to(dtype)
    values.view(-1)[::5], target.view(-1)[::3] = float("nan"), -0.0
    mask = torch.rand(64, 9, generator=g) < 0.4
    expected = target.clone().copy_(torch.where(mask, values, target))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[target.element_size()]
    for bits in (None, selection_bits(mask, dtype)):
        got = target.clone()
        assert select_into_(got, mask, values, bits=bits) is got
        assert torch.equal(got.view(ints), expected.view(ints))
