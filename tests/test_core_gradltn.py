"""Tests for fedselect.core.gradltn (FedSelect Alg. 1) and fedselect.core.localalt (LocalAlt schedule)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from fedselect.core.gradltn import (
    TOPK_SCOPES,
    final_personal_fraction,
    gradltn,
    selection_fractions,
)
from fedselect.core.localalt import invert_mask, localalt_passes, localalt_phases
from fedselect.core.masks import empty_mask, full_mask, target_count
from fedselect.core.topk import topk_mask, topk_mask_global

State = dict[str, torch.Tensor]


def _theta0(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(10, 10, generator=g), "b": torch.randn(20, generator=g)}


def _mover(step: State, calls: list[tuple[State, State]] | None = None) -> Callable[[State, State], State]:
    """A toy `train`: moves each trainable entry by a fixed per-entry amount, frozen ones not at all."""

    def train(start: State, trainable: State) -> State:
        if calls is not None:
            calls.append(
                ({k: v.clone() for k, v in start.items()}, {k: v.clone() for k, v in trainable.items()})
            )
        return {k: start[k] + torch.where(trainable[k], step[k], torch.zeros(())) for k in start}

    return train


def _hot_problem(seed: int = 1) -> tuple[State, State]:
    """25% of each tensor ("hot") moves by 5..10 per training, the rest by at most 1e-3."""
    g = torch.Generator().manual_seed(seed)
    hot: State = {}
    step: State = {}
    for k, n in (("w", 100), ("b", 20)):
        perm = torch.randperm(n, generator=g)
        h = torch.zeros(n, dtype=torch.bool)
        h[perm[: n // 4]] = True
        big = 5 + 5 * torch.rand(n, generator=g)
        tiny = 1e-3 * torch.rand(n, generator=g)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        shape = (10, 10) if k == "w" else (20,)
        hot[k] = h.reshape(shape)
        step[k] = (sign * torch.where(h, big, tiny)).reshape(shape)
    return hot, step


def test_recovers_changing_parameters_default_rule() -> None:
    theta0 = _theta0()
    hot, step = _hot_problem()
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.25, iterations=5, fraction_rule="per_iteration_of_original")
    for k in hot:
        assert torch.equal(res.mask[k], hot[k]), k
        assert torch.equal(res.weights[k], theta0[k])
    assert res.personal_fraction == 0.25
    # Iteration 0 trains everything; afterwards the mask is a fixed point and the rest is skipped.
    assert len(calls) == 1
    assert all(m.all() for m in calls[0][1].values())
    assert [s.trained for s in res.history] == [True, False, False, False, False]
    assert [s.iteration for s in res.history] == [0, 1, 2, 3, 4]


def test_geometric_default_refines_over_all_iterations_to_exactly_p() -> None:
    theta0 = _theta0()
    hot, step = _hot_problem()
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.25, iterations=5)
    assert len(calls) == 5  # every iteration shrinks the mask, so none is skipped
    fractions = [s.personal_fraction for s in res.history]
    assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
    assert res.personal_fraction == 0.25
    for k in hot:
        assert torch.equal(res.mask[k], hot[k]), k


def test_all_iterations_run_from_theta0_with_nested_masks() -> None:
    theta0 = _theta0()
    hot, step = _hot_problem()
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.25, iterations=4, stop_when_fixed=False)
    assert len(calls) == 4
    for start, _ in calls:
        for k in theta0:
            assert torch.equal(start[k], theta0[k])  # reset to theta_0 before every run
    for (_, prev), (_, nxt) in zip(calls, calls[1:], strict=False):
        for k in prev:
            assert not (nxt[k] & ~prev[k]).any()
    for k in hot:
        assert torch.equal(res.mask[k], hot[k])
    assert all(s.trained for s in res.history)


def test_compounding_rule_selects_top_p_power_l() -> None:
    theta0 = _theta0()
    g = torch.Generator().manual_seed(7)
    step = {k: torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.5, iterations=3, fraction_rule="compounding")
    assert len(calls) == 3
    for k, v in theta0.items():
        n_expected = target_count(v.numel(), 0.5**3)
        assert int(res.mask[k].sum()) == n_expected
        # Nested top-k of a fixed score is the global top-k of that score.
        assert torch.equal(res.mask[k], topk_mask(step[k].abs(), n_expected))
    assert [int(m["w"].sum()) for _, m in calls] == [100, 50, 25]
    assert final_personal_fraction(0.5, 3, "compounding") == 0.125


@pytest.mark.parametrize(
    ("rule", "p", "iterations"),
    [
        ("per_iteration_of_original", 0.25, 5),
        ("per_iteration_of_original", 0.75, 2),
        ("compounding", 0.5, 3),
        ("compounding", 0.75, 5),
    ],
)
def test_exact_fraction_with_heavy_ties(rule: str, p: float, iterations: int) -> None:
    theta0 = _theta0()

    def no_change(start: State, trainable: State) -> State:
        return start

    res = gradltn(theta0, no_change, p=p, iterations=iterations, fraction_rule=rule, stop_when_fixed=False)
    frac = selection_fractions(p, iterations, rule)[-1]
    for k, v in theta0.items():
        n = target_count(v.numel(), frac)
        flat = res.mask[k].reshape(-1)
        assert int(flat.sum()) == n
        assert flat[:n].all()  # ties go to the lower flat index
    assert res.personal_fraction == pytest.approx(
        sum(target_count(v.numel(), frac) for v in theta0.values()) / 120
    )


def test_partial_zero_change_keeps_exact_count() -> None:
    # Half of "w" never gets a gradient (like 3x3 kernels on 1x1 maps); p asks for more than the moving half.
    theta0 = _theta0()
    step = {"w": torch.zeros(10, 10), "b": torch.ones(20)}
    step["w"][:, :5] = 1.0 + torch.arange(50, dtype=torch.float32).reshape(10, 5)
    res = gradltn(theta0, _mover(step), p=0.75, iterations=2)
    assert int(res.mask["w"].sum()) == 75
    assert res.mask["w"][:, :5].all()
    assert int(res.mask["b"].sum()) == 15


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf, True, "0.5"])
def test_p_outside_open_interval_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\).*p="):
        gradltn(_theta0(), _mover({}), p=bad, iterations=2)  # type: ignore[arg-type]


def test_other_argument_validation() -> None:
    theta0 = _theta0()
    train = _mover({k: torch.ones_like(v) for k, v in theta0.items()})
    for it in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="iterations"):
            gradltn(theta0, train, p=0.5, iterations=it)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction_rule"):
        gradltn(theta0, train, p=0.5, iterations=2, fraction_rule="linear")
    with pytest.raises(ValueError, match="return_weights"):
        gradltn(theta0, train, p=0.5, iterations=2, return_weights="best")
    bad_prev = full_mask(theta0)
    bad_prev["b"] = torch.ones(21, dtype=torch.bool)
    with pytest.raises(ValueError, match="'b'"):
        gradltn(theta0, train, p=0.5, iterations=2, prev_mask=bad_prev)

    def wrong_shape(start: State, trainable: State) -> State:
        return {"w": start["w"], "b": start["b"][:3]}

    with pytest.raises(ValueError, match="'b'"):
        gradltn(theta0, wrong_shape, p=0.5, iterations=2)


def test_return_theta_l() -> None:
    theta0 = _theta0()
    hot, step = _hot_problem()
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.25, iterations=5, return_weights="thetaL",
                  fraction_rule="per_iteration_of_original")
    # First run with everything trainable, then (mask fixed) the last run with the final mask.
    assert len(calls) == 2
    for k in theta0:
        assert torch.equal(calls[1][1][k], res.mask[k])
        assert torch.equal(res.weights[k], theta0[k] + torch.where(hot[k], step[k], torch.zeros(())))
    res_c = gradltn(
        theta0, _mover(step), p=0.5, iterations=2, fraction_rule="compounding", return_weights="thetaL"
    )
    # theta_L is trained with the final m_2 (a quarter of the tensor), not with m_1 (half of it):
    # the loop's two runs used m_0 and m_1, so one extra run with m_2 is recorded as iteration L.
    assert int((res_c.weights["w"] != theta0["w"]).sum()) == 25
    assert int(res_c.mask["w"].sum()) == 25
    assert [(s.iteration, s.trained) for s in res_c.history] == [(0, True), (1, True), (2, True)]


def _recording_train(step: State) -> tuple[Callable[[State, State], State], list[tuple[State, State]]]:
    """A `_mover` that also records (trainable mask, returned state) of every call."""
    log: list[tuple[State, State]] = []
    mover = _mover(step)

    def train(start: State, trainable: State) -> State:
        out = mover(start, trainable)
        log.append(({k: v.clone() for k, v in trainable.items()}, {k: v.clone() for k, v in out.items()}))
        return out

    return train, log


@pytest.mark.parametrize(
    ("rule", "stop_when_fixed", "n_calls"),
    [
        ("geometric", True, 6),  # normal path: L runs, then one more with m_L
        ("geometric", False, 6),
        ("compounding", True, 4),
        ("per_iteration_of_original", True, 2),  # early stop: the last run already uses m_L
        ("per_iteration_of_original", False, 5),  # m_{L-1} == m_L: reused, no extra run
    ],
)
def test_theta_l_weights_are_trained_with_final_mask(rule: str, stop_when_fixed: bool, n_calls: int) -> None:
    theta0 = _theta0()
    _, step = _hot_problem()
    iterations = 5 if rule != "compounding" else 3
    train, log = _recording_train(step)
    res = gradltn(theta0, train, p=0.25, iterations=iterations, fraction_rule=rule,
                  return_weights="thetaL", stop_when_fixed=stop_when_fixed)
    sources = [m for m, out in log if all(torch.equal(out[k], res.weights[k]) for k in theta0)]
    assert sources, "thetaL weights are not the output of any training run"
    for m in sources:
        assert all(torch.equal(m[k], res.mask[k]) for k in theta0)
    assert len(log) == n_calls
    assert sum(s.trained for s in res.history) == n_calls
    # The returned weights moved exactly the final personal entries.
    for k in theta0:
        assert torch.equal(res.weights[k] != theta0[k], res.mask[k])


def _uneven_step() -> State:
    """"w" moves by 1..2 per entry, "b" by at most 0.1: a model-wide top-k takes only "w" entries."""
    g = torch.Generator().manual_seed(11)
    return {"w": 1 + torch.rand(10, 10, generator=g), "b": 0.1 * torch.rand(20, generator=g)}


def test_model_scope_selects_globally() -> None:
    theta0 = _theta0()
    step = _uneven_step()
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.25, iterations=3, topk_scope="model")
    assert int(res.mask["w"].sum()) == 30 and not res.mask["b"].any()  # 25% of all 120 entries
    assert res.personal_fraction == 0.25
    assert len(calls) == 3
    by_tensor = gradltn(theta0, _mover(step), p=0.25, iterations=3)
    assert int(by_tensor.mask["w"].sum()) == 25 and int(by_tensor.mask["b"].sum()) == 5
    # Nested global top-k of a fixed score is the one-shot global top-k of that score.
    g = torch.Generator().manual_seed(2)
    rnd = {k: torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    res_c = gradltn(theta0, _mover(rnd), p=0.5, iterations=3, fraction_rule="compounding", topk_scope="model")
    expected = topk_mask_global({k: v.abs() for k, v in rnd.items()}, target_count(120, 0.125))
    assert all(torch.equal(res_c.mask[k], expected[k]) for k in theta0)


def test_model_scope_early_stop_uses_model_total() -> None:
    theta0 = _theta0()
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(_uneven_step(), calls), p=0.25, iterations=5,
                  fraction_rule="per_iteration_of_original", topk_scope="model")
    # "w" holds 30 > target_count(100, 0.25) entries, but the model total (30) is at its target.
    assert len(calls) == 1
    assert [s.trained for s in res.history] == [True, False, False, False, False]
    assert int(res.mask["w"].sum()) == 30
    full = gradltn(theta0, _mover(_uneven_step()), p=0.25, iterations=5,
                   fraction_rule="per_iteration_of_original", topk_scope="model", stop_when_fixed=False)
    assert all(torch.equal(full.mask[k], res.mask[k]) for k in theta0)

    def no_change(start: State, trainable: State) -> State:
        return start

    # All gammas tie: the first 30 entries in key order ("w" first), lower flat index first.
    tied = gradltn(theta0, no_change, p=0.25, iterations=3, topk_scope="model")
    assert tied.mask["w"].reshape(-1)[:30].all() and int(tied.mask["w"].sum()) == 30
    assert not tied.mask["b"].any()


def test_model_scope_prev_mask_and_theta_l() -> None:
    theta0 = _theta0()
    prev = full_mask(theta0)
    prev["w"][:] = False
    prev["b"][10:] = False
    # 10 candidates < target_count(120, 0.25) = 30: all of them stay personal.
    res = gradltn(theta0, _mover(_uneven_step()), p=0.25, iterations=2, prev_mask=prev, topk_scope="model")
    assert all(torch.equal(res.mask[k], prev[k]) for k in theta0)
    train, log = _recording_train(_uneven_step())
    res_l = gradltn(theta0, train, p=0.25, iterations=3, topk_scope="model", return_weights="thetaL")
    assert len(log) == 4
    assert all(torch.equal(log[-1][0][k], res_l.mask[k]) for k in theta0)
    assert all(torch.equal(res_l.weights[k], log[-1][1][k]) for k in theta0)


def test_topk_scope_validation() -> None:
    assert TOPK_SCOPES == ("tensor", "model")
    with pytest.raises(ValueError, match="topk_scope"):
        gradltn(_theta0(), _mover({}), p=0.5, iterations=2, topk_scope="layer")


def test_prev_mask_restricts_search_and_excludes_tensors() -> None:
    theta0 = _theta0()
    g = torch.Generator().manual_seed(3)
    step = {k: torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    prev = full_mask(theta0)
    prev["b"][:] = False  # biases never personal, as in the released code's weight-only masks
    prev["w"][5:] = False
    calls: list[tuple[State, State]] = []
    res = gradltn(theta0, _mover(step, calls), p=0.3, iterations=3, prev_mask=prev)
    assert torch.equal(calls[0][1]["w"], prev["w"])
    assert not calls[0][1]["b"].any()
    assert not res.mask["b"].any()
    assert int(res.mask["w"].sum()) == 30
    assert not (res.mask["w"] & ~prev["w"]).any()
    # A candidate set smaller than the target keeps all of it.
    res2 = gradltn(theta0, _mover(step), p=0.75, iterations=2, prev_mask=prev)
    assert torch.equal(res2.mask["w"], prev["w"])


def test_train_mutating_its_input_cannot_corrupt_theta0() -> None:
    theta0 = _theta0()
    snapshot = {k: v.clone() for k, v in theta0.items()}

    def in_place(start: State, trainable: State) -> State:
        for k in start:
            start[k].add_(torch.where(trainable[k], 1.0, 0.0))
            trainable[k].zero_()
        return start

    res = gradltn(theta0, in_place, p=0.5, iterations=3, fraction_rule="compounding")
    for k in theta0:
        assert torch.equal(theta0[k], snapshot[k])
        assert torch.equal(res.weights[k], snapshot[k])
        assert int(res.mask[k].sum()) == target_count(theta0[k].numel(), 0.125)


def test_a_train_that_only_reads_may_skip_the_copies() -> None:
    """copy_inputs=False hands theta_0 itself to every training; the result is the same."""
    theta0 = _theta0(3)
    step = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(4)) for k, v in theta0.items()}
    starts: list[State] = []

    def reading(start: State, trainable: State) -> State:
        starts.append(start)
        return _mover(step)(start, trainable)

    copied = gradltn(theta0, _mover(step), p=0.3, iterations=3, return_weights="thetaL")
    shared = gradltn(theta0, reading, p=0.3, iterations=3, return_weights="thetaL", copy_inputs=False)
    assert starts and all(start is theta0 for start in starts)
    for k in theta0:
        assert torch.equal(copied.mask[k], shared.mask[k]) and torch.equal(copied.weights[k], shared.weights[k])
    assert copied.history == shared.history


def test_selection_fractions() -> None:
    assert selection_fractions(0.25, 3, "per_iteration_of_original") == [0.25, 0.25, 0.25]
    assert selection_fractions(0.5, 3, "compounding") == [0.5, 0.25, 0.125]
    assert final_personal_fraction(0.75, 5) == 0.75


def test_localalt_schedule() -> None:
    theta = _theta0()
    mask = empty_mask(theta)
    mask["w"][0] = True
    passes = localalt_passes(mask, 3)
    assert len(passes) == 6
    assert localalt_phases(3) == ["personal", "shared"] * 3
    for i, m in enumerate(passes):
        expected = mask if i % 2 == 0 else invert_mask(mask)
        assert all(torch.equal(m[k], expected[k]) for k in mask)
    shared_first = localalt_passes(mask, 2, order=("shared", "personal"))
    assert torch.equal(shared_first[0]["w"], ~mask["w"])
    assert localalt_passes(mask, 0) == []
    # An empty personal part (FedAvg) would waste a pass per epoch; skip_empty drops it.
    assert len(localalt_passes(empty_mask(theta), 4, skip_empty=True)) == 4
    assert len(localalt_passes(empty_mask(theta), 4)) == 8
    with pytest.raises(ValueError, match="phase"):
        localalt_passes(mask, 1, order=("personal", "body"))
    with pytest.raises(ValueError, match="epochs"):
        localalt_passes(mask, -1)
    with pytest.raises(ValueError, match="'w'"):
        localalt_passes({"w": torch.zeros(3)}, 1)
