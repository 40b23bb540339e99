"""Per-layer scores (arXiv 2408.15600): squared gradient norm, RGN and SNR against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fedselect.core.scores import SCORE_KINDS, group_score, group_scores

GRADS = [torch.tensor([[1.0, -2.0], [2.0, 0.0]]), torch.tensor([4.0])]
PARAMS = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([2.0])]


def test_grad_norm_is_the_sum_of_squared_norms():
    # 1 + 4 + 4 + 0 + 16
    assert group_score(GRADS, PARAMS, "grad_norm") == pytest.approx(25.0)
    assert group_score([torch.zeros(3)], [torch.ones(3)], "grad_norm") == 0.0


def test_rgn_is_gradient_norm_over_parameter_norm():
    # ||g|| = 5, ||theta|| = sqrt(4 + 1 + 4) = 3
    assert group_score(GRADS, PARAMS, "rgn") == pytest.approx(5.0 / 3.0)
    # scale-free: scaling gradients and parameters together leaves it unchanged
    scaled = group_score([7 * g for g in GRADS], [7 * p for p in PARAMS], "rgn")
    assert scaled == pytest.approx(5.0 / 3.0)
    # all-zero parameters: documented as 0
    assert group_score(GRADS, [torch.zeros(2, 2), torch.zeros(1)], "rgn") == 0.0


def test_snr_is_abs_mean_over_population_std_of_all_elements():
    values = [1.0, -2.0, 2.0, 0.0, 4.0]
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    assert group_score(GRADS, PARAMS, "snr") == pytest.approx(abs(mean) / std)
    # the sign of the mean does not matter, nor the gradient's scale
    assert group_score([-g for g in GRADS], PARAMS, "snr") == pytest.approx(abs(mean) / std)
    assert group_score([1e-4 * g for g in GRADS], PARAMS, "snr") == pytest.approx(abs(mean) / std)


def test_snr_with_zero_std_is_finite():
    assert group_score([torch.zeros(4)], [torch.ones(4)], "snr") == 0.0
    constant = group_score([torch.full((3,), -0.5)], [torch.ones(3)], "snr")
    assert math.isfinite(constant) and constant == pytest.approx(0.5e6)
    single = group_score([torch.tensor([2.0])], [torch.ones(1)], "snr")
    assert math.isfinite(single) and single > 1e5


def test_float32_inputs_are_summed_in_float64():
    g = torch.full((1_000_000,), 1e-3, dtype=torch.float32)
    assert group_score([g], [torch.ones_like(g)], "grad_norm") == pytest.approx(1.0, rel=1e-6)


def test_bad_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="unknown score kind 'fisher'.*grad_norm, rgn, snr"):
        group_score(GRADS, PARAMS, "fisher")
    for kind in SCORE_KINDS:
        with pytest.raises(ValueError, match="non-finite gradient"):
            group_score([torch.tensor([1.0, float("nan")])], [torch.ones(2)], kind)
        with pytest.raises(ValueError, match="non-finite gradient"):
            group_score([torch.tensor([float("inf")])], [torch.ones(1)], kind)
        with pytest.raises(ValueError, match="at least one"):
            group_score([], [], kind)
    with pytest.raises(ValueError, match="non-finite parameter"):
        group_score(GRADS, [torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), torch.ones(1)], "rgn")


def test_group_scores_keep_the_order_and_name_a_missing_group():
    grads = {"block2": GRADS, "block1": [torch.ones(2)], "head": [torch.tensor([3.0, 4.0])]}
    params = {"block1": [torch.ones(2)], "head": [torch.ones(2)], "block2": PARAMS}
    out = group_scores(grads, params, "grad_norm")
    assert list(out) == ["block2", "block1", "head"]
    assert out == pytest.approx({"block2": 25.0, "block1": 2.0, "head": 25.0})
    with pytest.raises(ValueError, match="'head'"):
        group_scores(grads, {"block1": [torch.ones(2)], "block2": PARAMS}, "rgn")
