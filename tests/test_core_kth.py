"""The radix selection gives torch.kthvalue's k-th largest value, and so the same top-k masks."""

from __future__ import annotations

import pytest
import torch

from fedselect.core import topk
from fedselect.core.kth import RADIX_MIN_SIZE, kth_largest

N = RADIX_MIN_SIZE + 4099  # large enough for the radix path, odd-sized


def scores(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(N, generator=g)
    if kind == "magnitudes":  # growth scores: |change|, many exact zeros
        return torch.randn(N, generator=g).abs() * (torch.rand(N, generator=g) < 0.4)
    if kind == "few_values":  # heavy ties
        return torch.randint(-3, 4, (N,), generator=g).float()
    if kind == "specials":  # infinities, signed zeros, the smallest subnormals
        return torch.tensor([float("-inf"), float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3.0])[
            torch.randint(0, 7, (N,), generator=g)]
    if kind == "masked":  # the in-place top-k path: non-candidates at -inf
        x = torch.randn(N, generator=g)
        return x.masked_fill(torch.rand(N, generator=g) < 0.4, float("-inf"))
    if kind == "subnormal":
        return torch.randn(N, generator=g) * 1e-40
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "magnitudes", "few_values", "specials", "masked", "subnormal"])
def test_same_value_as_kthvalue_for_every_rank_kind(kind: str) -> None:
    vals = scores(kind, seed=len(kind))
    g = torch.Generator().manual_seed(1)
    for k in [1, 2, N // 3, N // 2, N - 1, N, *torch.randint(1, N + 1, (12,), generator=g).tolist()]:
        expected = torch.kthvalue(vals, N - k + 1).values
        got = kth_largest(vals, k)
        assert got.shape == () and got.dtype == vals.dtype
        assert float(got) == float(expected)  # -0.0 and 0.0 may stand for each other: they compare equal
        assert torch.equal(vals > got, vals > expected) and torch.equal(vals == got, vals == expected)


def test_small_other_and_gradient_tensors_use_kthvalue() -> None:
    for vals in (torch.randn(100), torch.randn(N, dtype=torch.float64), torch.randn(N).requires_grad_()):
        assert torch.equal(kth_largest(vals, 7), torch.kthvalue(vals, vals.numel() - 6).values)
    with pytest.raises(ValueError, match="outside"):
        kth_largest(torch.randn(N), 0)


def test_topk_masks_are_those_of_a_kthvalue_cutoff(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    cases = [(scores(kind, 9), torch.rand(N, generator=g) < frac)
             for kind in ("normal", "magnitudes", "few_values") for frac in (0.3, 0.8)]
    fast = [topk.topk_mask(s, int(w.sum()) // 4, within=w) for s, w in cases]
    monkeypatch.setattr(topk, "kth_largest", lambda vals, k: torch.kthvalue(vals, vals.numel() - k + 1).values)
    for (s, w), mask in zip(cases, fast, strict=True):
        assert torch.equal(mask, topk.topk_mask(s, int(w.sum()) // 4, within=w))
        assert int(mask.sum()) == int(w.sum()) // 4
