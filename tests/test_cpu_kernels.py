"""The one-pass CPU kernels give the bits of the PyTorch operations they replace.

Each kernel is compared with the PyTorch path it stands for, over values where IEEE arithmetic is
easy to get wrong (NaN, infinities, signed zeros, subnormals), and a whole FedSelect run, momentum
and weight decay included, ends in the same state and metrics with the kernels on and off.
"""

from __future__ import annotations

import pytest
import torch

from fedselect.core import cpu_kernels
from fedselect.core.aggregate import MaskedMean
from fedselect.core.blend import where_fill_

from .test_algorithms import make_run

pytestmark = pytest.mark.skipif(not cpu_kernels.NUMBA_FOUND, reason="numba is not installed")

g = torch.Generator().manual_seed(11)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def awkward(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values sprinkled with NaN, +-inf, +-0.0 and subnormals."""
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 10).to(dtype)
    if n == 0:
        return x
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, tiny / 4, -tiny / 8], dtype=dtype)
    where = torch.randint(0, n, (n // 5,), generator=g)
    x[where] = specials[torch.randint(0, len(specials), (len(where),), generator=g)]
    return x


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "1")


def test_enabled_follows_the_setting_and_the_thread_count(monkeypatch):
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled()
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "1")
    assert cpu_kernels.enabled()
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "auto")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cpu_kernels.MAX_THREADS + 1)
        assert not cpu_kernels.enabled()
        torch.set_num_threads(1)
        assert cpu_kernels.enabled()
    finally:
        torch.set_num_threads(threads)


def test_another_value_of_the_variable_is_an_error_naming_it_before_a_cpu_run(monkeypatch):
    from fedselect.engine import configure_device
    from fedselect.options import ConfigError

    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "yes")
    with pytest.raises(ConfigError, match="FEDSELECT_CPU_KERNELS must be 0 .* got 'yes'"):
        configure_device(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr", [0.05, 0.1, 1e-3])
def test_masked_step_is_the_blended_update(kernels_on, dtype, lr):
    n = 5003
    param, direction = awkward(n, dtype), awkward(n, dtype)
    mask = torch.rand(n, generator=g) < 0.5
    expected = param.clone().sub_(where_fill_(direction * lr, mask))
    cpu_kernels.masked_step(param, direction, mask, lr)
    assert same_bits(param, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_momentum_step_updates_the_buffer_only_where_masked(kernels_on, dtype):
    n, lr, mu = 4099, 0.05, 0.9
    param, direction, buffer = awkward(n, dtype), awkward(n, dtype), awkward(n, dtype)
    mask = torch.rand(n, generator=g) < 0.3
    expected_buffer = torch.where(mask, buffer * mu + direction, buffer)
    expected = param.clone().sub_(torch.where(mask, expected_buffer * lr, 0.0))
    cpu_kernels.masked_step(param, direction, mask, lr, momentum_buffer=buffer, momentum=mu)
    assert same_bits(buffer, expected_buffer)
    assert same_bits(param, expected)


def test_step_applies_only_to_cpu_float_tensors_of_one_shape(kernels_on):
    p, d, m = torch.zeros(6), torch.zeros(6), torch.zeros(6, dtype=torch.bool)
    assert cpu_kernels.step_applies(p, d, m)
    assert not cpu_kernels.step_applies(p.half(), d.half(), m)
    assert not cpu_kernels.step_applies(p, d.double(), m)
    assert not cpu_kernels.step_applies(p, torch.zeros(7), torch.zeros(7, dtype=torch.bool))
    assert not cpu_kernels.step_applies(p, d, m, torch.zeros(6, dtype=torch.float64))


def _mean_result(values, personals, weights, whole_first: bool):
    state = {"w": torch.randn(values[0].shape, generator=torch.Generator().manual_seed(0))}
    mean = MaskedMean(state)
    if whole_first:
        mean.add("w", values[0], None, weights[0])
        values, personals, weights = values[1:], personals[1:], weights[1:]
    for x, personal, w in zip(values, personals, weights, strict=True):
        mean.add_personal("w", x, personal, w)
    return mean.result()


@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("whole_first", [False, True])
def test_accumulate_shared_gives_the_masked_mean(monkeypatch, whole_first, finite):
    """Bit for bit on finite uploads, the only kind a server adds (it drops others first). With
    infinities the same entries come out NaN or infinite: which NaN an inf - inf sum carries on
    depends on the compiler's operand order, in PyTorch's kernels as in numba's."""
    n = 3001
    values = [awkward(n, torch.float32) for _ in range(4)]
    if finite:
        values = [v.nan_to_num(0.0, 1e30, -1e30) for v in values]
    personals = [torch.rand(n, generator=g) < f for f in (0.2, 0.5, 0.9, 0.5)]
    personals[2][:50] = True  # entries personal to every client keep the old value
    for p in personals:
        p[:50] = True
    weights = [40, 12, 7, 1]
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "0")
    expected_state, expected_mask = _mean_result(values, personals, weights, whole_first)
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "1")
    state, mask = _mean_result(values, personals, weights, whole_first)
    assert torch.equal(mask["w"], expected_mask["w"])
    if finite:
        assert same_bits(state["w"], expected_state["w"])
    else:
        nan = expected_state["w"].isnan()
        assert torch.equal(state["w"].isnan(), nan)
        assert same_bits(state["w"][~nan], expected_state["w"][~nan])


def test_accumulate_falls_back_for_weights_it_cannot_sum_exactly(kernels_on):
    n = 257
    x, personal = awkward(n, torch.float32), torch.rand(n, generator=g) < 0.5
    kernel, fallback = MaskedMean({"w": torch.zeros(n)}), MaskedMean({"w": torch.zeros(n)})
    kernel.add_personal("w", x, personal, 2.5)
    fallback.add("w", x, ~personal, 2.5)
    assert same_bits(kernel.result()[0]["w"], fallback.result()[0]["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.6, 1.0])
def test_merge_personal_is_copy_then_masked_scatter(kernels_on, dtype, fraction):
    n = 2049
    global_values = awkward(n, dtype)
    mask = torch.rand(n, generator=g) < fraction
    personal = awkward(int(mask.sum()), dtype)
    expected = global_values.clone().masked_scatter_(mask, personal)
    out = torch.full((n,), 7.0, dtype=dtype)
    cpu_kernels.merge_personal(out, global_values, mask, personal)
    assert same_bits(out, expected)


def test_merge_personal_refuses_a_count_that_does_not_match(kernels_on):
    mask = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="personal values"):
        cpu_kernels.merge_personal(torch.zeros(3), torch.ones(3), mask, torch.ones(1))
    with pytest.raises(ValueError, match="no personal values"):
        cpu_kernels.merge_personal(torch.zeros(3), torch.ones(3), mask, torch.ones(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_compress_is_masked_select(kernels_on, dtype, fraction):
    base = awkward(999, torch.float64)
    values = base.to(dtype) if dtype.is_floating_point else base.nan_to_num(0.0, 0.0, 0.0).abs().to(dtype)
    mask = torch.rand(999, generator=g) < fraction
    assert same_bits(cpu_kernels.compress(values, mask), torch.masked_select(values, mask))


def _fedselect_run(monkeypatch, setting: str, algo: dict) -> tuple:
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", setting)
    *_, trainers, server, flow = make_run("fedselect", rounds=3, algo=algo, weight_decay=5e-4)
    results = flow.run()
    state = {k: v.clone() for k, v in server.get_model_params().items()}
    personal = [{k: v.clone() for k, v in t.personal_values.items()} for t in trainers]
    return [(r.train_loss, r.client_accuracies) for r in results], state, personal


@pytest.mark.parametrize("algo", [{"p": 0.3, "mask_search": "grow"},
                                  {"p": 0.5, "gradltn_iterations": 2, "gradltn_epochs": 1}])
def test_a_fedselect_run_is_the_same_with_and_without_the_kernels(monkeypatch, algo):
    metrics_off, state_off, personal_off = _fedselect_run(monkeypatch, "0", algo)
    metrics_on, state_on, personal_on = _fedselect_run(monkeypatch, "1", algo)
    assert metrics_on == metrics_off
    assert all(same_bits(v, state_off[k]) for k, v in state_on.items())
    for on, off in zip(personal_on, personal_off, strict=True):
        assert on.keys() == off.keys() and all(same_bits(v, off[k]) for k, v in on.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("whole", [0.0, 3.0])
@pytest.mark.parametrize("weight_dtype", [torch.int32, torch.float64])
def test_weighted_mean_is_the_divided_sums_or_the_old_value(kernels_on, dtype, whole, weight_dtype):
    n = 3001
    total = awkward(n, torch.float64) * 1e3
    weight = torch.randint(0, 5, (n,), generator=g).to(weight_dtype)
    old = awkward(n, dtype)
    w = weight.to(torch.float64)
    w = w + whole if whole else w
    expected = torch.where(w > 0, (total / torch.where(w > 0, w, 1.0)).to(dtype), old)
    assert same_bits(cpu_kernels.weighted_mean(total, weight, whole, old), expected)


def _scores(n: int) -> torch.Tensor:
    """Scores with many ties (exact zeros, repeated values), both zeros' signs and infinities."""
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < 0.4] = 0.0
    x[torch.rand(n, generator=g) < 0.1] = -0.0
    x[torch.rand(n, generator=g) < 0.1] = 1.5
    x[:7] = torch.tensor([float("inf"), float("-inf"), 1.5, -1.5, 0.0, -0.0, 2.0**-140])
    return x


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7, 0.99])
@pytest.mark.parametrize("absolute", [False, True])
def test_topk_kernel_chooses_what_topk_mask_chooses(monkeypatch, fraction, absolute):
    """Signed scores (GradLTN's scopes) and magnitudes (growth), many ties, both zeros."""
    from fedselect.core.topk import topk_mask

    n = 70001  # above the size where topk_mask hands over to the kernel
    scores, within = _scores(n), torch.rand(n, generator=g) < 0.6
    candidates = int(within.sum())
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "0")
    for k in (1, int(fraction * candidates), candidates - 1):
        expected = topk_mask(scores.abs() if absolute else scores, k, within=within)
        monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "1")
        chosen = cpu_kernels.topk(scores.abs() if absolute else scores, within, k)
        assert torch.equal(chosen, expected), k
        assert torch.equal(topk_mask(scores.abs() if absolute else scores, k, within=within), expected)
        monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "0")


def test_topk_kernel_refuses_nan_among_candidates_only(kernels_on):
    scores, within = torch.rand(100), torch.ones(100, dtype=torch.bool)
    scores[5] = float("nan")
    within[5] = False
    assert int(cpu_kernels.topk(scores, within, 10).sum()) == 10
    within[5] = True
    with pytest.raises(ValueError, match="NaN"):
        cpu_kernels.topk(scores, within, 10)


def test_grow_mask_is_the_same_with_and_without_the_kernels(monkeypatch):
    from fedselect.core.topk import grow_mask

    shapes = {"big": (300, 250), "small": (40, 5), "full": (70000,)}
    change = {name: _scores(torch.Size(shape).numel()).reshape(shape) for name, shape in shapes.items()}
    mask = {name: torch.rand(shape, generator=g) < 0.3 for name, shape in shapes.items()}
    mask["full"][:] = False
    results = []
    for setting in ("0", "1"):
        monkeypatch.setenv("FEDSELECT_CPU_KERNELS", setting)
        results.append(grow_mask(mask, change, rate=0.4, target_fraction=0.9))
    assert all(torch.equal(results[0][n], results[1][n]) for n in shapes)


def _changes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Before and after values whose changes tie often (no change at all, repeated steps), include
    both zeros, infinities that stay put, and subnormal steps."""
    old = _scores(n)
    old[old.isinf()] = 1.0  # inf - inf would be NaN
    step = torch.randn(n, generator=g) * 1e-3
    step[torch.rand(n, generator=g) < 0.3] = 0.0
    step[torch.rand(n, generator=g) < 0.1] = 2.0**-10
    step[:3] = torch.tensor([2.0**-140, -(2.0**-140), 0.0])
    new = old + step
    new[3], old[3] = -0.0, 0.0
    return new, old


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.99])
def test_abs_change_kernel_chooses_what_topk_mask_chooses(monkeypatch, fraction):
    """GradLTN's selection without the gamma tensor: the entries of topk_mask(|new - old|)."""
    from fedselect.core.topk import topk_abs_change, topk_mask

    n = 70001
    new, old = _changes(n)
    within = torch.rand(n, generator=g) < 0.6
    candidates = int(within.sum())
    for k in (1, int(fraction * candidates), candidates - 1):
        monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "0")
        expected = topk_mask((new - old).abs(), k, within=within)
        monkeypatch.setenv("FEDSELECT_CPU_KERNELS", "1")
        assert torch.equal(cpu_kernels.abs_change_topk(new, old, within, k), expected), k
        assert torch.equal(topk_abs_change(new, old, k, within=within, candidates=candidates), expected), k


def test_topk_abs_change_outside_the_kernel_is_topk_mask(kernels_on):
    """k = 0, every candidate, a small tensor, float64: the general selection."""
    from fedselect.core.topk import topk_abs_change, topk_mask

    for n, dtype in ((70001, torch.float32), (500, torch.float32), (70001, torch.float64)):
        new, old = (t.to(dtype) for t in _changes(n))
        within = torch.rand(n, generator=g) < 0.5
        candidates = int(within.sum())
        for k in (0, candidates // 2, candidates):
            expected = topk_mask((new - old).abs(), k, within=within)
            assert torch.equal(topk_abs_change(new, old, k, within=within, candidates=candidates), expected)


def test_abs_change_kernel_refuses_nan_among_candidates_only(kernels_on):
    new, old = torch.rand(100), torch.rand(100)
    within = torch.ones(100, dtype=torch.bool)
    new[5] = float("nan")
    within[5] = False
    assert int(cpu_kernels.abs_change_topk(new, old, within, 10).sum()) == 10
    within[5] = True
    with pytest.raises(ValueError, match="NaN"):
        cpu_kernels.abs_change_topk(new, old, within, 10)
