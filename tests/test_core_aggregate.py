"""Tests for fedselect.core.aggregate: masked averaging."""

from __future__ import annotations

import math

import pytest
import torch

from fedselect.core.aggregate import masked_average
from fedselect.core.masks import empty_mask


def _states(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(6, 5, generator=g).to(dtype),
            "b": torch.randn(7, generator=g).to(dtype),
        }
        for _ in range(n)
    ]


def _fedml_average(states: list[dict[str, torch.Tensor]], counts: list[float]) -> dict[str, torch.Tensor]:
    """FedML's torch_aggregator FedAvg formula, written out: sum_k x_k * (n_k / N) in the tensor's dtype."""
    total = 0
    for c in counts:
        total += c
    out: dict[str, torch.Tensor] = {}
    for k in states[0]:
        for i, (c, s) in enumerate(zip(counts, states, strict=True)):
            w = c / total
            out[k] = s[k] * w if i == 0 else out[k] + s[k] * w
    return out


def _float64_mean(states: list[dict[str, torch.Tensor]], counts: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean formed in float64 and rounded once to the tensor's dtype."""
    total = sum(counts)
    return {k: (sum(s[k].double() * c for s, c in zip(states, counts, strict=True)) / total).to(states[0][k].dtype)
            for k in states[0]}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_empty_masks_give_the_float64_weighted_mean_rounded_once(dtype: torch.dtype) -> None:
    states = _states(5, dtype=dtype)
    counts = [20.0, 35.0, 1.0, 100.0, 7.0]
    masks = [empty_mask(s) for s in states]
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    new, gmask = masked_average(glob, states, masks, counts)
    ref = _float64_mean(states, counts)
    fedml = _fedml_average(states, counts)
    for k in ref:
        assert new[k].dtype == dtype
        # exact products, float64 sums, one rounding: bit for bit the float64 mean
        assert torch.equal(_bits(new[k]), _bits(ref[k])), k
        # and FedML's FedAvg (rounded once per client) to within its own rounding error
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        assert torch.allclose(new[k].double(), fedml[k].double(), rtol=tol, atol=tol), k
        assert not gmask[k].any()
    # Uniform (weights=None) is the same formula with every count 1.
    new_u, _ = masked_average(glob, states, [None] * 5)
    ref_u = _float64_mean(states, [1.0] * 5)
    for k in ref_u:
        assert torch.equal(_bits(new_u[k]), _bits(ref_u[k]))


def test_float64_tensors_average_to_within_rounding() -> None:
    states = _states(5, dtype=torch.float64)
    counts = [20.0, 35.0, 1.0, 100.0, 7.0]
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    new, _ = masked_average(glob, states, [None] * 5, counts)
    for k, ref in _fedml_average(states, counts).items():
        assert torch.allclose(new[k], ref, rtol=1e-14, atol=1e-15), k


def test_negative_zero_survives() -> None:
    glob = {"w": torch.ones(2)}
    states = [{"w": torch.tensor([-0.0, 1.0])}]
    new, _ = masked_average(glob, states, [None], [3.0])
    assert math.copysign(1.0, new["w"][0].item()) == -1.0


def test_each_entry_averaged_over_sharing_clients_only() -> None:
    glob = {"w": torch.full((4,), 100.0)}
    states = [{"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"w": torch.tensor([10.0, 20.0, 30.0, 40.0])}]
    masks = [
        {"w": torch.tensor([False, True, False, True])},
        {"w": torch.tensor([False, False, True, True])},
    ]
    new, gmask = masked_average(glob, states, masks, [1.0, 3.0])
    # entry 0: both share -> (1*1 + 3*10)/4; entry 1: only client 1; entry 2: only client 0;
    # entry 3: personal everywhere -> global value kept.
    assert new["w"].tolist() == pytest.approx([31 / 4, 20.0, 3.0, 100.0])
    assert gmask["w"].tolist() == [False, True, True, True]
    new_u, _ = masked_average(glob, states, masks)
    assert new_u["w"].tolist() == pytest.approx([5.5, 20.0, 3.0, 100.0])


@pytest.mark.parametrize("weights", [[3.0, 5.0, 7.0, 11.0], [3.0, 2.5, 7.0, 11.0], [2.0**29 - 1] * 4 + [5.0],
                                     [0.25, 3.0, 5.0, 1.0]])
def test_entry_weights_counted_in_int32_or_float64_give_the_float64_mean(weights: list[float]) -> None:
    # whole-number weights are counted in int32 until one is fractional or their sum would pass 2**31
    g = torch.Generator().manual_seed(3)
    glob = {"w": torch.randn(257, generator=g)}
    states = [{"w": torch.randn(257, generator=g)} for _ in weights]
    masks = [{"w": torch.rand(257, generator=g) < 0.4} for _ in weights]
    new, _ = masked_average(glob, states, masks, weights)
    total = torch.zeros(257, dtype=torch.float64)
    weight = torch.zeros(257, dtype=torch.float64)
    for state, mask, w in zip(states, masks, weights, strict=True):
        total += torch.where(mask["w"], 0.0, state["w"].double() * w)
        weight += (~mask["w"]).double() * w
    expected = torch.where(weight > 0, (total / torch.where(weight > 0, weight, 1.0)).float(), glob["w"])
    assert torch.equal(new["w"], expected)


def test_nan_in_personal_entries_never_reaches_result() -> None:
    states = _states(4, seed=1)
    g = torch.Generator().manual_seed(2)
    masks = [{k: torch.rand(v.shape, generator=g) < 0.4 for k, v in s.items()} for s in states]
    masks[0]["b"][:] = True  # a tensor personal for one client entirely
    for s, m in zip(states, masks, strict=True):
        for k in s:
            s[k] = torch.where(m[k], torch.tensor(math.nan), s[k])
            s[k][m[k] & (torch.arange(s[k].numel()).reshape(s[k].shape) % 2 == 0)] = math.inf
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    new, _ = masked_average(glob, states, masks, [5.0, 1.0, 2.0, 9.0])
    assert all(torch.isfinite(v).all() for v in new.values())
    new_u, _ = masked_average(glob, states, masks, None)
    assert all(torch.isfinite(v).all() for v in new_u.values())


def test_zero_weight_client_is_ignored() -> None:
    glob = {"w": torch.zeros(3)}
    states = [{"w": torch.ones(3)}, {"w": torch.full((3,), math.nan)}]
    masks = [{"w": torch.tensor([False, False, True])}, None]
    new, _ = masked_average(glob, states, masks, [2.0, 0.0])
    # Entry 2 is shared only by the zero-weight client: no weight there, so the global value stays.
    assert new["w"].tolist() == [1.0, 1.0, 0.0]


def test_masked_average_validation() -> None:
    states = _states(2)
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    masks = [empty_mask(s) for s in states]
    with pytest.raises(ValueError, match="at least one"):
        masked_average(glob, [], [])
    bad = dict(states[1])
    bad["w"] = torch.zeros(5, 6)
    with pytest.raises(ValueError, match=r"'w'.*\(6, 5\).*client 1.*\(5, 6\)"):
        masked_average(glob, [states[0], bad], masks)
    bad_mask = dict(masks[1])
    del bad_mask["b"]
    with pytest.raises(ValueError, match="client 1's mask.*'b'"):
        masked_average(glob, states, [masks[0], bad_mask])
    with pytest.raises(ValueError, match="weights"):
        masked_average(glob, states, masks, [1.0])
    with pytest.raises(ValueError, match="client 1"):
        masked_average(glob, states, masks, [1.0, -1.0])
    with pytest.raises(ValueError, match="> 0"):
        masked_average(glob, states, masks, [0.0, 0.0])
    with pytest.raises(ValueError, match="masks"):
        masked_average(glob, states, masks[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_bit_for_bit() -> None:
    states = _states(3, seed=8)
    g = torch.Generator().manual_seed(9)
    masks = [{k: torch.rand(v.shape, generator=g) < 0.3 for k, v in s.items()} for s in states]
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    cpu, cpu_mask = masked_average(glob, states, masks, [3.0, 1.0, 2.0])

    def dev(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.cuda() for k, v in d.items()}

    gpu, gpu_mask = masked_average(
        dev(glob), [dev(s) for s in states], [dev(m) for m in masks], [3.0, 1.0, 2.0]
    )
    for k in cpu:
        assert torch.equal(_bits(gpu[k].cpu()), _bits(cpu[k]))
        assert torch.equal(gpu_mask[k].cpu(), cpu_mask[k])


def test_masked_mean_takes_int_weights() -> None:
    from fedselect.core.aggregate import MaskedMean

    mean = MaskedMean({"w": torch.zeros(4)})
    mean.add("w", torch.ones(4), torch.tensor([True, False, True, True]), 3)
    mean.add("w", torch.full((4,), 2.0), torch.tensor([True, True, False, True]), 2)
    new, _ = mean.result()
    assert new["w"].tolist() == pytest.approx([7 / 5, 2.0, 1.0, 7 / 5])
