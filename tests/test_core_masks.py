"""Tests for fedselect.core.masks: exact top-k, fractions, IoU, bit packing, online growth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedselect.core.masks import (
    empty_mask,
    full_mask,
    iou_matrix,
    mask_iou,
    pack_mask,
    personal_fraction,
    personal_fraction_by_group,
    target_count,
    unpack_mask,
    validate_mask,
)
from fedselect.core.topk import grow_mask, topk_mask, topk_mask_global


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(10, 7, generator=g),
    }


def test_empty_full_and_validate() -> None:
    st = _state()
    e, f = empty_mask(st), full_mask(st)
    validate_mask(e, st)
    validate_mask(f, st)
    assert personal_fraction(e) == 0.0
    assert personal_fraction(f) == 1.0
    assert all(m.dtype == torch.bool for m in e.values())


def test_validate_mask_names_the_tensor() -> None:
    st = _state()
    m = empty_mask(st)
    del m["conv.bias"]
    with pytest.raises(ValueError, match="conv.bias"):
        validate_mask(m, st)
    m = empty_mask(st)
    m["fc.weight"] = torch.zeros(7, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"fc\.weight.*\(7, 10\).*\(10, 7\)"):
        validate_mask(m, st)
    m = empty_mask(st)
    m["conv.weight"] = m["conv.weight"].to(torch.uint8)
    with pytest.raises(ValueError, match="conv.weight.*dtype"):
        validate_mask(m, st)
    m = empty_mask(st)
    m["extra"] = torch.zeros(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="extra"):
        validate_mask(m, st)


def test_target_count_rounds_half_up() -> None:
    assert target_count(10, 0.25) == 3  # 2.5 -> 3
    assert target_count(3, 0.5) == 2  # 1.5 -> 2
    assert target_count(8, 0.25) == 2
    assert target_count(0, 0.7) == 0
    assert target_count(5, 1.0) == 5
    with pytest.raises(ValueError):
        target_count(5, 1.5)


def test_topk_exact_with_all_ties_lower_index_wins() -> None:
    scores = torch.zeros(3, 5)
    m = topk_mask(scores, 4)
    assert int(m.sum()) == 4
    assert m.reshape(-1)[:4].all() and not m.reshape(-1)[4:].any()


def test_topk_ties_at_threshold_and_within() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 9.0])
    m = topk_mask(scores, 4)
    # 9 and 5 are above the 3's; of the four 3's the two with the lowest index fill the remaining slots.
    assert m.tolist() == [True, False, True, True, False, False, False, True]
    within = torch.tensor([True, True, False, True, True, True, True, False])
    m = topk_mask(scores, 3, within=within)
    assert m.tolist() == [True, False, False, True, True, False, False, False]
    assert not (m & ~within).any()


def test_topk_edge_cases() -> None:
    scores = torch.tensor([1.0, -math.inf, math.inf, 2.0])
    assert topk_mask(scores, 0).sum() == 0
    assert topk_mask(scores, 4).all()
    assert topk_mask(scores, 1).tolist() == [False, False, True, False]
    assert topk_mask(scores, 4 - 0).sum() == 4
    with pytest.raises(ValueError, match="k=5"):
        topk_mask(scores, 5)
    with pytest.raises(ValueError, match="k=3"):
        topk_mask(scores, 3, within=torch.tensor([True, True, False, False]))
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([1.0, math.nan]), 1)
    # NaN outside the candidates is irrelevant.
    assert topk_mask(torch.tensor([1.0, math.nan]), 1, within=torch.tensor([True, False])).tolist() == [
        True,
        False,
    ]
    with pytest.raises(ValueError, match="shape"):
        topk_mask(scores, 1, within=torch.ones(3, dtype=torch.bool))


def test_topk_matches_sort_reference() -> None:
    g = torch.Generator().manual_seed(3)
    # Few distinct values force many ties at the threshold.
    scores = torch.randint(0, 5, (257,), generator=g).float()
    for k in (0, 1, 50, 128, 256, 257):
        order = sorted(range(257), key=lambda i: (-scores[i].item(), i))
        expected = torch.zeros(257, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(topk_mask(scores, k), expected)


def _global_reference(scores: dict[str, torch.Tensor], k: int, within: dict[str, torch.Tensor]) -> list[bool]:
    """Sort-based reference: candidates by (-score, key position, flat index), first k chosen."""
    entries = [
        (-float(t.reshape(-1)[j]), pos, j)
        for pos, (name, t) in enumerate(scores.items())
        for j in range(t.numel())
        if within[name].reshape(-1)[j]
    ]
    chosen = {(pos, j) for _, pos, j in sorted(entries)[:k]}
    return [(pos, j) in chosen for pos, t in enumerate(scores.values()) for j in range(t.numel())]


def test_topk_global_exact_count_and_matches_sort_reference() -> None:
    g = torch.Generator().manual_seed(5)
    # Few distinct values: many ties across tensors at the threshold.
    scores = {
        "b": torch.randint(0, 4, (6,), generator=g).float(),
        "a": torch.randint(0, 4, (3, 5), generator=g).float(),
        "c": torch.randint(0, 4, (2, 2, 2), generator=g).float(),
    }
    within = {k: torch.rand(v.shape, generator=g) < 0.7 for k, v in scores.items()}
    n_cand = sum(int(m.sum()) for m in within.values())
    for k in (0, 1, 7, n_cand // 2, n_cand - 1, n_cand):
        m = topk_mask_global(scores, k, within=within)
        assert list(m) == ["b", "a", "c"]
        assert sum(int(t.sum()) for t in m.values()) == k
        assert all(not (m[n] & ~within[n]).any() for n in m)
        assert all(m[n].shape == scores[n].shape and m[n].dtype == torch.bool for n in m)
        got = [bool(x) for t in m.values() for x in t.reshape(-1)]
        assert got == _global_reference(scores, k, within)


def test_topk_global_ties_follow_key_order_then_index() -> None:
    scores = {"second": torch.zeros(4), "first": torch.zeros(2, 2)}
    m = topk_mask_global(scores, 6)
    # All tied: the dict's first tensor fills up before the next one, lower flat index first.
    assert m["second"].all()
    assert m["first"].reshape(-1).tolist() == [True, True, False, False]
    # A larger value anywhere beats ties; mixed dtypes rank by value.
    scores = {"x": torch.tensor([1.0, 3.0]), "y": torch.tensor([2, 3], dtype=torch.int64)}
    m = topk_mask_global(scores, 2)
    assert m["x"].tolist() == [False, True] and m["y"].tolist() == [False, True]
    # The selection is model-wide: one tensor may take everything.
    m = topk_mask_global({"big": torch.full((3,), 9.0), "small": torch.ones(5)}, 3)
    assert m["big"].all() and not m["small"].any()


def test_topk_global_within_and_edge_cases() -> None:
    scores = {"a": torch.tensor([5.0, 4.0, 3.0]), "b": torch.tensor([[9.0, 1.0]])}
    within = {"a": torch.tensor([False, True, True]), "b": torch.tensor([[False, True]])}
    m = topk_mask_global(scores, 2, within=within)
    assert m["a"].tolist() == [False, True, True] and not m["b"].any()
    # Empty candidate set: only k = 0 is possible.
    none = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in scores.items()}
    m = topk_mask_global(scores, 0, within=none)
    assert all(not t.any() for t in m.values())
    with pytest.raises(ValueError, match="k=1"):
        topk_mask_global(scores, 1, within=none)
    with pytest.raises(ValueError, match="k=6"):
        topk_mask_global(scores, 6)
    assert topk_mask_global({}, 0) == {}
    with pytest.raises(ValueError, match="k=1"):
        topk_mask_global({}, 1)
    with pytest.raises(ValueError, match="'b'"):
        topk_mask_global(scores, 1, within={"a": within["a"]})
    with pytest.raises(ValueError, match="NaN"):
        topk_mask_global({"a": torch.tensor([1.0, math.nan])}, 1)


def test_fractions_overall_and_by_group() -> None:
    st = _state()
    m = empty_mask(st)
    m["fc.weight"][:5] = True  # 35 of 70
    m["conv.bias"][0] = True  # 1 of 4
    total = sum(t.numel() for t in st.values())
    assert personal_fraction(m) == pytest.approx(36 / total)
    groups = {"head": ["fc.weight"], "body": ["conv.weight", "conv.bias"], "none": []}
    by = personal_fraction_by_group(m, groups)
    assert by == {"head": 0.5, "body": pytest.approx(1 / 112), "none": 0.0}
    with pytest.raises(ValueError, match="nope"):
        personal_fraction_by_group(m, {"x": ["nope"]})
    assert personal_fraction({}) == 0.0


def test_iou_edge_cases() -> None:
    st = _state()
    e = empty_mask(st)
    f = full_mask(st)
    assert mask_iou(e, e) == 1.0
    assert mask_iou(f, f) == 1.0
    assert mask_iou(e, f) == 0.0
    a = empty_mask(st)
    b = empty_mask(st)
    a["fc.weight"][0, :4] = True
    b["fc.weight"][0, 2:6] = True
    assert mask_iou(a, b) == pytest.approx(2 / 6)
    assert mask_iou(a, b, keys=["conv.bias"]) == 1.0  # nothing personal there in either
    bad = empty_mask(st)
    bad["fc.weight"] = torch.zeros(70, dtype=torch.bool)
    with pytest.raises(ValueError, match="fc.weight"):
        mask_iou(a, bad)
    mat = iou_matrix([a, b, e])
    assert mat.shape == (3, 3)
    assert np.allclose(np.diag(mat), 1.0)
    assert np.allclose(mat, mat.T)
    assert mat[0, 1] == pytest.approx(1 / 3)
    assert mat[0, 2] == 0.0


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (2, 3, 7), (13, 1, 3)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    m = {"t": torch.rand(shape, generator=g) > 0.5, "ones": torch.ones(shape, dtype=torch.bool)}
    packed = pack_mask(m)
    n = math.prod(shape)
    assert packed["t"].bits.dtype == torch.uint8
    assert packed["t"].bits.numel() == (n + 7) // 8
    assert packed["t"].shape == shape
    back = unpack_mask(packed)
    for k in m:
        assert back[k].dtype == torch.bool
        assert torch.equal(back[k], m[k])
    # Same layout as numpy.packbits (MSB first), so packed masks are readable without torch.
    assert packed["t"].bits.numpy().tobytes() == np.packbits(m["t"].numpy().reshape(-1)).tobytes()


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="'t'"):
        unpack_mask({"t": (torch.zeros(3, dtype=torch.uint8), (9,))})


def test_grow_mask_exact_count_among_shared() -> None:
    mask = {"w": torch.zeros(20, dtype=torch.bool)}
    mask["w"][:4] = True  # 4 personal, 16 shared
    change = {"w": torch.arange(20, dtype=torch.float32).flip(0)}  # largest change at index 0
    out = grow_mask(mask, change, rate=0.25, target_fraction=0.8)
    # 25% of the 16 shared entries = 4; the largest shared changes are at indices 4..7.
    assert out["w"].tolist() == [True] * 8 + [False] * 12
    assert mask["w"].sum() == 4  # input untouched


def test_grow_mask_all_zero_change_does_not_flip_the_layer() -> None:
    # The released `>= quantile` rule would make all 100 entries personal here.
    mask = {"w": torch.zeros(10, 10, dtype=torch.bool)}
    change = {"w": torch.zeros(10, 10)}
    out = grow_mask(mask, change, rate=0.25, target_fraction=0.8)
    assert int(out["w"].sum()) == 25
    assert out["w"].reshape(-1)[:25].all()
    out2 = grow_mask(out, change, rate=0.25, target_fraction=0.8)
    assert int(out2["w"].sum()) == 25 + target_count(75, 0.25)  # 0.25 -> 0.44, as p says


def test_grow_mask_respects_target_and_keys() -> None:
    g = torch.Generator().manual_seed(1)
    mask = {"a.weight": torch.zeros(10, dtype=torch.bool), "a.bias": torch.zeros(10, dtype=torch.bool)}
    mask["a.weight"][:9] = True  # 0.9 > 0.8: frozen
    change = {"a.weight": torch.rand(10, generator=g), "a.bias": torch.rand(10, generator=g)}
    out = grow_mask(mask, change, rate=0.5, target_fraction=0.8, keys=["a.weight"])
    assert torch.equal(out["a.weight"], mask["a.weight"])
    assert not out["a.bias"].any()  # not among keys
    # Exactly at the target (not above) still grows, and may overshoot without the cap.
    m8 = {"w": torch.zeros(10, dtype=torch.bool)}
    m8["w"][:8] = True
    c = {"w": torch.ones(10)}
    assert int(grow_mask(m8, c, rate=1.0, target_fraction=0.8)["w"].sum()) == 10
    assert int(grow_mask(m8, c, rate=1.0, target_fraction=0.8, cap_at_target=True)["w"].sum()) == 8
    m0 = {"w": torch.zeros(10, dtype=torch.bool)}
    assert int(grow_mask(m0, c, rate=1.0, target_fraction=0.3, cap_at_target=True)["w"].sum()) == 3


def test_grow_mask_validation() -> None:
    mask = {"w": torch.zeros(4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="'w'"):
        grow_mask(mask, {}, rate=0.5, target_fraction=0.8)
    with pytest.raises(ValueError, match="'w'"):
        grow_mask(mask, {"w": torch.zeros(5)}, rate=0.5, target_fraction=0.8)
    with pytest.raises(ValueError, match="rate"):
        grow_mask(mask, {"w": torch.zeros(4)}, rate=1.5, target_fraction=0.8)
    with pytest.raises(ValueError, match="nope"):
        grow_mask(mask, {"w": torch.zeros(4)}, rate=0.5, target_fraction=0.8, keys=["nope"])


@pytest.mark.parametrize("fraction", [0.1, 0.49, 0.5, 0.9, 1.0])
def test_topk_mask_both_selection_paths_agree_with_a_sort(fraction: float) -> None:
    """Few candidates are gathered, many are ranked in place: both give the sort's answer, ties by index."""
    g = torch.Generator().manual_seed(int(fraction * 100))
    scores = torch.randint(-3, 4, (40, 25), generator=g).float()  # many ties
    scores[0, :5] = float("-inf")
    within = torch.rand(40, 25, generator=g) < fraction
    n = int(within.sum())
    for k in (1, n // 3, n // 2, n - 1):
        chosen = topk_mask(scores, k, within=within)
        flat_idx = within.reshape(-1).nonzero().squeeze(1)
        vals = scores.reshape(-1)[flat_idx]
        # stable descending sort: equal scores keep index order
        order = torch.sort(-vals, stable=True).indices[:k]
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[flat_idx[order]] = True
        assert torch.equal(chosen.reshape(-1), expected), (fraction, k)


def test_segmented_topk_equals_per_tensor_topk() -> None:
    """The GPU path (one segmented sort for every tensor) chooses exactly what topk_mask chooses."""
    from fedselect.core.topk import topk_masks

    g = torch.Generator().manual_seed(11)
    shapes = {"a": (17, 9), "b": (40,), "c": (3, 4, 5), "empty_choice": (6,)}
    scores = {n: torch.randint(0, 5, s, generator=g).float() for n, s in shapes.items()}
    scores["b"][:7] = float("-inf")
    scores["c"] = torch.rand(3, 4, 5, generator=g)
    within = {n: torch.rand(s, generator=g) < 0.6 for n, s in shapes.items()}
    counts = {n: int(m.sum()) for n, m in within.items()}
    ks = {"a": counts["a"] // 2, "b": counts["b"] - 1, "c": 1, "empty_choice": 0}
    per_tensor = topk_masks(list(shapes), scores.__getitem__, ks, within, method="per_tensor")
    segmented = topk_masks(list(shapes), scores.__getitem__, ks, within, method="segmented")
    for name in shapes:
        assert torch.equal(per_tensor[name], segmented[name]), name
        assert int(segmented[name].sum()) == ks[name]
        assert not bool((segmented[name] & ~within[name]).any())
    scores["a"][0, 0] = float("nan")
    within["a"][0, 0] = True
    with pytest.raises(ValueError, match="NaN"):
        topk_masks(list(shapes), scores.__getitem__, ks, within, method="segmented")
    with pytest.raises(ValueError, match="outside"):
        topk_masks(["c"], scores.__getitem__, {"c": 61}, within, method="segmented")


def test_gather_masked_without_reading_the_count_back() -> None:
    """The GPU path (ranks by cumsum, index_copy with a spare slot) gives masked_select's values."""
    from fedselect.core.masks import gather_masked

    g = torch.Generator().manual_seed(5)
    values = torch.randn(7, 6, 5, generator=g)
    for fraction in (0.0, 0.3, 1.0):
        mask = torch.rand(7, 6, 5, generator=g) < fraction
        count = int(mask.sum())
        expected = torch.masked_select(values, mask)
        got = gather_masked(values, mask, count, method="index_copy")
        assert torch.equal(got, expected) and got.shape == (count,)
        assert torch.equal(gather_masked(values, mask, count), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_compress_is_masked_select(dtype: torch.dtype) -> None:
    """numpy's compress on the CPU: masked_select's values, bits, order, shape and dtype."""
    from fedselect.core.masks import compress

    g = torch.Generator().manual_seed(8)
    values = (torch.randn(9, 4, 5, generator=g) * 100).to(dtype)
    if dtype.is_floating_point:
        values.view(-1)[::7], values.view(-1)[1::11] = float("nan"), -0.0
    strided = values.transpose(0, 2)  # not contiguous
    for source in (values, strided):
        for fraction in (0.0, 0.4, 1.0):
            mask = torch.rand(source.shape, generator=g) < fraction
            expected, got = torch.masked_select(source, mask), compress(source, mask)
            assert got.dtype == dtype and got.shape == expected.shape
            assert torch.equal(got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


def test_pack_mask_with_one_host_copy_round_trips() -> None:
    g = torch.Generator().manual_seed(6)
    mask = {"a": torch.rand(3, 5, generator=g) < 0.5, "b": torch.rand(9, generator=g) < 0.5,
            "c": torch.zeros(0, dtype=torch.bool)}
    packed = pack_mask(mask)
    assert [p.bits.numel() for p in packed.values()] == [2, 2, 0]
    for name, m in unpack_mask(packed).items():
        assert torch.equal(m, mask[name]), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_packing_and_unpacking_on_the_device_give_the_hosts_bits(device: str) -> None:
    """The torch unpack (one copy of all packed bytes, bits expanded on the device, each mask a
    view of one buffer) and the torch pack equal numpy's, over sizes that do and do not fill
    whole bytes."""
    g = torch.Generator().manual_seed(8)
    shapes = {"conv": (4, 3, 3, 3), "bias": (7,), "one": (), "empty": (0,), "fc": (13, 9), "bn": (8,)}
    mask = {k: torch.rand(s, generator=g) < 0.3 for k, s in shapes.items()}
    packed = pack_mask(mask)
    on_host = unpack_mask(packed)
    on_device = unpack_mask(packed, device=device, method="torch")
    assert list(on_device) == list(mask)
    for name, m in on_device.items():
        assert m.device.type == device and m.dtype == torch.bool and m.shape == mask[name].shape, name
        assert torch.equal(m.cpu(), mask[name]) and torch.equal(m.cpu(), on_host[name]), name
    repacked = pack_mask(on_device, method="torch")
    for name, p in repacked.items():
        assert p.bits.device.type == "cpu" and p.shape == packed[name].shape, name
        assert torch.equal(p.bits, packed[name].bits), name
    # the masks are views of one buffer: no mask reaches into another's entries
    on_device["fc"].fill_(True)
    assert torch.equal(on_device["conv"].cpu(), mask["conv"]) and torch.equal(on_device["bn"].cpu(), mask["bn"])
    assert unpack_mask({}, device=device, method="torch") == {}


def test_pack_and_unpack_refuse_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="method"):
        unpack_mask(pack_mask({"a": torch.ones(3, dtype=torch.bool)}), method="fast")
    with pytest.raises(ValueError, match="method"):
        pack_mask({"a": torch.ones(3, dtype=torch.bool)}, method="fast")


@pytest.mark.parametrize("probe", [True, False])
@pytest.mark.parametrize("zero_share", [0.0, 0.6, 0.95, 1.0])
def test_topk_mask_on_zero_heavy_scores_agrees_with_a_sort(zero_share: float, probe: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Growth scores |change| are mostly exact zeros (+0.0 and -0.0): whether the k-th largest is 0
    (decided from counts, on tensors of any size here) or above it, the sort's answer, ties by index."""
    import fedselect.core.topk as topk_module

    monkeypatch.setattr(topk_module, "_ZERO_CUT_MIN_SIZE", 0 if probe else 10**9)
    g = torch.Generator().manual_seed(int(zero_share * 100) + 7)
    scores = torch.rand(60, 30, generator=g)
    scores[torch.rand(60, 30, generator=g) < zero_share] = 0.0
    scores[torch.rand(60, 30, generator=g) < 0.1 * zero_share] = -0.0
    within = torch.rand(60, 30, generator=g) < 0.7
    n = int(within.sum())
    n_positive = int((scores > 0)[within].sum())
    for k in sorted({1, max(1, n_positive), min(n, n_positive + 1), n // 2, n - 1}):
        for cand in (within, None):
            chosen = topk_mask(scores, k, within=cand)
            flat_idx = (cand if cand is not None else torch.ones_like(within)).reshape(-1).nonzero().squeeze(1)
            order = torch.sort(-scores.reshape(-1)[flat_idx], stable=True).indices[:k]
            expected = torch.zeros(scores.numel(), dtype=torch.bool)
            expected[flat_idx[order]] = True
            assert torch.equal(chosen.reshape(-1), expected), (zero_share, k)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_first_true_equals_a_running_count(size: int) -> None:
    from fedselect.core.topk import _first_true

    g = torch.Generator().manual_seed(size)
    for density in (0.01, 0.5, 1.0):
        flags = torch.rand(size, generator=g) < density
        total = int(flags.sum())
        for need in sorted({1, total // 3, total // 2, total - 1} & set(range(1, total))):
            expected = flags & (torch.cumsum(flags, 0) <= need)
            assert torch.equal(_first_true(flags, need), expected), (size, density, need)


def test_zero_probe_leaves_nan_among_candidates_to_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedselect.core.topk as topk_module

    monkeypatch.setattr(topk_module, "_ZERO_CUT_MIN_SIZE", 0)
    scores = torch.zeros(40)
    scores[3] = 1.0
    scores[5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(scores, 10)
    within = torch.ones(40, dtype=torch.bool)
    within[5] = False  # NaN outside the candidates is irrelevant
    assert topk_mask(scores, 10, within=within).sum() == 10
