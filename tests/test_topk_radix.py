"""The GPU's selection by counting (fedselect.core.topk_radix) chooses exactly what topk_mask chooses."""

from __future__ import annotations

import pytest
import torch

from fedselect.core import topk_radix
from fedselect.core.topk import TOPK_METHODS, topk_mask, topk_masks


def _select(scores: dict[str, torch.Tensor], ks: dict[str, int], within: dict[str, torch.Tensor],
            method: str) -> dict[str, torch.Tensor]:
    return topk_masks(list(scores), scores.__getitem__, ks, within, method=method)


def _assert_all_methods_agree(scores: dict[str, torch.Tensor], ks: dict[str, int],
                              within: dict[str, torch.Tensor]) -> None:
    expected = {n: topk_mask(scores[n], ks[n], within=within[n]) for n in scores}
    for method in ("per_tensor", "radix", "segmented"):
        chosen = _select(scores, ks, within, method)
        for name in scores:
            assert torch.equal(chosen[name], expected[name]), (method, name)
            assert int(chosen[name].sum()) == ks[name]


def _awkward_scores(g: torch.Generator, n: int) -> torch.Tensor:
    """Ties, both zeros, both infinities, negatives, subnormals and values that share upper bits."""
    pick = torch.randint(0, 6, (n,), generator=g)
    values = torch.randn(n, generator=g)
    values = torch.where(pick == 0, torch.randint(-2, 3, (n,), generator=g).float(), values)
    values = torch.where(pick == 1, 1.0 + torch.randint(0, 40, (n,), generator=g) * 2.0**-20, values)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38])
    return torch.where(pick == 2, specials[torch.randint(0, 8, (n,), generator=g)], values)


@pytest.mark.parametrize("seed", range(6))
def test_radix_equals_the_per_tensor_selection_on_awkward_scores(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (17, 9), "b": (300,), "c": (3, 4, 5), "d": (70_000,), "e": (1,), "none": (0,)}
    scores = {n: _awkward_scores(g, int(torch.Size(s).numel())).reshape(s) for n, s in shapes.items()}
    within = {n: torch.rand(s, generator=g) < (0.3 + 0.1 * seed) for n, s in shapes.items()}
    counts = {n: int(m.sum()) for n, m in within.items()}
    ks = {n: int(torch.randint(0, c + 1, (), generator=g)) if c else 0 for n, c in counts.items()}
    ks["a"] = counts["a"]  # every candidate
    ks["c"] = 0
    _assert_all_methods_agree(scores, ks, within)


def test_radix_with_every_entry_a_candidate_and_all_tied() -> None:
    scores = {"flat": torch.zeros(1000), "ties": torch.full((50, 20), -2.5)}
    within = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in scores.items()}
    for k in (1, 499, 999):
        _assert_all_methods_agree(scores, {"flat": k, "ties": k}, within)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.float64])
def test_radix_takes_scores_float32_holds_and_sorts_the_others(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(400, generator=g) * 4
    scores = {"w": (raw > 0) if dtype == torch.bool else raw.abs().to(dtype)}
    within = {"w": torch.rand(400, generator=g) < 0.7}
    assert topk_radix.applies(list(scores.values())) == (dtype != torch.float64)
    _assert_all_methods_agree(scores, {"w": int(within["w"].sum()) // 3}, within)


def test_radix_refuses_nan_candidates_and_impossible_counts() -> None:
    scores = {"w": torch.tensor([1.0, float("nan"), 3.0])}
    with pytest.raises(ValueError, match="NaN"):
        _select(scores, {"w": 1}, {"w": torch.tensor([True, True, False])}, "radix")
    # NaN outside the candidates has no say
    chosen = _select(scores, {"w": 1}, {"w": torch.tensor([True, False, True])}, "radix")
    assert chosen["w"].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="outside"):
        _select(scores, {"w": 3}, {"w": torch.tensor([True, False, True])}, "radix")


def test_topk_masks_names_its_methods() -> None:
    assert TOPK_METHODS == ("auto", "per_tensor", "radix", "segmented")
    with pytest.raises(ValueError, match="method"):
        _select({"w": torch.ones(3)}, {"w": 1}, {"w": torch.ones(3, dtype=torch.bool)}, "sorted")


def test_radix_ties_negative_zero_with_zero() -> None:
    """-0.0 == 0.0: the first zeros in index order are chosen, whatever their sign."""
    scores = {"w": torch.tensor([-0.0, 0.0, -0.0, 0.0, 1.0, -1.0])}
    within = {"w": torch.ones(6, dtype=torch.bool)}
    for k in (2, 3, 4):
        _assert_all_methods_agree(scores, {"w": k}, within)
    assert _select(scores, {"w": 2}, within, "radix")["w"].tolist() == [True, False, False, False, True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_radix_on_the_gpu_chooses_the_hosts_entries() -> None:
    """auto on CUDA is radix; its choice equals the CPU's per-tensor selection."""
    g = torch.Generator().manual_seed(9)
    shapes = {"a": (64, 3, 3, 3), "b": (100_000,), "c": (10,)}
    scores = {n: _awkward_scores(g, int(torch.Size(s).numel())).reshape(s) for n, s in shapes.items()}
    within = {n: torch.rand(s, generator=g) < 0.6 for n, s in shapes.items()}
    ks = {n: int(m.sum()) // 3 for n, m in within.items()}
    on_host = _select(scores, ks, within, "per_tensor")
    on_gpu = _select({n: s.cuda() for n, s in scores.items()}, ks, {n: m.cuda() for n, m in within.items()}, "auto")
    for name in shapes:
        assert on_gpu[name].is_cuda and torch.equal(on_gpu[name].cpu(), on_host[name]), name
